"""LossClient: the synchronous SDK, and LossStream for pipelined calls on one stream."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from hingeloss._channel import ClientBase, health_request, serving_status
from hingeloss._errors import DeadlineExceededError, HingelossError, from_rpc_error
from hingeloss._methods import LossMethods
from hingeloss._results import LossResult, decode_response
from hingeloss._streams import Step, StreamSettings, StreamState, build_stream_request
from hingeloss._upload import SYNC_UPLOAD_MIN_BYTES, Upload
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc

Response = TypeVar("Response")


class LossClient(ClientBase["LossStream"], LossMethods[LossResult]):
    """Computes losses and gradients on a hingeloss server.

    Args:
        target: "host:port", "ipv4:127.0.0.1:1,127.0.0.1:2" or "dns:///name:port";
            calls are spread round-robin over every address.
        timeout: default deadline of each call, in seconds (None: no deadline).
        credentials: grpc.ssl_channel_credentials(...) for TLS / mTLS.
        token: bearer token, sent as gRPC call credentials (`authorization: Bearer
            <token>`) and so only over TLS, unless `local_token` says otherwise.
        compression: e.g. grpc.Compression.Gzip (off by default).
        max_message_bytes: send and receive limit (the server's default: 512 MiB).
        retry: retries of UNAVAILABLE and load shedding, throttled per client
            (see RetryPolicy).
        options: extra channel arguments.
        local_token: send the token over a plaintext connection to this machine
            (loopback or a Unix socket; `grpc.local_channel_credentials`), for
            tests and local development. Without TLS or this, a token is refused.
        upload_min_bytes: requests whose scores hold at least this many bytes go
            up in parts on a ComputeUpload call (default 0.5 MB on LossClient, 8 MB
            on AsyncLossClient, as measured); None: never, 0: always. See
            docs/sdk.md.

    Example:
        >>> with LossClient("localhost:50051") as client:
        ...     result = client.multiclass_hinge(logits, targets)
        ...     result.loss, result.grad
    """

    _grpc_api = grpc
    _default_upload_min_bytes = SYNC_UPLOAD_MIN_BYTES

    def _submit(self, loss: str, inputs: dict[str, Any], options: dict[str, Any]) -> LossResult:
        request, kind, timeout = self._prepare(loss, inputs, options)
        attempts = self._attempts(timeout, time.monotonic)
        while True:
            try:
                response = self._attempt(request, attempts.start())
            except HingelossError as error:
                if self._closed:
                    raise  # close() cut it short: not retried
                time.sleep(attempts.retry_after(error))
                if self._closed:  # closed while waiting to retry
                    raise self._closed_under() from error
            else:
                attempts.succeeded()
                return decode_response(response, kind)

    def _attempt(self, request: pb.ComputeRequest | Upload, timeout: float | None) -> Any:
        """One attempt of a computation: an upload refused by an older server is sent
        again at once in one message, within the same attempt's time."""
        method, argument = self._invocation(request)
        started = time.monotonic()
        try:
            return self._call(method, argument, timeout)
        except HingelossError as error:
            retry = self._resend_whole(method, request, error)
            if retry is None:
                raise
        return self._call(*retry, self._left(timeout, started, time.monotonic()))

    def _call(
        self, method: Callable[..., Response], request: Any, timeout: float | None
    ) -> Response:
        """One attempt of a unary call; a failure raises its typed error."""
        self._ensure_open()
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as rpc_error:
            if self._closed and rpc_error.code() is grpc.StatusCode.CANCELLED:
                raise self._closed_under() from rpc_error
            raise from_rpc_error(rpc_error) from rpc_error
        except ValueError as error:  # grpc's "Cannot invoke RPC on closed channel!"
            if self._closed:
                raise self._closed_under() from error
            raise

    def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING".

        Asked over the client's own channel, which checks the server's health itself and
        sends nothing to a server that says NOT_SERVING: then this raises
        UnavailableError. `hingeloss-health` asks without that.
        """
        return serving_status(
            self._call(self._health.Check, health_request(service), self._timeout)
        )

    def server_info(self) -> pb.ServerInfo:
        """What the server computes and the limits it enforces."""
        info: pb.ServerInfo = self._call(
            self._stub.GetServerInfo, pb.GetServerInfoRequest(), self._timeout
        )
        return info

    def _open_stream(self, settings: StreamSettings) -> LossStream:
        return LossStream(self._stub, settings)

    def close(self) -> None:
        """Closes the channel: calls in flight fail with CancelledError, later ones raise
        RuntimeError."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LossStream(LossMethods["Future[LossResult]"]):
    """Many requests pipelined on one ComputeStream call; use as a context manager.

    Each method returns a `concurrent.futures.Future` at once; requests are
    written in call order and answered in that order. At most `max_in_flight`
    futures are unresolved at a time: a further call blocks until one resolves
    (or until its own deadline passes, when its future fails with
    DeadlineExceededError).

    Each future fails with DeadlineExceededError when its answer has not come
    within `timeout` seconds of the call (the client's per-call timeout unless
    `stream(timeout=...)` says otherwise; None: no limit), while the stream
    itself stays open for later calls. When a request fails on the server, the
    stream ends: that request's future gets the error, the requests after it get
    StreamAbortedError (safe to resubmit), and later calls fail at once.
    """

    def __init__(self, stub: pb_grpc.LossServiceStub, settings: StreamSettings) -> None:
        self._core = _StreamCore(stub, settings)
        # The stream's threads hold only the core: a stream dropped without close() is
        # collected, and then half-closes its call, so its threads and the call end.
        self._finalizer = weakref.finalize(self, self._core.state.close)

    def _submit(
        self, loss: str, inputs: dict[str, Any], options: dict[str, Any]
    ) -> Future[LossResult]:
        return self._core.submit(loss, inputs, options)

    def close(self) -> None:
        """Ends the request stream and waits for every outstanding answer.

        With a timeout, waits at most that long for the server to finish the
        stream; then every answer still missing fails with DeadlineExceededError
        and the call is cancelled.
        """
        self._finalizer.detach()
        self._core.close()

    def __enter__(self) -> LossStream:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc is not None:
            self._core.responses.cancel()
        self.close()


class _StreamCore:
    """A LossStream's call, state and threads, apart from the object its caller holds."""

    def __init__(self, stub: pb_grpc.LossServiceStub, settings: StreamSettings) -> None:
        timeout = settings.timeout
        self._slots = threading.BoundedSemaphore(settings.max_in_flight)
        self._wake = threading.Event()  # the request iterator: something to write
        self._tick = threading.Event()  # the deadline watcher: something changed
        self.state: StreamState[Future[LossResult]] = StreamState(
            release_slot=self._slots.release,
            on_change=self._changed,
            clock=time.monotonic,
            timeout=timeout,
        )
        self._timeout = timeout
        self.responses = stub.ComputeStream(self._requests(), timeout=settings.stream_timeout)
        self._reader = threading.Thread(target=self._read, name="hingeloss-stream", daemon=True)
        self._reader.start()
        if timeout is not None:
            threading.Thread(
                target=self._watch_deadlines, name="hingeloss-stream-deadlines", daemon=True
            ).start()

    def _changed(self) -> None:
        self._wake.set()
        self._tick.set()

    def _requests(self) -> Iterator[pb.ComputeRequest]:
        # gRPC drains this iterator on its own thread; returning half-closes the call.
        while True:
            self._wake.clear()
            step = self.state.next_write(slot=False)
            if step is Step.STOP:
                return
            if step is Step.WAIT:
                self._wake.wait()
                continue
            yield step.take_request()

    def submit(
        self, loss: str, inputs: dict[str, Any], options: dict[str, Any]
    ) -> Future[LossResult]:
        request, kind = build_stream_request(loss, inputs, options)
        future: Future[LossResult] = Future()
        deadline = self.state.deadline()
        refusal = self.state.refusal()
        if refusal is not None:
            future.set_exception(refusal)
            return future
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._slots.acquire(timeout=wait):
            future.set_exception(
                DeadlineExceededError(
                    f"no free slot on the stream within {self._timeout:g} s "
                    f"(max_in_flight answers still outstanding)"
                )
            )
            return future
        # The stream may have ended while this call waited: submit() checks again.
        self.state.submit(future, kind, request, deadline=deadline, holds_slot=True)
        return future

    def _read(self) -> None:
        try:
            for response in self.responses:
                self.state.answer(response)
        except grpc.RpcError as rpc_error:
            self.state.finish(from_rpc_error(rpc_error))
        except Exception as error:  # the stream is unusable; say why to every caller
            self.state.broken("reading the stream", error)
            self.responses.cancel()
        else:
            self.state.finish_eof()

    def _watch_deadlines(self) -> None:
        while not self.state.ended:
            self._tick.clear()
            upcoming = self.state.expire()
            self._tick.wait(None if upcoming is None else max(0.0, upcoming - time.monotonic()))

    def close(self) -> None:
        """Ends the request stream and waits for every outstanding answer.

        With a timeout, waits at most that long for the server to finish the
        stream; then every answer still missing fails with DeadlineExceededError
        and the call is cancelled.
        """
        self.state.close()
        self._reader.join(self._timeout)
        if self._reader.is_alive():
            self.state.expire()
            self.responses.cancel()
            self._reader.join()
