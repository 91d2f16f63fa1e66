"""The device worker pool: one or more workers per device, fed by the batch queue.

Each worker is an event-loop task that takes batches from the Batcher and runs them on
its worker's single-thread executor (torch releases the GIL while it computes), or,
for a CPU batch of at most `inline_batch_bytes`, on the event loop itself: the hand-off
to a thread and back costs more than such a batch.
Futures are created and resolved on the event loop only; every job taken is resolved,
whatever fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Sequence

import torch

from hingeloss_server.config import BatchingConfig, WorkerConfig
from hingeloss_server.engine.batch_queue import Batcher, QueuedJob
from hingeloss_server.engine.compute import BatchOutput
from hingeloss_server.engine.device_worker import (
    DeviceGate,
    FaultHook,
    GateBusyError,
    Outcome,
    Worker,
    staging_bytes,
)
from hingeloss_server.engine.errors import ComputeFailedError, DrainingError, HingelossError
from hingeloss_server.engine.jobs import LossJob
from hingeloss_server.metrics import Metrics

logger = logging.getLogger(__name__)


def resolve_devices(config: WorkerConfig) -> list[torch.device]:
    """The devices to run on. `auto`: every visible CUDA device, else the CPU.

    CUDA_VISIBLE_DEVICES is honoured by torch itself: `cuda:0` is the first visible one.
    """
    if config.devices != ("auto",):
        devices = [torch.device(d) for d in config.devices]
        for device in devices:
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {device} requested but CUDA is not available")
            if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
                raise ValueError(
                    f"device {device} requested but only {torch.cuda.device_count()} visible"
                )
        # A bare "cuda" is the current device: name its index, so labels and timings say cuda:N.
        return [
            torch.device("cuda", torch.cuda.current_device())
            if d.type == "cuda" and d.index is None
            else d
            for d in devices
        ]
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


def _fail_unresolved(batch: Sequence[QueuedJob], error: HingelossError) -> None:
    for queued in batch:
        if not queued.future.done():
            queued.future.set_exception(error)


class WorkerPool:
    """Runs one loop task per worker, feeding them batches from the Batcher."""

    def __init__(
        self,
        config: WorkerConfig,
        batcher: Batcher,
        metrics: Metrics,
        fault_hook: FaultHook | None = None,
        batching: BatchingConfig | None = None,
    ) -> None:
        self._config = config
        self._batcher = batcher
        self._metrics = metrics
        self._fault_hook = fault_hook
        self.devices = resolve_devices(config)
        pinned = staging_bytes(batching or BatchingConfig())
        self.workers = []
        for device in self.devices:
            gate = DeviceGate()
            self.workers += [
                Worker(
                    f"hingeloss-{device}-{i}",
                    device,
                    fault_hook,
                    config.margin_sample_rows,
                    pinned_bytes=pinned,
                    gate=gate,
                )
                for i in range(config.workers_per_device)
            ]
        self._tasks: list[asyncio.Task[None]] = []
        _limit_cpu_threads(len(self.workers))

    @property
    def device_names(self) -> list[str]:
        return [str(d) for d in self.devices]

    async def start(
        self, warm_up_jobs: Sequence[LossJob] = (), gpu_warm_up_jobs: Sequence[LossJob] = ()
    ) -> None:
        """Warms every worker up (GPU workers also run `gpu_warm_up_jobs`), then serves."""
        loop = asyncio.get_running_loop()

        def jobs_for(worker: Worker) -> list[LossJob]:
            extra = gpu_warm_up_jobs if worker.device.type == "cuda" else ()
            return [*warm_up_jobs, *extra]

        await asyncio.gather(
            *(loop.run_in_executor(w.executor, w.warm_up, jobs_for(w)) for w in self.workers)
        )
        for device in self.devices:
            mine = [w for w in self.workers if w.device == device]
            pinned = sum(w.staging.pinned_bytes for w in mine)
            self._metrics.describe_workers(str(device), len(mine), pinned)
        self._tasks = [asyncio.create_task(self._serve(w), name=w.name) for w in self.workers]

    def broken_workers(self) -> list[str]:
        """Workers whose device failed for good (health reports NOT_SERVING)."""
        return [w.name for w in self.workers if w.broken is not None]

    def stuck_workers(self) -> list[str]:
        """Workers busy on one batch for longer than the watchdog allows."""
        now = time.monotonic()
        limit = self._config.watchdog_seconds
        return [
            w.name for w in self.workers if w.busy_since is not None and now - w.busy_since > limit
        ]

    async def _serve(self, worker: Worker) -> None:
        """Takes and runs batches until stopped. Every job taken is resolved, whatever fails."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._batcher.next_batch()
            taken_at = loop.time()
            try:
                jobs = [queued.job for queued in batch]
                outcomes, output = await self._run(worker, jobs)
                self._deliver(batch, outcomes, taken_at)
                if output is not None:
                    self._record(outcomes, output)
                # Answers hold their pinned host block until they are sent: keep no reference.
                del outcomes, output
            except asyncio.CancelledError:
                _fail_unresolved(batch, DrainingError("the server stopped during this request"))
                raise
            except Exception:  # never lose a batch's callers, nor the worker, whatever broke
                logger.exception("worker %s failed outside compute", worker.name)
            _fail_unresolved(batch, ComputeFailedError("internal error while serving this request"))
            del batch, jobs

    async def _run(
        self, worker: Worker, jobs: list[LossJob]
    ) -> tuple[list[Outcome], BatchOutput | None]:
        """Runs a batch on the event loop where it is small, else on the worker's thread."""
        if self._inline(worker, jobs):
            try:
                return worker.run(jobs, on_loop=True)
            except GateBusyError:
                # The device is held alone, or the batch ran out of memory and its retries
                # must run alone: the thread runs it again from the start, and may wait.
                pass
        return await asyncio.get_running_loop().run_in_executor(worker.executor, worker.run, jobs)

    def _inline(self, worker: Worker, jobs: list[LossJob]) -> bool:
        """Whether a batch is small enough to compute on the event loop (CPU only).

        Never with a fault hook: a hook that holds its worker would hold the loop.
        """
        return (
            worker.device.type == "cpu"
            and self._fault_hook is None
            and sum(job.nbytes for job in jobs) <= self._config.inline_batch_bytes
        )

    def _record(self, outcomes: list[Outcome], output: BatchOutput) -> None:
        info = next((o.result.batch for o in outcomes if o.result is not None), None)
        if info is None:
            return
        self._batcher.record_compute(info.rows, info.compute_s)
        self._metrics.batch_done(
            info.device, info.rows, info.requests, info.compute_s, output.kind.value, output.margins
        )

    def _deliver(
        self, batch: Sequence[QueuedJob], outcomes: list[Outcome], taken_at: float
    ) -> None:
        queued_by_job = {id(queued.job): queued for queued in batch}
        for outcome in outcomes:
            queued = queued_by_job[id(outcome.job)]
            future = queued.future
            if future.done():
                continue
            if outcome.result is not None:
                queue_s = max(0.0, taken_at - queued.enqueued_at)
                future.set_result(dataclasses.replace(outcome.result, queue_s=queue_s))
            else:
                assert outcome.error is not None
                future.set_exception(outcome.error)

    async def stop(self) -> None:
        """Stops taking batches once the current ones finish; joins the threads."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, w.close) for w in self.workers))


def _limit_cpu_threads(workers: int) -> None:
    """Shares the cores between workers, leaving one to the event loop (gRPC I/O).

    Measured on 2 cores: torch on both cores made a 256x1000 request 3.6x slower
    than one thread, as intra-op threads and the event loop fought for the CPU.
    GPU workers count too: their host work (validation, staging copies, row-sparse
    answers) runs on the same intra-op pool.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, ((cores or 1) - 1) // max(1, workers)))
