"""grpc.aio writes that keep the server's status.

grpc.aio's `write`, when a send fails because the server has ended the call, replaces
the status the server sent with a local INTERNAL ("Internal error from Core";
grpc/grpc#36066). The SDK's asyncio streams and uploads write with `send` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc._cython import cygrpc

from hingeloss.v1 import loss_service_pb2 as pb

# Core delivers the server's status right after a send fails; this only bounds a bug.
SERVER_STATUS_WAIT_S = 5.0


async def _started(call: Any, sent: asyncio.Event) -> bool:
    """Waits until the call has started (its headers sent) or ended; whether it is live.

    A call cancelled before it started never sets `sent`: waiting on it alone (as the
    first write does) would hang the writer, and with it the stream's close, for ever.
    """
    if not sent.is_set() and not call.done():
        ended = asyncio.Event()
        call.add_done_callback(lambda _: ended.set())
        waits = {asyncio.ensure_future(sent.wait()), asyncio.ensure_future(ended.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
    return sent.is_set() and not call.done()


# The writers of uploads in progress: a task nothing references may be collected.
_UPLOAD_WRITERS: set[asyncio.Task[None]] = set()


def upload_call(
    method: Callable[..., grpc.aio.StreamUnaryCall], parts: Iterable[bytes], timeout: float | None
) -> grpc.aio.StreamUnaryCall:
    """A ComputeUpload call whose parts `send` writes, as a stream's requests are.

    A server may end an upload while parts are still being written: refusing its request
    on the first part, short of memory, draining, or older than ComputeUpload. grpc.aio's
    own writes then report INTERNAL in place of the server's status (here in a few
    percent of such calls, and in up to two thirds where megabytes were still to go).
    """
    call = method(timeout=timeout)
    writer = asyncio.ensure_future(_write_parts(call, parts))
    _UPLOAD_WRITERS.add(writer)
    writer.add_done_callback(_UPLOAD_WRITERS.discard)
    return call


async def _write_parts(call: grpc.aio.StreamUnaryCall, parts: Iterable[bytes]) -> None:
    """Writes the parts and half-closes; stops where the server has ended the call, whose
    status awaiting the call then gives."""
    try:
        for part in parts:
            if not await send(call, part):
                if not call.done():  # Core may deliver no status after a failed send
                    asyncio.get_running_loop().call_later(
                        SERVER_STATUS_WAIT_S, _cancel_unless_done, call
                    )
                return
        await call.done_writing()
    except (grpc.RpcError, asyncio.InvalidStateError, cygrpc.InternalError):
        return  # the call is over: awaiting it gives its status
    except BaseException:
        call.cancel()  # whoever awaits the call learns it ended
        raise


def _cancel_unless_done(call: grpc.aio.Call) -> None:
    if not call.done():
        call.cancel()


# Where a call lacks grpc.aio's internals `send` relies on.
_MISSING = object()


async def send(call: Any, request: pb.ComputeRequest | bytes) -> bool:
    """Writes one request on a stream; False when the server has already ended the call.

    grpc.aio's `write`, when a send fails because the server ended the call (its
    status and answers are on their way), replaces that status with a local INTERNAL
    ("Internal error from Core"): the status the server sent and the answers not yet
    read are lost (grpc/grpc#36066). This is grpc.aio's send without that step; the
    reader then reads the answers and the server's status as usual. Where the call's
    internals differ (another grpcio), it is the public `write`.
    """
    cython_call = getattr(call, "_cython_call", None)
    serializer: Any = getattr(call, "_request_serializer", _MISSING)
    sent = getattr(call, "_metadata_sent", None)
    if cython_call is None or serializer is _MISSING or not isinstance(sent, asyncio.Event):
        await call.write(request)
        return True
    if not await _started(call, sent):
        return False  # the reader reports its status
    try:
        # No serializer: the request is a message's bytes already (an upload's part).
        payload = request if serializer is None else serializer(request)
        await cython_call.send_serialized_message(payload)
    except cygrpc.InternalError:
        return False
    except asyncio.CancelledError:
        if not call.cancelled():
            call.cancel()
        raise
    return True
