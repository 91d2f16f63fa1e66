"""One ComputeStream call of a load share: requests pipelined, answers in order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import TYPE_CHECKING, Any

import grpc

from hingeloss._aio_sends import send
from hingeloss_bench.cells import STREAM_METHOD, code_name

if TYPE_CHECKING:
    from hingeloss_bench.loadgen import _Share


class _StreamLane:
    """One ComputeStream call on one channel; answers come back in order (FIFO)."""

    def __init__(self, share: _Share, channel: Any) -> None:
        self._share = share
        self._method = channel.stream_stream(STREAM_METHOD)
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        # (reference time, variant, measured) of each request sent and not yet answered.
        self._pending: collections.deque[tuple[float, int, bool]] = collections.deque()
        self._slots: asyncio.Semaphore | None = None

    async def open(self) -> None:
        self._call = self._method()
        self._reader = asyncio.create_task(self._read(self._call))

    async def _read(self, call: Any) -> None:
        recorder = self._share.recorder
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                started, variant, measured = self._pending.popleft()
                if measured:
                    recorder.answered(started, variant, response)
                if self._slots is not None:
                    self._slots.release()
        except grpc.RpcError as error:
            self._fail_pending(code_name(error))
            return
        self._fail_pending("STREAM_ENDED")

    def _fail_pending(self, code: str) -> None:
        while self._pending:
            _, _, measured = self._pending.popleft()
            if measured:
                self._share.recorder.failed(code)
            if self._slots is not None:
                self._slots.release()

    @property
    def broken(self) -> bool:
        return self._reader is None or self._reader.done()

    async def _write(self, started: float, measured: bool) -> None:
        share = self._share
        if self.broken:
            # A failed request ends its stream: open a new one and go on.
            await self.open()
        variant = share.next_variant()
        payload = share.payloads[variant]
        if measured:
            share.recorder.sending(len(payload))
        self._pending.append((started, variant, measured))
        # On failure the reader reports the stream's error for every pending request
        # (the SDK's send: grpc.aio's write would replace the server's status with
        # INTERNAL, grpc/grpc#36066).
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await send(self._call, payload)

    async def closed_loop(self, window: int) -> None:
        self._slots = asyncio.Semaphore(window)
        await self.open()
        share = self._share
        while True:
            await self._slots.acquire()
            going, measured = share._more()
            if not going:
                break
            await self._write(time.perf_counter(), measured)
        await self.finish()

    async def send_scheduled(self, scheduled: float, measured: bool) -> None:
        if measured:
            self._share.recorder.send_lag.append(time.perf_counter() - scheduled)
        await self._write(scheduled, measured)

    async def finish(self) -> None:
        """Half-closes and waits for the answers (up to the timeout; the rest fail)."""
        if self._call is None or self._reader is None:
            return
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self._call.done_writing()
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), self._share.spec.timeout_s)
        except TimeoutError:
            self._call.cancel()
            self._fail_pending("DEADLINE_EXCEEDED")
            self._reader.cancel()
