"""AsyncLossClient: the asyncio SDK; same surface as LossClient, awaitable results."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from hingeloss._aio_sends import SERVER_STATUS_WAIT_S, send, upload_call
from hingeloss._channel import ClientBase, health_request, serving_status
from hingeloss._errors import CancelledError, HingelossError, from_aio_call, from_rpc_error
from hingeloss._methods import LossMethods
from hingeloss._requests import InputKind
from hingeloss._results import LossResult, decode_response
from hingeloss._streams import Step, StreamSettings, StreamState, build_stream_request
from hingeloss._upload import ASYNC_UPLOAD_MIN_BYTES, Upload
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc


class AsyncLossClient(ClientBase["AsyncLossStream"], LossMethods[Coroutine[Any, Any, LossResult]]):
    """The asyncio twin of LossClient (same arguments); use `async with`."""

    _grpc_api = grpc.aio
    _default_upload_min_bytes = ASYNC_UPLOAD_MIN_BYTES

    @staticmethod
    def _upload_method(multicallable: Any) -> Any:
        """An upload's parts written by `upload_call`, which keeps the server's status."""
        return functools.partial(upload_call, multicallable)

    def _submit(
        self, loss: str, inputs: dict[str, Any], options: dict[str, Any]
    ) -> Coroutine[Any, Any, LossResult]:
        request, kind, timeout = self._prepare(loss, inputs, options)
        return self._compute(request, kind, timeout)

    async def _compute(
        self, request: pb.ComputeRequest | Upload, kind: InputKind, timeout: float | None
    ) -> LossResult:
        attempts = self._attempts(timeout, asyncio.get_running_loop().time)
        while True:
            try:
                response = await self._attempt(request, attempts.start())
            except HingelossError as error:
                if self._closed:
                    raise  # close() cut it short: not retried
                await asyncio.sleep(attempts.retry_after(error))
                if self._closed:  # closed while waiting to retry
                    raise self._closed_under() from error
            else:
                attempts.succeeded()
                return decode_response(response, kind)

    async def _attempt(self, request: pb.ComputeRequest | Upload, timeout: float | None) -> Any:
        """One attempt of a computation: an upload refused by an older server is sent
        again at once in one message, within the same attempt's time."""
        method, argument = self._invocation(request)
        clock = asyncio.get_running_loop().time
        started = clock()
        try:
            return await self._call(method, argument, timeout)
        except HingelossError as error:
            retry = self._resend_whole(method, request, error)
            if retry is None:
                raise
        return await self._call(*retry, self._left(timeout, started, clock()))

    async def _call(
        self, method: Callable[..., grpc.aio.Call], request: Any, timeout: float | None
    ) -> Any:
        """One attempt of a call with one answer; a failure raises its typed error, read
        from the call."""
        self._ensure_open()
        call = method(request, timeout=timeout)
        try:
            return await call
        except grpc.RpcError as rpc_error:
            if self._closed and rpc_error.code() is grpc.StatusCode.CANCELLED:
                raise self._closed_under() from rpc_error
            raise await from_aio_call(call, rpc_error) from rpc_error
        except asyncio.CancelledError:
            # Closing the channel cancels its calls, and so the tasks awaiting them, as
            # does an upload whose server never sent a status (_write_parts); a task
            # nobody cancelled gets the SDK's error instead, as a stream's calls do.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            if self._closed:
                raise self._closed_under() from None
            raise CancelledError("the server ended the call without a status") from None

    async def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING".

        Asked over the client's own channel, which checks the server's health itself and
        sends nothing to a server that says NOT_SERVING: then this raises
        UnavailableError. `hingeloss-health` asks without that.
        """
        return serving_status(
            await self._call(self._health.Check, health_request(service), self._timeout)
        )

    async def server_info(self) -> pb.ServerInfo:
        """What the server computes and the limits it enforces."""
        info: pb.ServerInfo = await self._call(
            self._stub.GetServerInfo, pb.GetServerInfoRequest(), self._timeout
        )
        return info

    def _open_stream(self, settings: StreamSettings) -> AsyncLossStream:
        return AsyncLossStream(self._stub, settings)

    async def close(self) -> None:
        """Closes the channel: calls in flight fail with CancelledError, later ones raise
        RuntimeError."""
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncLossClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncLossStream(LossMethods["asyncio.Future[LossResult]"]):
    """Pipelined requests on one ComputeStream call; use `async with`.

    Each method returns an `asyncio.Future` at once, without waiting: the
    request is queued in call order, and one writer task writes the queue in
    that order, taking a slot for each request (at most `max_in_flight` futures
    are unresolved at a time; later requests wait in the queue for a slot).
    Await a future for its answer. Cancelling it (`asyncio.wait_for` included)
    affects only that request: unsent, it is never sent; sent, its answer is
    dropped. Either way its slot is free again.

    Per-request deadlines and the end of the stream on a failed request work as
    on LossStream.
    """

    def __init__(self, stub: pb_grpc.LossServiceStub, settings: StreamSettings) -> None:
        self._core = _AsyncStreamCore(stub, settings)
        # The stream's tasks hold only the core: a stream dropped without close() is
        # collected, and then half-closes its call, so its tasks and the call end.
        self._finalizer = weakref.finalize(
            self, _close_soon, asyncio.get_running_loop(), self._core.state
        )

    def _submit(
        self, loss: str, inputs: dict[str, Any], options: dict[str, Any]
    ) -> asyncio.Future[LossResult]:
        return self._core.submit(loss, inputs, options)

    async def close(self) -> None:
        """Writes every queued request, half-closes, and waits for every answer.

        With a timeout, waits at most that long for the server to finish the
        stream once everything is written; then every answer still missing fails
        with DeadlineExceededError and the call is cancelled.
        """
        self._finalizer.detach()
        await self._core.close()

    async def __aenter__(self) -> AsyncLossStream:
        return self

    async def __aexit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc is not None:
            self._core.call.cancel()
        await self.close()


def _close_soon(loop: asyncio.AbstractEventLoop, state: StreamState[Any]) -> None:
    """Closes a dropped stream's state on its loop, from whichever thread collected it."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(state.close)


