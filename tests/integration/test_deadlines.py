"""Deadlines and cancellation: what waits too long or is abandoned is never computed.

The single worker is held on a "blocker" request (helpers/faults.py: HeldWorker), so that the
requests under test wait in the queue deterministically.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from helpers.calls import compute_without_a_request
from helpers.faults import BLOCKER, FaultHook, HeldWorker, wait_until
from helpers.servers import server_config
from prometheus_client import CollectorRegistry

from hingeloss import NO_RETRY, DeadlineExceededError, LossClient
from hingeloss._requests import build_request
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc
from hingeloss_server.config import BatchingConfig, LimitsConfig
from hingeloss_server.engine.batch_queue import Batcher
from hingeloss_server.engine.errors import DeadlineExpiredError
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.transport.status import error_status

SCORES = np.array([0.5, -1.0, 2.0, 0.0])
LABELS = np.array([1.0, -1.0, 1.0, 1.0])
MATRIX = np.arange(12, dtype=np.float64).reshape(4, 3) / 5
TARGETS = np.array([0, 1, 2, 1])


def _request(request_id: str, loss: str = "binary_hinge") -> pb.ComputeRequest:
    inputs: dict[str, Any] = {
        "binary_hinge": {"scores": SCORES, "labels": LABELS},
        "multiclass_hinge": {"scores": MATRIX, "targets": TARGETS},
        "gan_generator": {"fake_scores": SCORES},
    }[loss]
    request, _ = build_request(loss, inputs, {"request_id": request_id})
    return request


def _rejected(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("hingeloss_requests_rejected_total", {"reason": reason})
    return value or 0.0


@dataclass
class _Held:
    """A server whose only worker is held on BLOCKER until release()."""

    server: Any
    hook: FaultHook
    registry: CollectorRegistry
    stub: pb_grpc.LossServiceStub
    worker: HeldWorker[pb.ComputeResponse]

    @property
    def queued(self) -> int:
        return int(self.server.server.batcher.stats.requests)

    def release(self) -> None:
        self.worker.release()
        self.worker.blocker.result(0)


@pytest.fixture
def held(make_server: Callable[..., Any]) -> Iterator[_Held]:
    hook, registry = FaultHook(), CollectorRegistry()
    server = make_server(server_config(), fault_hook=hook, registry=registry)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        with HeldWorker(hook, lambda: stub.Compute(_request(BLOCKER), timeout=60)) as worker:
            yield _Held(server, hook, registry, stub, worker)


def test_expired_while_queued_is_never_computed(held: _Held) -> None:
    with LossClient(held.server.target, retry=NO_RETRY) as client:
        with pytest.raises(DeadlineExceededError):
            client.binary_hinge(SCORES, LABELS, request_id="late", timeout=0.3)
        wait_until(lambda: held.queued == 0, what="the expired request leaves the queue")
        assert _rejected(held.registry, "deadline_exceeded") == 1
        assert _rejected(held.registry, "cancelled") == 0
        held.release()
        # The server goes on at once; the expired request never reached compute.
        result = client.binary_hinge(SCORES, LABELS, request_id="after", timeout=5)
    assert result.loss == pytest.approx(np.maximum(0, 1 - LABELS * SCORES).mean())
    assert "late" not in held.hook.computed
    assert "after" in held.hook.computed


def test_cancelled_call_leaves_the_queue_at_once(held: _Held) -> None:
    calls = [held.stub.Compute.future(_request(f"gone{i}"), timeout=30) for i in range(3)]
    kept = held.stub.Compute.future(_request("kept"), timeout=30)
    wait_until(lambda: held.queued == 4, what="four queued")
    for call in calls:
        call.cancel()
    wait_until(lambda: held.queued == 1, what="cancelled calls leave the queue")
    assert held.server.server.batcher.stats.rows == 4
    assert _rejected(held.registry, "cancelled") == 3
    held.release()
    assert kept.result(10).request_id == "kept"
    assert held.hook.computed.isdisjoint({"gone0", "gone1", "gone2"})
    assert held.server.server.batcher.stats.requests == 0


async def test_cancelled_asyncio_task_leaves_the_queue(held: _Held) -> None:
    from hingeloss import AsyncLossClient

    async with AsyncLossClient(held.server.target, retry=NO_RETRY) as client:
        task = asyncio.create_task(client.binary_hinge(SCORES, LABELS, request_id="task"))
        await asyncio.to_thread(wait_until, lambda: held.queued == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(wait_until, lambda: held.queued == 0)
    held.release()
    assert "task" not in held.hook.computed


def test_cancelled_stream_drops_what_it_queued(held: _Held) -> None:
    more = threading.Event()

    def requests() -> Iterator[pb.ComputeRequest]:
        for i in range(3):
            yield _request(f"streamed{i}")
        more.wait(30)  # keeps the stream open, as a trainer would

    call = held.stub.ComputeStream(requests(), timeout=30)
    wait_until(lambda: held.queued == 3, what="three streamed requests queued")
    call.cancel()
    wait_until(lambda: held.queued == 0, what="the stream's requests leave the queue")
    more.set()
    held.release()
    assert held.hook.computed.isdisjoint({"streamed0", "streamed1", "streamed2"})


def test_batches_go_earliest_deadline_first(held: _Held) -> None:
    """Across batch keys, the most urgent deadline runs first; no deadline runs last."""
    with ThreadPoolExecutor(4) as pool:
        calls = {
            "none": pool.submit(held.stub.Compute, _request("none", "gan_generator")),
            "relaxed": pool.submit(
                held.stub.Compute, _request("relaxed", "binary_hinge"), timeout=30
            ),
            "urgent": pool.submit(
                held.stub.Compute, _request("urgent", "multiclass_hinge"), timeout=10
            ),
        }
        wait_until(lambda: held.queued == 3, what="three queued")
        held.release()
        for call in calls.values():
            call.result(10)
    order = [batch[0] for batch in held.hook.batches if batch[0] in calls]
    assert order == ["urgent", "relaxed", "none"]


async def test_batcher_fails_jobs_that_expire_in_the_queue() -> None:
    """The batcher's own check: an expired job is failed, counted, and never handed out."""
    dropped: list[str] = []
    batcher = Batcher(BatchingConfig(), on_drop=lambda job, reason: dropped.append(reason))
    loop = asyncio.get_running_loop()
    limits = LimitsConfig()
    expiring = decode_request(_request("expiring"), limits)
    live = decode_request(_request("live"), limits)
    expiring_future = batcher.submit(expiring, deadline=loop.time() + 0.05)
    batcher.submit(live)
    await asyncio.sleep(0.1)
    assert [queued.job for queued in await batcher.next_batch()] == [live]
    with pytest.raises(DeadlineExpiredError) as info:
        expiring_future.result()
    assert dropped == ["deadline_exceeded"]
    assert error_status(info.value).code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_cancel_at_the_deadline_counts_as_an_expiry() -> None:
    """gRPC cancels a call at its deadline; that is an expiry, while an earlier cancel is not."""
    dropped: list[str] = []
    batcher = Batcher(BatchingConfig(), on_drop=lambda job, reason: dropped.append(reason))
    loop = asyncio.get_running_loop()
    limits = LimitsConfig()
    jobs = [decode_request(_request(f"j{i}"), limits) for i in range(3)]
    deadlines = [
        loop.time() - 0.001,  # its deadline has passed
        loop.time() + 60,  # the caller gave up early
        None,
    ]
    futures = [batcher.submit(job, deadline) for job, deadline in zip(jobs, deadlines, strict=True)]
    for future in futures:
        future.cancel()
    await asyncio.sleep(0)
    assert dropped == ["deadline_exceeded", "cancelled", "cancelled"]
    assert batcher.stats.requests == 0


def test_a_request_that_never_arrives_is_refused_after_the_arrival_limit(
    make_server: Callable[..., Any],
) -> None:
    """A stalled upload without a deadline is not held forever: DEADLINE_EXCEEDED, counted."""
    registry = CollectorRegistry()
    server = make_server(server_config(request_arrival_seconds=0.5), registry=registry)
    with grpc.insecure_channel(server.target) as channel:
        # The caller set no deadline (the 30 s here only keeps a broken server from
        # hanging the test).
        error = compute_without_a_request(channel, timeout=30)
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.details() == "the request did not arrive within 0.5 s"
        # A request that arrives in time is answered as usual.
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        assert stub.Compute(_request("on-time"), timeout=30).request_id == "on-time"
    rejected = registry.get_sample_value(
        "hingeloss_requests_rejected_total", {"reason": "arrival_timeout"}
    )
    assert rejected == 1
