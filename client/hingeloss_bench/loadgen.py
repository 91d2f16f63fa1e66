"""The load loop: closed loop (fixed concurrency) or open loop (a schedule of arrivals).

Requests are serialized once and sent as raw bytes on grpc.aio channels, so the
generator does no protobuf work per call; responses are kept as bytes and only
their Timing is read, except that factored gradients are decoded by the SDK (to
the dense array) before the request counts as done: a caller cannot use them
otherwise. In the open loop every request has a scheduled send time
and its latency counts from that time, so a stalled server shows as growing
latency and never as a silently lower offered rate (no coordinated omission).

One cell runs in this process or in several spawned processes (never forked:
gRPC must not be forked once started); each takes an even share of the
concurrency or rate, and their raw samples are merged.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np

from hingeloss._aio_sends import upload_call
from hingeloss._channel import channel_options, with_token
from hingeloss._results import LossResult, decode_response
from hingeloss._upload import COMPUTE_UPLOAD
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_bench import reference
from hingeloss_bench.cells import (
    COMPUTE_METHOD,
    MAX_VERIFY_SAMPLES,
    MISMATCH,
    CellSpec,
    ShareResult,
    TargetSpec,
    code_name,
)
from hingeloss_bench.stream_lane import _StreamLane
from hingeloss_bench.wire import response_timing, upload_parts
from hingeloss_bench.workload import Workload


@dataclass
class _Recorder:
    """Samples of the measured requests of one process (unmeasured warm-up ones are skipped)."""

    verify_fraction: float
    rng: random.Random
    latencies: list[float] = field(default_factory=list)
    queue_us: list[int] = field(default_factory=list)
    compute_us: list[int] = field(default_factory=list)
    batch_requests: list[int] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)
    send_lag: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    sent: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_done: float = 0.0
    samples: list[tuple[int, bytes]] = field(default_factory=list)
    progress: Any = None
    # Run on each answer before its latency is taken (variant, payload).
    decode: Callable[[int, bytes], object] | None = None

    def sending(self, nbytes: int) -> None:
        self.sent += 1
        self.bytes_up += nbytes

    def answered(self, started: float, variant: int, payload: bytes) -> None:
        if self.decode is not None:
            self.decode(variant, payload)
        done = time.perf_counter()
        self.latencies.append(done - started)
        self.last_done = max(self.last_done, done)
        self.bytes_down += len(payload)
        timing = response_timing(payload)
        self.queue_us.append(timing.queue_us)
        self.compute_us.append(timing.compute_us)
        self.batch_requests.append(timing.batch_requests)
        self.batch_rows.append(timing.batch_rows)
        if (
            self.verify_fraction > 0
            and len(self.samples) < MAX_VERIFY_SAMPLES
            and (not self.samples or self.rng.random() < self.verify_fraction)
        ):
            self.samples.append((variant, payload))
        if self.progress is not None:
            self.progress.value += 1

    def failed(self, code: str) -> None:
        self.last_done = max(self.last_done, time.perf_counter())
        self.errors[code] += 1
        if self.progress is not None:
            self.progress.value += 1


def _channel(target: TargetSpec) -> Any:
    # A private subchannel pool per channel: each channel is its own TCP connection.
    options = channel_options(target.max_message_bytes, [("grpc.use_local_subchannel_pool", 1)])
    if target.server_name:
        options.append(("grpc.ssl_target_name_override", target.server_name))
    credentials = (
        grpc.ssl_channel_credentials(
            root_certificates=target.root_certificates,
            private_key=target.private_key,
            certificate_chain=target.certificate_chain,
        )
        if target.tls
        else None
    )
    credentials = with_token(credentials, target.token, local_token=target.local_token)
    if credentials is None:
        return grpc.aio.insecure_channel(target.address, options=options)
    return grpc.aio.secure_channel(target.address, credentials, options=options)


class _Arrivals:
    """Scheduled send times of an open-loop share: Poisson or evenly spaced."""

    def __init__(self, rate: float, kind: str, start: float, rng: random.Random) -> None:
        self._rate = rate
        self._kind = kind
        self._rng = rng
        self._start = start
        self._count = 0
        self._next = start

    def __iter__(self) -> _Arrivals:
        return self

    def __next__(self) -> float:
        if self._kind == "constant":
            # Multiplied, not accumulated: the k-th arrival is exactly start + k / rate.
            current = self._start + self._count / self._rate
        else:
            current = self._next
            self._next += self._rng.expovariate(self._rate)
        self._count += 1
        return current


class _Share:
    """One process's part of a cell."""

    def __init__(self, spec: CellSpec, workload: Workload, index: int, count: int) -> None:
        self.spec = spec
        self.workload = workload
        self.payloads: list[Any] = [v.payload for v in workload.variants]
        if spec.mode == "upload":
            self.payloads = [upload_parts(v.payload) for v in workload.variants]
        self.sizes = [len(v.payload) for v in workload.variants]
        self.index = index
        self.count = count
        self.rng = random.Random(spec.seed * 1_000_003 + index)
        self._variant = itertools.cycle(range(len(self.payloads)))
        self.recorder = _Recorder(spec.verify_fraction, random.Random(spec.seed + 7919 * index))
        if spec.workload.gradient_format == "factored":
            self.recorder.decode = self._decode
        # Not matched to their request's id: the replay floor answers every request of a
        # shape with the one answer it stored.
        self._decode_kinds = [replace(v.kind, request_id=None) for v in workload.variants]
        self.window_start = 0.0
        self.window_end = float("inf")
        # Measured requests scheduled so far (the `requests` budget counts these).
        self.claimed = 0

    def _decode(self, variant: int, payload: bytes) -> LossResult:
        """What an SDK caller pays for its answer: parsing, and expanding the gradient."""
        response = pb.ComputeResponse.FromString(payload)
        return decode_response(response, self._decode_kinds[variant])

    def _part(self, total: int) -> int:
        return total // self.count + (1 if self.index < total % self.count else 0)

    @property
    def concurrency(self) -> int:
        assert self.spec.concurrency is not None
        return self._part(self.spec.concurrency)

    @property
    def requests(self) -> int | None:
        return None if self.spec.requests is None else self._part(self.spec.requests)

    def next_variant(self) -> int:
        return next(self._variant)

    def measuring(self, t: float) -> bool:
        return self.window_start <= t < self.window_end

    def claim(self) -> bool:
        """Takes one measured request from the `requests` budget; False once it is spent."""
        limit = self.requests
        if limit is not None and self.claimed >= limit:
            return False
        self.claimed += 1
        return True

    async def run(self, progress: Any) -> ShareResult:
        spec = self.spec
        channels = [_channel(spec.target) for _ in range(spec.connections)]
        try:
            await asyncio.gather(
                *(asyncio.wait_for(ch.channel_ready(), timeout=spec.timeout_s) for ch in channels)
            )
            self.recorder.progress = progress
            start = time.perf_counter()
            self.window_start = start + spec.warmup_s
            if spec.requests is None:
                self.window_end = self.window_start + spec.duration_s
            if spec.rate is None:
                await self._closed_loop(channels)
            else:
                await self._open_loop(channels, start)
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))
        return self._result()

    # Closed loop -------------------------------------------------------------------------

    async def _closed_loop(self, channels: list[Any]) -> None:
        if self.spec.mode != "stream":
            calls = [self._method(ch) for ch in channels]
            workers = [self._unary_worker(calls[i % len(calls)]) for i in range(self.concurrency)]
            await asyncio.gather(*workers)
            return
        lanes = [_StreamLane(self, ch) for ch in channels]
        windows = [len(range(i, self.concurrency, len(lanes))) for i in range(len(lanes))]
        pairs = zip(lanes, windows, strict=True)
        await asyncio.gather(*(lane.closed_loop(window) for lane, window in pairs if window))

    def _method(self, channel: Any) -> Callable[..., Any]:
        """The call each request of a unary or upload cell goes through."""
        if self.spec.mode == "upload":
            upload = channel.stream_unary(COMPUTE_UPLOAD)
            # The SDK's writes: a server ending an upload early is counted by its status,
            # not as grpc.aio's INTERNAL (grpc/grpc#36066).
            return lambda parts, timeout: upload_call(upload, parts, timeout)
        return channel.unary_unary(COMPUTE_METHOD)  # type: ignore[no-any-return]

    def _more(self) -> tuple[bool, bool]:
        """(keep going, measure the next request) for a closed-loop sender."""
        now = time.perf_counter()
        if now >= self.window_end:
            return False, False
        measured = now >= self.window_start
        if measured and not self.claim():
            return False, False
        return True, measured

    async def _unary_worker(self, call: Any) -> None:
        recorder = self.recorder
        timeout = self.spec.timeout_s
        while True:
            going, measured = self._more()
            if not going:
                return
            variant = self.next_variant()
            payload = self.payloads[variant]
            if measured:
                recorder.sending(self.sizes[variant])
            started = time.perf_counter()
            try:
                response = await call(payload, timeout=timeout)
            except grpc.RpcError as error:
                if measured:
                    recorder.failed(code_name(error))
                continue
            if measured:
                recorder.answered(started, variant, response)

    # Open loop ---------------------------------------------------------------------------

    async def _open_loop(self, channels: list[Any], start: float) -> None:
        spec = self.spec
        assert spec.rate is not None
        rate = spec.rate / self.count
        # Even shares interleave: process i starts i / rate later.
        offset = self.index / spec.rate if spec.arrivals == "constant" else 0.0
        arrivals = _Arrivals(rate, spec.arrivals, start + offset, self.rng)
        if spec.mode == "stream":
            lanes = [_StreamLane(self, ch) for ch in channels]
            await asyncio.gather(*(lane.open() for lane in lanes))
            lane_cycle = itertools.cycle(lanes)
            for scheduled in arrivals:
                if not await self._wait_for(scheduled):
                    break
                await next(lane_cycle).send_scheduled(scheduled, self.measuring(scheduled))
            await asyncio.gather(*(lane.finish() for lane in lanes))
            return
        calls = [self._method(ch) for ch in channels]
        call_cycle = itertools.cycle(calls)
        pending: set[asyncio.Task[None]] = set()
        for scheduled in arrivals:
            if not await self._wait_for(scheduled):
                break
            task = asyncio.create_task(
                self._scheduled_call(next(call_cycle), scheduled, self.measuring(scheduled))
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    async def _wait_for(self, scheduled: float) -> bool:
        """Sleeps until a scheduled time; False once the schedule is complete."""
        if scheduled >= self.window_end:
            return False
        if self.measuring(scheduled) and not self.claim():
            return False
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        return True

    async def _scheduled_call(self, call: Any, scheduled: float, measured: bool) -> None:
        recorder = self.recorder
        variant = self.next_variant()
        payload = self.payloads[variant]
        if measured:
            recorder.sending(self.sizes[variant])
            recorder.send_lag.append(time.perf_counter() - scheduled)
        try:
            response = await call(payload, timeout=self.spec.timeout_s)
        except grpc.RpcError as error:
            if measured:
                recorder.failed(code_name(error))
            return
        if measured:
            recorder.answered(scheduled, variant, response)

    def _result(self) -> ShareResult:
        recorder = self.recorder
        mismatches: list[str] = []
        spec = self.spec.workload
        for variant, payload in recorder.samples:
            try:
                problem = reference.check_response(
                    spec.loss,
                    self.workload.variants[variant].inputs,
                    spec.options,
                    spec.dtype,
                    spec.gradient_format,
                    payload,
                )
            except Exception as error:  # a malformed answer is a wrong answer
                problem = f"unreadable response: {error}"
            if problem is not None:
                mismatches.append(problem)
        if mismatches:
            recorder.errors[MISMATCH] += len(mismatches)
        ok = len(recorder.latencies)
        window = max(0.0, recorder.last_done - self.window_start) if recorder.sent else 0.0

        def ints(values: list[int]) -> np.ndarray[Any, Any]:
            return np.asarray(values, dtype=np.int64)

        return ShareResult(
            latencies_s=np.asarray(recorder.latencies, dtype=np.float64),
            queue_us=ints(recorder.queue_us),
            compute_us=ints(recorder.compute_us),
            batch_requests=ints(recorder.batch_requests),
            batch_rows=ints(recorder.batch_rows),
            send_lag_s=np.asarray(recorder.send_lag, dtype=np.float64),
            sent=recorder.sent,
            ok=ok,
            errors=dict(recorder.errors),
            bytes_up=recorder.bytes_up,
            bytes_down=recorder.bytes_down,
            window_s=window,
            verified=len(recorder.samples),
            mismatches=mismatches[:5],
        )


async def run_share(
    spec: CellSpec, index: int = 0, count: int = 1, progress: Any = None
) -> ShareResult:
    """Runs share `index` of `count` of a cell in this process's event loop."""
    workload = Workload.build(spec.workload)
    return await _Share(spec, workload, index, count).run(progress)