class _AsyncStreamCore:
    """An AsyncLossStream's call, state and tasks, apart from the object its caller holds."""

    def __init__(self, stub: pb_grpc.LossServiceStub, settings: StreamSettings) -> None:
        timeout = settings.timeout
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.BoundedSemaphore(settings.max_in_flight)
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = timeout
        self.state: StreamState[asyncio.Future[LossResult]] = StreamState(
            release_slot=self._slots.release,
            on_change=self._changed,
            clock=self._loop.time,
            timeout=timeout,
        )
        self.call = stub.ComputeStream(timeout=settings.stream_timeout)
        self._writer = asyncio.create_task(self._write_all())
        self._reader = asyncio.create_task(self._read_all())

    def submit(
        self, loss: str, inputs: dict[str, Any], options: dict[str, Any]
    ) -> asyncio.Future[LossResult]:
        request, kind = build_stream_request(loss, inputs, options)
        future: asyncio.Future[LossResult] = self._loop.create_future()
        self.state.submit(future, kind, request, deadline=self.state.deadline())
        return future

    def _changed(self) -> None:
        self._wake.set()
        if self._timer is None and not self.state.ended:
            self._on_timer()

    def _on_timer(self) -> None:
        self._timer = None
        upcoming = self.state.expire()
        if upcoming is not None:
            self._timer = self._loop.call_at(upcoming, self._on_timer)

    async def _write_all(self) -> None:
        have_slot = False
        try:
            while True:
                if not have_slot:
                    await self._slots.acquire()
                    have_slot = True
                step = self.state.next_write(slot=True)
                if step is Step.WAIT:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if step is Step.STOP:
                    # All written: half-close, so that the server ends the call once it
                    # has answered, whoever closed the state (close(), or the finalizer
                    # of a stream dropped unclosed).
                    with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                        await self.call.done_writing()
                    return
                have_slot = False  # the request holds it until its future is done
                if not await self._write(step.take_request()):
                    return
        finally:
            if have_slot:
                self._slots.release()

    async def _write(self, request: pb.ComputeRequest) -> bool:
        """Writes one request; on failure ends the stream (unless the reader will) and says so."""
        try:
            if not await send(self.call, request):
                # The server ended the call: the reader reads what it sent, status included.
                self._loop.call_later(SERVER_STATUS_WAIT_S, self._cancel_if_silent)
                return False
        except grpc.RpcError as rpc_error:
            self.state.finish(from_rpc_error(rpc_error))
            return False
        except asyncio.CancelledError:
            self.state.finish(CancelledError("the stream was cancelled"))
            if not self.call.cancelled():
                raise  # this task itself was cancelled
            return False
        except Exception as error:
            # asyncio.InvalidStateError: the call is over; the reader reports its status.
            if not self.call.done():
                self.state.broken("writing to the stream", error)
                self.call.cancel()
            return False
        return True

    def _cancel_if_silent(self) -> None:
        """Bounds the wait for a status Core might never deliver after a failed send."""
        if not self.call.done():
            self.call.cancel()

    async def _read_all(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    self.state.finish_eof()
                    return
                self.state.answer(response)
        except grpc.RpcError as rpc_error:
            self.state.finish(from_rpc_error(rpc_error))
        except asyncio.CancelledError:
            self.state.finish(CancelledError("the stream was cancelled"))
            if not self.call.cancelled():
                self.call.cancel()
                raise  # this task itself was cancelled
        except Exception as error:
            self.state.broken("reading the stream", error)
            self.call.cancel()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    async def close(self) -> None:
        """Writes every queued request, half-closes, and waits for every answer.

        With a timeout, waits at most that long for the server to finish the
        stream once everything is written; then every answer still missing fails
        with DeadlineExceededError and the call is cancelled.
        """
        self.state.close()
        # The writer half-closes once all is written (or stops at a failed write).
        # asyncio.wait, unlike await, leaves the tasks running if close() is cancelled.
        await asyncio.wait({self._writer})
        done, _ = await asyncio.wait({self._reader}, timeout=self._timeout)
        if not done:
            self.state.expire()
            self.call.cancel()
            await asyncio.wait({self._reader})
