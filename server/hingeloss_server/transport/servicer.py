"""The gRPC servicer: decode, submit, encode; errors become statuses through status.py.

Thin on purpose: batching, devices and math live below it and know no gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc
from hingeloss_server.config import LimitsConfig
from hingeloss_server.drain import CallTracker
from hingeloss_server.engine.batch_queue import Batcher
from hingeloss_server.engine.errors import (
    ComputeFailedError,
    DrainingError,
    HingelossError,
)
from hingeloss_server.metrics import Metrics
from hingeloss_server.transport.arrival import arrival_limit
from hingeloss_server.transport.budget import ByteBudget, held_bytes, inflight_full
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.transport.request_wire import ParsedRequest, parse_request
from hingeloss_server.transport.response_codec import encode_response, payload_bytes
from hingeloss_server.transport.status import (
    EndedEarlyError,
    abort_call,
    error_status,
    forget_frames,
    gave_up_code,
    short_request_id,
    status_mapping,
)
from hingeloss_server.transport.unparsable import unparsable_error
from hingeloss_server.transport.upload import receive_upload

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name
# How long a request that ended early waits for its call's cancellation, if one is
# coming (status.EndedEarlyError).
CANCEL_GRACE_S = 0.01
# Answers at least this large are serialized on a thread, not on the event loop.
ENCODE_OFF_LOOP_BYTES = 1 << 20
# Requests a ComputeStream call may have in flight at once.
STREAM_WINDOW = 64


class LossServicer(pb_grpc.LossServiceServicer):
    """Implements hingeloss.v1.LossService over the Batcher."""

    def __init__(
        self,
        limits: LimitsConfig,
        batcher: Batcher,
        budget: ByteBudget,
        metrics: Metrics,
        server_info: Callable[[], pb.ServerInfo],
        *,
        arrival_seconds: float = 300.0,
    ) -> None:
        self._limits = limits
        self._batcher = batcher
        self._budget = budget
        self._metrics = metrics
        self._server_info = server_info
        self._arrival_seconds = arrival_seconds
        self._draining = False
        self._drained = asyncio.Event()
        # Compute, ComputeUpload and ComputeStream calls in progress, for a shutdown to wait on.
        self.calls = CallTracker()

    def drain(self) -> None:
        """Shutdown has begun: new calls, and new requests on open streams, are refused.

        Calls already accepted (their request still arriving included) are answered;
        streams answer what they have read, then end with UNAVAILABLE.
        """
        self._draining = True
        self._drained.set()

    def _refuse(self, error: HingelossError) -> None:
        """Counts a call refused before its request was read or parsed."""
        mapping = status_mapping(error)
        self._metrics.request_done("none", mapping.code, None)
        if mapping.rejected is not None:
            self._metrics.request_rejected(mapping.rejected)

    def _arriving(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The arrival limit: what is read inside must have come within it."""
        return arrival_limit(self._arrival_seconds)

    async def _receive(self, context: grpc.aio.ServicerContext) -> ParsedRequest:
        """The call's one request message, within the arrival limit.

        Read with `context.read()`, not the request iterator: the iterator is an async
        generator that would keep the last message it yielded (megabytes) alive in its
        frame until the garbage collector finds it.
        """
        async with self._arriving():
            raw = await context.read()
        if raw is grpc.aio.EOF:
            raise EndedEarlyError("request", "the call carried no request message")
        try:
            return parse_request(raw)
        except DecodeError:
            raise unparsable_error() from None

    async def _receive_upload(self, context: grpc.aio.ServicerContext) -> ParsedRequest:
        """A ComputeUpload's parts, within the arrival limit, as one request."""
        return await receive_upload(context, self._limits, self._budget, self._arriving)

    async def _compute_one(
        self,
        parsed: ParsedRequest,
        context: grpc.aio.ServicerContext,
        stream_failed: asyncio.Event | None = None,
    ) -> _Answer:
        """Decodes, queues and encodes one request; raises HingelossError on failure.

        The answer is counted once it goes out (`_answered`), or as ABORTED when the
        stream it belongs to ends before it, at an earlier request's failure
        (`stream_failed`): computed and dropped (`_drop_unsent`), or cut short.
        """
        started = time.perf_counter()
        request = parsed.message
        loss = request.WhichOneof("loss") or "none"
        self._metrics.request_started()
        charge = 0
        try:
            job = decode_request(parsed, self._limits)
            self._metrics.bytes_received(job.nbytes)
            cost = held_bytes(parsed.nbytes, job.nbytes)
            if not self._budget.try_acquire(cost):
                raise inflight_full(self._budget)
            charge = cost
            remaining = context.time_remaining()
            deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
            result = await self._batcher.submit(job, deadline)
            payload = payload_bytes(result)
            if payload < ENCODE_OFF_LOOP_BYTES:
                response = encode_response(job, result)
            else:
                # The final join copies the whole answer (with the GIL released): off the
                # event loop, other callers' calls go on meanwhile.
                loop = asyncio.get_running_loop()
                response = await loop.run_in_executor(None, encode_response, job, result)
            return _Answer(
                response, loss, payload, result.samples, result.active, result.queue_s, started
            )
        except HingelossError as error:
            mapping = status_mapping(error)
            self._metrics.request_done(loss, mapping.code, None)
            # Deadline expiries are counted once, by the batcher that drops them.
            if mapping.rejected is not None:
                self._metrics.request_rejected(mapping.rejected)
            raise
        except asyncio.CancelledError:
            aborted = stream_failed is not None and stream_failed.is_set()
            self._metrics.request_done(loss, _unsent_code(aborted, context), None)
            raise
        except Exception as error:
            # A bug, never the caller's fault: INTERNAL, logged here with the request id.
            logger.exception("request %r failed", short_request_id(request.request_id))
            self._metrics.request_done(loss, grpc.StatusCode.INTERNAL, None)
            raise ComputeFailedError(
                f"internal error in request {short_request_id(request.request_id)!r}"
            ) from error
        finally:
            self._budget.release(charge)
            self._metrics.request_ended()

    async def Compute(  # noqa: N802 - gRPC method name
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        """One request, one answer; registered with a request *stream* of raw bytes.

        So the handler starts on the call's headers: a call is accepted (and counted
        for a graceful shutdown) from then on, however long its message takes to
        arrive, and a message that never arrives is refused after the arrival limit.
        """
        return await self._answer(context, self._receive)

    async def ComputeUpload(  # noqa: N802 - gRPC method name
        self, parts: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        """Compute for a request sent in parts (upload.py); answered as Compute is."""
        return await self._answer(context, self._receive_upload)

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        receive: Callable[[grpc.aio.ServicerContext], Awaitable[ParsedRequest]],
    ) -> bytes:
        """A unary call: its request received, computed and answered, or its error sent."""
        with self.calls.track():
            request = await self._received(context, receive)
            try:
                answer = await self._compute_one(request, context)
                self._answered(answer)
                return answer.response
            except HingelossError as error:
                metadata = {"requestId": short_request_id(request.message.request_id)}
                del request  # gRPC keeps the abort, whose traceback holds this frame
                await abort_call(context, error, metadata)
                raise  # unreachable: abort raises

    async def _received(
        self,
        context: grpc.aio.ServicerContext,
        receive: Callable[[grpc.aio.ServicerContext], Awaitable[ParsedRequest]],
    ) -> ParsedRequest:
        """The call's request; or its refusal, counted and sent (raising); or the end
        of a call its caller left (CANCELLED or DEADLINE_EXCEEDED, counted)."""
        try:
            try:
                if self._draining:
                    raise DrainingError("the server is shutting down")
                return await receive(context)
            except EndedEarlyError as error:
                forget_frames(error)  # nothing of the request is kept while it waits
                await asyncio.sleep(CANCEL_GRACE_S)  # for a cancellation on its way
                raise
        except HingelossError as error:
            refusal = error
        except asyncio.CancelledError:
            self._metrics.request_done("none", gave_up_code(context), None)
            raise
        self._refuse(refusal)
        await abort_call(context, refusal, {})
        raise refusal  # unreachable: abort raises

    async def ComputeStream(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        """Submits requests as they arrive and answers them in order.

        A window bounds how many one stream keeps in flight. The first failing
        request ends the stream with its status, whose ErrorInfo names it
        (`streamIndex`, `requestId`); the answers before it are all sent first.
        """
        with self.calls.track():
            async for response in self._stream(request_iterator, context):
                yield response

    async def _stream(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        window = asyncio.Semaphore(STREAM_WINDOW)
        pending: _Pending = asyncio.Queue()
        read_error: list[BaseException] = []
        # Set when a request fails: the stream ends there, and what it read after that
        # request is dropped, answered or not.
        failed = asyncio.Event()

        async def read() -> None:
            try:
                index = 0
                async for raw in request_iterator:
                    await window.acquire()  # before the task exists: nothing is orphaned
                    try:
                        request = parse_request(raw)
                    except DecodeError:
                        # It ends the stream, as a bad request does: nothing after it is read.
                        task = asyncio.create_task(self._refused(unparsable_error()))
                        pending.put_nowait(_StreamItem(index, "", task))
                        return
                    task = asyncio.create_task(self._compute_one(request, context, failed))
                    pending.put_nowait(_StreamItem(index, request.message.request_id, task))
                    index += 1
            except Exception as error:  # the request stream itself broke
                read_error.append(error)
            finally:
                pending.put_nowait(None)

        reader = asyncio.create_task(read())
        # On shutdown the stream reads no further; what it has read is answered.
        draining = asyncio.create_task(self._drained.wait())
        draining.add_done_callback(lambda _: reader.cancel())
        try:
            while (item := await pending.get()) is not None:
                try:
                    answer = await item.task
                except HingelossError as error:
                    failed.set()
                    reader.cancel()
                    await self._end_at(item, error, pending, context)
                finally:
                    window.release()
                self._answered(answer)
                yield answer.response
            if read_error:
                logger.error("request stream failed: %s", read_error[0])
                await abort_call(context, ComputeFailedError("the request stream failed"), {})
            if self._draining:
                await abort_call(context, DrainingError("the server is shutting down"), {})
        finally:
            draining.cancel()
            reader.cancel()
            self._drop_unsent(pending, failed.is_set(), context)

    async def _end_at(
        self, item: _StreamItem, error: HingelossError, pending: _Pending, context: Any
    ) -> None:
        """Ends a stream at its failed `item` (raising), once all it read after is counted."""
        # The reader's new tasks start first: one cancelled before it ran counts nothing.
        await asyncio.sleep(0)
        if stopping := self._drop_unsent(pending, True, context):
            await asyncio.wait(stopping)
        metadata = {"streamIndex": str(item.index), "requestId": short_request_id(item.request_id)}
        await abort_call(context, error, metadata)

    async def _refused(self, error: HingelossError) -> _Answer:
        """A stream message refused before any computing (it does not parse), counted as
        the stream's other requests are when they fail: as its task runs."""
        self._refuse(error)
        raise error

    def _answered(self, answer: _Answer) -> None:
        self._metrics.bytes_sent(answer.payload)
        self._metrics.request_sparsity(answer.loss, answer.samples, answer.active, answer.queue_s)
        seconds = time.perf_counter() - answer.started
        self._metrics.request_done(answer.loss, grpc.StatusCode.OK, seconds)

    def _drop_unsent(
        self, pending: _Pending, failed: bool, context: Any
    ) -> list[asyncio.Task[_Answer]]:
        """What a stream read and will not answer: computed answers are dropped and
        counted (`_unsent_code`), the rest cancelled; returns those, counted as they stop."""
        code = _unsent_code(failed, context)
        stopping = []
        while not pending.empty():
            item = pending.get_nowait()
            if item is None:
                continue
            task = item.task
            if task.done() and not task.cancelled() and task.exception() is None:
                self._metrics.request_done(task.result().loss, code, None)
            elif not task.done():
                task.cancel()
                stopping.append(task)
        return stopping

    async def GetServerInfo(  # noqa: N802 - gRPC method name
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        return self._server_info()


@dataclass(frozen=True)
class _Answer:
    """A computed request's serialized answer, and what it counts for once sent."""

    response: bytes
    loss: str
    payload: int
    samples: int
    active: int
    queue_s: float
    started: float


@dataclass(frozen=True)
class _StreamItem:
    index: int
    request_id: str
    task: asyncio.Task[_Answer]


_Pending = asyncio.Queue[_StreamItem | None]  # None: the stream reads no more


def _unsent_code(stream_failed: bool, context: Any) -> grpc.StatusCode:
    """How a request read but left unanswered counts: ABORTED after an earlier request
    of its stream failed, else as its call ended (its caller left or its deadline passed)."""
    return grpc.StatusCode.ABORTED if stream_failed else gave_up_code(context)


__all__ = ["SERVICE_NAME", "LossServicer", "error_status"]
