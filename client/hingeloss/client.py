"""LossClient: the synchronous SDK, and LossStream for pipelined calls on one stream."""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hingeloss.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT_S,
    RetryPolicy,
    call_metadata,
    open_channel,
)
from hingeloss.errors import HingelossError, from_rpc_error
from hingeloss.methods import LossMethods
from hingeloss.requests import InputKind, build_request
from hingeloss.results import LossResult, decode_response
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc


class LossClient(LossMethods[LossResult]):
    """Computes losses and gradients on a hingeloss server.

    Args:
        target: "host:port", "ipv4:127.0.0.1:1,127.0.0.1:2" or "dns:///name:port";
            calls are spread round-robin over every address.
        timeout: default deadline of each call, in seconds (None: no deadline).
        credentials: grpc.ssl_channel_credentials(...) for TLS / mTLS.
        token: bearer token sent as `authorization` metadata.
        compression: e.g. grpc.Compression.Gzip (off by default).
        max_message_bytes: send and receive limit (the server's default: 512 MiB).
        retry: retries of UNAVAILABLE and RESOURCE_EXHAUSTED (see RetryPolicy).
        options: extra channel arguments.

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
    ) -> None:
        self._channel = open_channel(
            grpc, target, credentials, compression, max_message_bytes, options
        )
        self._stub = pb_grpc.LossServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout
        self._metadata = call_metadata(token)
        self._retry = retry or RetryPolicy()

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
                response: pb.ComputeResponse = self._stub.Compute(
                    request, timeout=remaining, metadata=self._metadata
                )
                return response
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                remaining = None if deadline is None else deadline - time.monotonic()
                delay = self._retry.next_delay(attempt, error, remaining)
                if delay is None:
                    raise error from rpc_error
                time.sleep(delay)

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
                pb.GetServerInfoRequest(), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from rpc_error
        return info

    def stream(self, max_in_flight: int = 16, timeout: float | None = None) -> LossStream:
        """Opens a ComputeStream: methods return futures, answered in order.

        At most `max_in_flight` requests are outstanding; a further call blocks
        until an answer arrives. `timeout` bounds the whole stream.
        """
        return LossStream(self._stub, max_in_flight, timeout, self._metadata)

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
    """Many requests pipelined on one ComputeStream call; use as a context manager."""

    def __init__(
        self,
        stub: pb_grpc.LossServiceStub,
        max_in_flight: int,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._outgoing: queue.Queue[pb.ComputeRequest | None] = queue.Queue()
        self._pending: collections.deque[tuple[Future[LossResult], InputKind]] = collections.deque()
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._lock = threading.Lock()
        self._error: HingelossError | None = None
        self._closed = False
        self._responses = stub.ComputeStream(self._requests(), timeout=timeout, metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="hingeloss-stream", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.ComputeRequest]:
        while (request := self._outgoing.get()) is not None:
            yield request

    def _submit(
        self, loss: str, inputs: dict[str, Any], options: dict[str, Any]
    ) -> Future[LossResult]:
        if options.pop("timeout", None) is not None:
            raise TypeError("stream calls take no per-call timeout; set it on stream()")
        request, kind = build_request(loss, inputs, options)
        self._slots.acquire()
        future: Future[LossResult] = Future()
        with self._lock:
            if self._closed or self._error is not None:
                self._slots.release()
                future.set_exception(self._error or RuntimeError("the stream is closed"))
                return future
            self._pending.append((future, kind))
            self._outgoing.put(request)
        return future

    def _read(self) -> None:
        try:
            for response in self._responses:
                with self._lock:
                    future, kind = self._pending.popleft()
                self._slots.release()
                try:
                    future.set_result(decode_response(response, kind))
                except Exception as error:  # a decoding failure belongs to this future
                    future.set_exception(error)
        except grpc.RpcError as rpc_error:
            failure = from_rpc_error(rpc_error)
            failure.__cause__ = rpc_error
            self._fail_pending(failure)
        else:
            self._fail_pending(RuntimeError("the stream ended before answering every request"))

    def _fail_pending(self, error: BaseException) -> None:
        with self._lock:
            if isinstance(error, HingelossError):
                self._error = error
            pending = list(self._pending)
            self._pending.clear()
        for future, _ in pending:
            self._slots.release()
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        """Ends the request stream and waits for every outstanding answer."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._outgoing.put(None)
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
