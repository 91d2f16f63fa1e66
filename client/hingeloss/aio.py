"""AsyncLossClient: the asyncio SDK; same surface as LossClient, awaitable results."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Sequence
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


class AsyncLossClient(LossMethods[Awaitable[LossResult]]):
    """The asyncio twin of LossClient (same arguments); use `async with`."""

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
            grpc.aio, target, credentials, compression, max_message_bytes, options
        )
        self._stub = pb_grpc.LossServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout
        self._metadata = call_metadata(token)
        self._retry = retry or RetryPolicy()

    def _submit(
        self, loss: str, inputs: dict[str, Any], options: dict[str, Any]
    ) -> Awaitable[LossResult]:
        timeout = options.pop("timeout", self._timeout)
        request, kind = build_request(loss, inputs, options)
        return self._compute(request, kind, timeout)

    async def _compute(
        self, request: pb.ComputeRequest, kind: InputKind, timeout: float | None
    ) -> LossResult:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                response = await self._stub.Compute(
                    request, timeout=remaining, metadata=self._metadata
                )
                return decode_response(response, kind)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                remaining = None if deadline is None else deadline - loop.time()
                delay = self._retry.next_delay(attempt, error, remaining)
                if delay is None:
                    raise error from rpc_error
                await asyncio.sleep(delay)

    async def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING" or "NOT_SERVING"."""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._timeout
            )
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from rpc_error
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def server_info(self) -> pb.ServerInfo:
        """What the server computes and the limits it enforces."""
        try:
            info: pb.ServerInfo = await self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from rpc_error
        return info

    def stream(self, max_in_flight: int = 16, timeout: float | None = None) -> AsyncLossStream:
        """Opens a ComputeStream (use `async with`); methods return awaitables in order."""
        return AsyncLossStream(self._stub, max_in_flight, timeout, self._metadata)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLossClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncLossStream(LossMethods[Awaitable[LossResult]]):
    """Pipelined requests on one ComputeStream call.

    Each method returns a task that sends at once (waiting only while
    `max_in_flight` answers are outstanding); await it for the answer.
    """

    def __init__(
        self,
        stub: pb_grpc.LossServiceStub,
        max_in_flight: int,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._call = stub.ComputeStream(timeout=timeout, metadata=metadata)
        self._pending: collections.deque[tuple[asyncio.Future[LossResult], InputKind]] = (
            collections.deque()
        )
        self._slots = asyncio.BoundedSemaphore(max_in_flight)
        self._write_lock = asyncio.Lock()
        self._error: BaseException | None = None
        self._reader: asyncio.Task[None] | None = None

    def _submit(
        self, loss: str, inputs: dict[str, Any], options: dict[str, Any]
    ) -> Awaitable[LossResult]:
        if options.pop("timeout", None) is not None:
            raise TypeError("stream calls take no per-call timeout; set it on stream()")
        request, kind = build_request(loss, inputs, options)
        # A task, so that the request is sent now and the caller awaits it when it likes.
        return asyncio.ensure_future(self._send(request, kind))

    async def _send(self, request: pb.ComputeRequest, kind: InputKind) -> LossResult:
        if self._error is not None:
            raise self._error
        await self._slots.acquire()
        future: asyncio.Future[LossResult] = asyncio.get_running_loop().create_future()
        # One write at a time, in the order the answers will come back.
        async with self._write_lock:
            self._pending.append((future, kind))
            if self._reader is None:
                self._reader = asyncio.create_task(self._read())
            try:
                await self._call.write(request)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                error.__cause__ = rpc_error
                self._fail_pending(error)
        return await future

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                future, kind = self._pending.popleft()
                self._slots.release()
                if not future.done():
                    future.set_result(decode_response(response, kind))
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            error.__cause__ = rpc_error
            self._fail_pending(error)
            return
        self._fail_pending(RuntimeError("the stream ended before answering every request"))

    def _fail_pending(self, error: BaseException) -> None:
        if isinstance(error, HingelossError):
            self._error = error
        while self._pending:
            future, _ = self._pending.popleft()
            self._slots.release()
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Half-closes the stream and waits for every outstanding answer."""
        # On failure the reader reports the stream's error to the pending futures.
        with contextlib.suppress(grpc.RpcError):
            await self._call.done_writing()
        if self._reader is not None:
            await self._reader

    async def __aenter__(self) -> AsyncLossStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._call.cancel()
        await self.close()
