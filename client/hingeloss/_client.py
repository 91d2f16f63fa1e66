"""LossClient: the synchronous SDK, and LossStream for pipelined calls on one stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hingeloss._channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT_S,
    Retrier,
    RetryPolicy,
    open_channel,
    with_token,
)
from hingeloss._errors import DeadlineExceededError, HingelossError, from_rpc_error
from hingeloss._methods import LossMethods
from hingeloss._requests import build_request
from hingeloss._results import LossResult, decode_response
from hingeloss._streams import CLIENT_TIMEOUT, Step, StreamState, UseClientTimeout
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc


class LossClient(LossMethods[LossResult]):
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

    Example:
        >>> with LossClient("localhost:50051") as client:
        ...     result = client.multiclass_hinge(logits, targets)
        ...     result.loss, result.grad
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        compression: grpc.Compression | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
        local_token: bool = False,
    ) -> None:
        self._channel = open_channel(
            grpc,
            target,
            with_token(credentials, token, local_token=local_token),
            compression,
            max_message_bytes,
            options,
        )
        self._stub = pb_grpc.LossServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout
        self._retry = Retrier(retry or RetryPolicy())

    def _submit(self, loss: str, inputs: dict[str, Any], options: dict[str, Any]) -> LossResult:
        timeout = options.pop("timeout", self._timeout)
        request, kind = build_request(loss, inputs, options)
        return decode_response(self._compute(request, timeout), kind)

    def _compute(self, request: pb.ComputeRequest, timeout: float | None) -> pb.ComputeResponse:
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                response: pb.ComputeResponse = self._stub.Compute(request, timeout=remaining)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                remaining = None if deadline is None else deadline - time.monotonic()
                delay = self._retry.failed(attempt, error, remaining)
                if delay is None:
                    raise error from rpc_error
                time.sleep(delay)
            else:
                self._retry.succeeded()
                return response

    def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING" or "NOT_SERVING"."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout
            )
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from rpc_error
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def server_info(self) -> pb.ServerInfo:
        """What the server computes and the limits it enforces."""
        try:
            info: pb.ServerInfo = self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=self._timeout
            )
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from rpc_error
        return info

    def stream(
        self,
        max_in_flight: int = 16,
        timeout: float | None | UseClientTimeout = CLIENT_TIMEOUT,
        *,
        stream_timeout: float | None = None,
    ) -> LossStream:
        """Opens a ComputeStream: methods return futures, answered in order.

        Args:
            max_in_flight: futures unresolved at once; a further call blocks
                until one resolves.
            timeout: seconds each request may wait for its answer (default: the
                client's timeout); its future then fails with
                DeadlineExceededError and the stream goes on. None: no limit.
            stream_timeout: deadline of the whole call (default: none, so a
                stream may live as long as the training run).
        """
        per_request = self._timeout if timeout is CLIENT_TIMEOUT else timeout
        return LossStream(self._stub, max_in_flight, per_request, stream_timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LossClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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

    def __init__(
        self,
        stub: pb_grpc.LossServiceStub,
        max_in_flight: int,
        timeout: float | None,
        stream_timeout: float | None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._wake = threading.Event()  # the request iterator: something to write
        self._tick = threading.Event()  # the deadline watcher: something changed
        self._state: StreamState[Future[LossResult]] = StreamState(
            release_slot=self._slots.release,
            on_change=self._changed,
            clock=time.monotonic,
            timeout=timeout,
        )
        self._timeout = timeout
        self._responses = stub.ComputeStream(self._requests(), timeout=stream_timeout)
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
            step = self._state.next_write(slot=False)
            if step is Step.STOP:
                return
            if step is Step.WAIT:
                self._wake.wait()
                continue
            yield step.take_request()

    def _submit(
        self, loss: str, inputs: dict[str, Any], options: dict[str, Any]
    ) -> Future[LossResult]:
        if options.pop("timeout", None) is not None:
            raise TypeError("stream calls take no per-call timeout; set it on stream()")
        request, kind = build_request(loss, inputs, options)
        future: Future[LossResult] = Future()
        deadline = self._state.deadline()
        refusal = self._state.refusal()
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
        self._state.submit(future, kind, request, deadline=deadline, holds_slot=True)
        return future

    def _read(self) -> None:
        try:
            for response in self._responses:
                self._state.answer(response)
        except grpc.RpcError as rpc_error:
            failure = from_rpc_error(rpc_error)
            failure.__cause__ = rpc_error
            self._state.finish(failure)
        except Exception as error:  # the stream is unusable; say why to every caller
            failure = HingelossError(f"reading the stream failed: {error!r}")
            failure.__cause__ = error
            self._state.finish(failure)
            self._responses.cancel()
        else:
            self._state.finish_eof()

    def _watch_deadlines(self) -> None:
        while not self._state.ended:
            self._tick.clear()
            upcoming = self._state.expire()
            self._tick.wait(None if upcoming is None else max(0.0, upcoming - time.monotonic()))

    def close(self) -> None:
        """Ends the request stream and waits for every outstanding answer.

        With a timeout, waits at most that long for the server to finish the
        stream; then every answer still missing fails with DeadlineExceededError
        and the call is cancelled.
        """
        self._state.close()
        self._reader.join(self._timeout)
        if self._reader.is_alive():
            self._state.expire()
            self._responses.cancel()
            self._reader.join()

    def __enter__(self) -> LossStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._responses.cancel()
        self.close()
