"""Load shedding: under 10x overload every answer is OK or RESOURCE_EXHAUSTED with RetryInfo.

The device is made slow and its capacity known with a fault hook that sleeps in
every flood batch. The flood lasts HINGELOSS_OVERLOAD_SECONDS (3 s in `make test`;
`make soak` runs it for 20 s).
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import numpy as np
import pytest
from helpers.faults import BLOCKER, FaultHook, HeldWorker, wait_until
from helpers.servers import server_config
from prometheus_client import CollectorRegistry

from hingeloss import (
    NO_RETRY,
    AsyncLossClient,
    InvalidArgumentError,
    LossClient,
    OverloadedError,
)
from hingeloss._errors import from_rpc_error
from hingeloss._requests import build_request
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc
from hingeloss_server.config import BatchingConfig, LimitsConfig

MIB = 1 << 20
FLOOD_SECONDS = float(os.environ.get("HINGELOSS_OVERLOAD_SECONDS", "3"))

# Capacity: one batch of BATCH_ROWS rows takes BATCH_SECONDS, so
# BATCH_ROWS / ROWS requests every BATCH_SECONDS: 2 / 0.1 = 20 requests/s.
ROWS, CLASSES = 8, 256
BATCH_ROWS = 16
BATCH_SECONDS = 0.1
CAPACITY = BATCH_ROWS / ROWS / BATCH_SECONDS
OVERLOAD = 10
CALLERS = 20
REQUEST_BYTES = ROWS * CLASSES * 4 + ROWS * 8
QUEUE_ROWS = 64
QUEUE_BYTES = QUEUE_ROWS * CLASSES * 4 + QUEUE_ROWS * 8
# What the flood may add to the process (server and callers together): the queue,
# every caller's request in flight (its message, decoded view, and gradient answer,
# 4 copies at most), and 64 MiB for allocator and gRPC buffers.
RSS_BOUND_BYTES = QUEUE_BYTES + 4 * CALLERS * REQUEST_BYTES + 64 * MIB


def rss_bytes() -> int:
    """Resident set size of this process (the server runs in-process)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class RssSampler:
    """Samples RSS every 20 ms on a thread; `peak` is the largest sample."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_bytes())
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples)


@dataclass
class FloodResult:
    answers: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    sent: int = 0
    # From the first send to the last send, and to the last answer.
    sending_s: float = 0.0
    seconds: float = 0.0

    @property
    def offered(self) -> float:
        return self.sent / self.sending_s

    @property
    def served(self) -> float:
        return self.answers["OK"] / self.seconds


async def flood(target: str, seconds: float, rate: float) -> FloodResult:
    """CALLERS callers together offering `rate` requests/s for `seconds`.

    Open loop: each caller sends on its own schedule without waiting for earlier
    answers and without backing off when shed, so the offered load stays at `rate`
    whatever the server answers.
    """
    result = FloodResult()
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(ROWS, CLASSES)).astype(np.float32)
    targets = rng.integers(0, CLASSES, size=ROWS)
    interval = CALLERS / rate
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + seconds

    async def call(client: AsyncLossClient, request_id: str) -> None:
        try:
            await client.multiclass_hinge(scores, targets, request_id=request_id)
            result.answers["OK"] += 1
        except OverloadedError as error:
            result.answers["RESOURCE_EXHAUSTED"] += 1
            if error.retry_delay is None or error.retry_delay <= 0:
                result.unexpected.append(f"RESOURCE_EXHAUSTED without RetryInfo: {error}")
        except Exception as error:  # anything else is a failure of the test
            result.answers[type(error).__name__] += 1
            result.unexpected.append(repr(error))

    async def caller(index: int, client: AsyncLossClient) -> None:
        calls = []
        next_at = start + interval * index / CALLERS
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval
            result.sent += 1
            result.sending_s = max(result.sending_s, loop.time() - start)
            calls.append(asyncio.create_task(call(client, f"flood-{index}-{result.sent}")))
        await asyncio.gather(*calls)

    async with AsyncLossClient(target, retry=NO_RETRY, timeout=30) as client:
        await asyncio.gather(*(caller(i, client) for i in range(CALLERS)))
    result.seconds = loop.time() - start
    return result


async def test_ten_times_overload_sheds_cleanly(make_server: Callable[..., Any]) -> None:
    hook = FaultHook(delay_s=BATCH_SECONDS, delay_prefix="flood")
    registry = CollectorRegistry()
    config = server_config(
        batching=BatchingConfig(
            max_batch_rows=BATCH_ROWS, max_queue_rows=QUEUE_ROWS, max_queue_bytes=QUEUE_BYTES
        )
    )
    server = make_server(config, fault_hook=hook, registry=registry)
    rng = np.random.default_rng(1)
    probe_scores = rng.normal(size=(4, 3))
    probe_targets = np.array([0, 1, 2, 1])
    async with AsyncLossClient(server.target, retry=NO_RETRY) as client:
        await client.multiclass_hinge(probe_scores, probe_targets)  # warm the channel
    baseline = rss_bytes()

    with RssSampler() as rss:
        outcome = await flood(server.target, FLOOD_SECONDS, rate=OVERLOAD * CAPACITY)

    assert outcome.unexpected == []
    assert set(outcome.answers) <= {"OK", "RESOURCE_EXHAUSTED"}
    served, offered = outcome.served, outcome.offered
    # Really 10x: the callers kept their pace, and the server served about its capacity.
    assert offered >= 0.8 * OVERLOAD * CAPACITY, (offered, served)
    assert served <= 1.3 * CAPACITY, (offered, served)
    assert offered / served >= 0.8 * OVERLOAD, (offered, served)
    assert outcome.answers["RESOURCE_EXHAUSTED"] > outcome.answers["OK"]
    shed = registry.get_sample_value("hingeloss_requests_rejected_total", {"reason": "queue_full"})
    assert shed == outcome.answers["RESOURCE_EXHAUSTED"]
    growth = rss.peak - baseline
    assert growth <= RSS_BOUND_BYTES, f"RSS grew {growth / MIB:.1f} MiB"

    # Right after the flood: nothing queued, and a request is served at once.
    assert server.server.batcher.stats.requests == 0
    async with AsyncLossClient(server.target, retry=NO_RETRY) as client:
        started = time.perf_counter()
        result = await client.multiclass_hinge(probe_scores, probe_targets, timeout=2)
        elapsed = time.perf_counter() - started
    expected = np.maximum(
        0.0, 1.0 - probe_scores[np.arange(4), probe_targets][:, None] + probe_scores
    )
    expected[np.arange(4), probe_targets] = 0.0
    assert result.loss == pytest.approx(expected.sum(axis=1).mean(), rel=1e-12)
    assert result.timing.queue_s < 0.05
    assert elapsed < 0.5


def _held_server(make_server: Callable[..., Any], **overrides: Any) -> tuple[Any, FaultHook]:
    hook = FaultHook()
    return make_server(server_config(**overrides), fault_hook=hook), hook


def test_full_queue_answers_at_once_with_retry_info(make_server: Callable[..., Any]) -> None:
    """Queue bounds in rows and in bytes; the refusal is immediate, not after a wait."""
    server, hook = _held_server(
        make_server, batching=BatchingConfig(max_queue_rows=8, max_queue_bytes=1 << 30)
    )
    scores, labels = np.zeros(4), np.ones(4)
    with LossClient(server.target, retry=NO_RETRY) as client, ThreadPoolExecutor(3) as pool:
        with HeldWorker(
            hook, lambda: client.binary_hinge(scores, labels, request_id=BLOCKER)
        ) as held:
            queued = [pool.submit(client.binary_hinge, scores, labels) for _ in range(2)]
            wait_until(lambda: server.server.batcher.stats.rows == 8, what="queue full")
            started = time.perf_counter()
            with pytest.raises(OverloadedError) as info:
                client.binary_hinge(scores, labels, timeout=10)
            assert time.perf_counter() - started < 1.0
        assert info.value.reason == "QUEUE_FULL"
        assert info.value.retry_delay is not None
        assert 0 < info.value.retry_delay <= 5
        for future in (held.blocker, *queued):
            assert future.result(10).loss == pytest.approx(1.0)


def test_queue_byte_bound(make_server: Callable[..., Any]) -> None:
    server, hook = _held_server(
        make_server, batching=BatchingConfig(max_queue_rows=1 << 20, max_queue_bytes=48 * 1024)
    )
    big = np.zeros(2048)  # 16 KiB of float64 scores, plus 16 KiB of float64 labels
    with LossClient(server.target, retry=NO_RETRY) as client, ThreadPoolExecutor(3) as pool:
        with HeldWorker(
            hook, lambda: client.binary_hinge(np.zeros(4), np.ones(4), request_id=BLOCKER)
        ) as held:
            first = pool.submit(client.binary_hinge, big, np.ones(2048))
            wait_until(lambda: server.server.batcher.stats.requests == 1, what="one queued")
            with pytest.raises(OverloadedError):
                client.binary_hinge(big, np.ones(2048))
            # Small requests still fit.
            small = pool.submit(client.binary_hinge, np.zeros(4), np.ones(4))
            wait_until(lambda: server.server.batcher.stats.requests == 2, what="small queued")
        for future in (held.blocker, first, small):
            future.result(10)


def test_concurrent_rpc_cap(make_server: Callable[..., Any]) -> None:
    """Beyond max_concurrent_rpcs gRPC itself answers RESOURCE_EXHAUSTED (without RetryInfo).

    A plain channel: the SDK's channel also holds one Health.Watch call open, which
    counts against the cap like any other RPC.
    """
    server, hook = _held_server(make_server, max_concurrent_rpcs=4)
    request, _ = build_request("binary_hinge", {"scores": np.zeros(4), "labels": np.ones(4)}, {})
    blocker_request, _ = build_request(
        "binary_hinge", {"scores": np.zeros(4), "labels": np.ones(4)}, {"request_id": BLOCKER}
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        with HeldWorker(hook, lambda: stub.Compute(blocker_request, timeout=30)) as held:
            queued = [stub.Compute.future(request, timeout=30) for _ in range(3)]
            wait_until(lambda: server.server.batcher.stats.requests == 3, what="cap reached")
            with pytest.raises(grpc.RpcError) as info:
                stub.Compute(request, timeout=10)
            error = from_rpc_error(info.value)
            assert isinstance(error, OverloadedError)
            assert error.retry_delay is None
        for call in (held.blocker, *queued):
            assert call.result(10).loss == pytest.approx(1.0)
        assert stub.Compute(request, timeout=10).loss == pytest.approx(1.0)


def test_request_byte_limit_is_checked_before_reading(make_server: Callable[..., Any]) -> None:
    server = make_server(server_config(limits=LimitsConfig(max_request_bytes=64 * 1024)))
    with LossClient(server.target, retry=NO_RETRY) as client:
        # 8192 float64 scores (64 KiB) plus 8192 int64 labels: over the limit.
        with pytest.raises(InvalidArgumentError) as info:
            client.binary_hinge(np.zeros(8192), np.ones(8192, dtype=np.int64))
        assert info.value.field_violations[0].field == "binary_hinge.labels.data"
        assert "65536 bytes" in info.value.field_violations[0].description
        # Exactly at the limit is fine.
        result = client.binary_hinge(
            np.zeros(4096, dtype=np.float64), np.ones(4096, dtype=np.float64)
        )
        assert result.loss == pytest.approx(1.0)


def test_message_size_limit(make_server: Callable[..., Any]) -> None:
    """A message over max_message_bytes never reaches the decoder: gRPC refuses it."""
    server = make_server(server_config(limits=LimitsConfig(max_message_bytes=64 * 1024)))
    with LossClient(server.target, retry=NO_RETRY) as client:
        with pytest.raises(OverloadedError) as info:
            client.binary_hinge(np.zeros(16384), np.ones(16384))
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.binary_hinge(np.zeros(4), np.ones(4)).loss == pytest.approx(1.0)


def test_request_byte_limit_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from hingeloss_server.cli import config_from_args

    assert config_from_args(["--max-request-bytes", "4096"]).limits.max_request_bytes == 4096
    monkeypatch.setenv("HINGELOSS_MAX_REQUEST_BYTES", "8192")
    assert config_from_args([]).limits.max_request_bytes == 8192
    with pytest.raises(SystemExit):
        config_from_args(["--max-request-bytes", "0"])


def test_inflight_byte_budget_sheds_with_retry_info(make_server: Callable[..., Any]) -> None:
    """Everything held for requests is bounded, not only the queue: beyond it, shed."""
    hook = FaultHook()
    scores = np.zeros(64)  # 512 bytes of scores + 512 of labels: a charge of about 3 KiB
    config = server_config(batching=BatchingConfig(max_inflight_bytes=3 * 1024))
    server = make_server(config, fault_hook=hook)
    with LossClient(server.target, retry=NO_RETRY) as client:
        send = partial(client.binary_hinge, scores, np.ones(64), request_id=BLOCKER)
        with HeldWorker(hook, send) as held, pytest.raises(OverloadedError) as info:
            client.binary_hinge(scores, np.ones(64))
        held.blocker.result(timeout=30)
        after = client.binary_hinge(scores, np.ones(64))
    assert info.value.reason == "INFLIGHT_FULL"
    assert info.value.retry_delay is not None
    assert after.loss == pytest.approx(1.0)
    assert server.server.batcher.stats.bytes == 0
    assert server.server.budget.used == 0


def test_refused_requests_are_freed_at_once(make_server: Callable[..., Any]) -> None:
    """A refused request's message is freed when it is refused, not by a later GC pass.

    The garbage collector is off while the requests go in: anything a reference
    cycle (or a suspended generator) keeps alive stays alive, and shows.
    """
    import gc
    import tracemalloc

    from hingeloss.v1 import loss_service_pb2 as pb

    server = make_server(server_config())
    request = pb.ComputeRequest(
        gan_generator=pb.GanGenerator(
            fake_scores=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 20], data=bytes(4 * MIB))
        ),
        reduction=99,  # type: ignore[arg-type]  # refused at decode: INVALID_ARGUMENT
    ).SerializeToString()
    options = [("grpc.max_send_message_length", 64 * MIB)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        call = channel.unary_unary("/hingeloss.v1.LossService/Compute")
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            for _ in range(10):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, timeout=30)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            gc.enable()
    # Ten messages of 4 MiB went in; at most one may still be on its way out.
    assert held < 6 * MIB, held
