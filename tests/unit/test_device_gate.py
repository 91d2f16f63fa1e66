"""The per-device gate: batches side by side, a retry after running out of memory alone,
and never a wait on the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
from helpers.cases import random_job

from hingeloss_server.config import BatchingConfig, WorkerConfig
from hingeloss_server.engine import device_worker
from hingeloss_server.engine.batch_queue import Batcher
from hingeloss_server.engine.compute import compute_batch
from hingeloss_server.engine.device_worker import DeviceGate
from hingeloss_server.engine.workers import WorkerPool
from hingeloss_server.metrics import NoMetrics

WAIT_S = 10.0


def test_a_retry_alone_waits_for_running_batches_and_holds_new_ones() -> None:
    gate = DeviceGate()
    order: list[str] = []
    batch_running, release_batch = threading.Event(), threading.Event()
    retry_waiting = threading.Event()

    def batch() -> None:
        with gate.shared():
            order.append("batch starts")
            batch_running.set()
            release_batch.wait(WAIT_S)
            order.append("batch ends")

    def retry() -> None:
        batch_running.wait(WAIT_S)
        retry_waiting.set()
        with gate.alone():
            order.append("retry alone")

    def late_batch() -> None:
        with gate.shared():
            order.append("late batch")

    threads = [threading.Thread(target=f) for f in (batch, retry)]
    for thread in threads:
        thread.start()
    retry_waiting.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while not gate._waiting_alone and time.monotonic() < deadline:  # the retry is at the gate
        time.sleep(0.001)
    # A batch arriving now queues behind the waiting retry instead of overtaking it.
    threads.append(threading.Thread(target=late_batch))
    threads[-1].start()
    time.sleep(0.05)
    release_batch.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert order == ["batch starts", "batch ends", "retry alone", "late batch"]


def test_batches_share_the_device() -> None:
    gate = DeviceGate()
    inside = threading.Barrier(2, timeout=WAIT_S)

    def batch() -> None:
        with gate.shared():
            inside.wait()  # both are inside at once, or this times out

    threads = [threading.Thread(target=batch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not inside.broken


async def test_a_batch_on_the_event_loop_never_waits_for_a_retry_holding_the_device() -> None:
    """Small CPU batches run on the event loop; there, waiting at the gate would hold
    every call of the server until another worker's retry alone ended."""
    batcher = Batcher(BatchingConfig(max_gather_wait_us=0))
    pool = WorkerPool(WorkerConfig(devices=("cpu",), workers_per_device=2), batcher, NoMetrics())
    await pool.start()
    gate = pool.workers[0]._gate  # the device's, shared by both workers
    holding, release = threading.Event(), threading.Event()
    order: list[str] = []

    def retry_alone() -> None:
        with gate.alone():
            holding.set()
            release.wait(WAIT_S)
            order.append("device released")

    thread = threading.Thread(target=retry_alone)
    thread.start()
    try:
        assert holding.wait(WAIT_S)
        job = random_job("multiclass_hinge", np.random.default_rng(), 4, classes=3)
        future = batcher.submit(job)
        await asyncio.sleep(0.05)  # over at once unless the loop is held at the gate
        order.append("loop ran")
        assert not future.done()  # its batch waits for the device on a worker's thread
        release.set()
        result = await asyncio.wait_for(future, WAIT_S)
        assert result.samples == 4
        assert order == ["loop ran", "device released"]
    finally:
        release.set()
        thread.join(WAIT_S)
        await pool.stop()


async def test_a_batch_on_the_loop_short_of_memory_is_retried_alone_on_its_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retries alone may wait at the gate, so they never run on the loop.

    Running out of memory cannot be caused on purpose on a CPU: the allocator's
    error is raised in its place, for batches of more than one request.
    """
    batcher = Batcher(BatchingConfig(max_gather_wait_us=0))
    pool = WorkerPool(WorkerConfig(devices=("cpu",)), batcher, NoMetrics())
    await pool.start()
    ran: list[tuple[int, str]] = []
    compute = compute_batch  # what device_worker calls, patched below

    def short_of_memory(prepared: list[Any], *args: Any, **kwargs: Any) -> Any:
        ran.append((len(prepared), threading.current_thread().name))
        if len(prepared) > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")
        return compute(prepared, *args, **kwargs)

    monkeypatch.setattr(device_worker, "compute_batch", short_of_memory)
    try:
        rng = np.random.default_rng()
        jobs = [random_job("multiclass_hinge", rng, 4, classes=3) for _ in range(2)]
        futures = [batcher.submit(job) for job in jobs]  # one batch: taken together
        results = await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
        assert [result.samples for result in results] == [4, 4]
        worker = pool.workers[0].name
        assert ran[0] == (2, threading.current_thread().name)  # on the event loop
        assert [rows for rows, _ in ran] == [2, 2, 1, 1]  # then the thread: together, alone
        assert all(thread.startswith(worker) for _, thread in ran[1:])
    finally:
        await pool.stop()
