"""The batch queue: groups compatible jobs, bounds memory, honours deadlines.

Lives on the event loop and knows no gRPC and no devices. Jobs with equal
BatchKeys share a batch. A free worker takes the key whose oldest-deadline job is
most urgent (earliest deadline first), and everything queued under it up to the
batch's row and byte limits. It waits for more, up to `max_gather_wait_us`, only
while such waits have paid lately, and for `max_batch_delay_us` where that is set.
A request larger than `max_shared_request_bytes` is a batch of its own, and a batch of
several requests holds at most `max_shared_batch_bytes` (batch by cost).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hingeloss_server.config import BatchingConfig
from hingeloss_server.engine.errors import DeadlineExpiredError, DrainingError, OverloadedError
from hingeloss_server.engine.jobs import BatchKey, JobResult, LossJob

logger = logging.getLogger(__name__)

# A fruitless gathering wait skips at most this many batches before the next try.
MAX_GATHER_BACKOFF = 1023

# A cancel this close to its call's deadline is the deadline's doing: the caller's
# clock starts before the server's, so the caller's own deadline ends the call a
# little before the server's timer would (and the loop clock differs a little too).
# The batcher and the request metrics (transport/status.py) both use it.
DEADLINE_SLACK_S = 0.1


@dataclass(order=True)
class QueuedJob:
    """A job in the queue, with its caller's future; ordered by (deadline, arrival)."""

    # Event-loop time after which the caller no longer waits; math.inf: no deadline.
    deadline: float
    seq: int
    job: LossJob = field(compare=False)
    future: asyncio.Future[JobResult] = field(compare=False)
    enqueued_at: float = field(compare=False)
    # False once taken, cancelled or failed: the heaps drop such entries lazily.
    live: bool = field(default=True, compare=False)
    # Event-loop time its caller gave up, once it has.
    cancelled_at: float | None = field(default=None, compare=False)


@dataclass
class QueueStats:
    """What is queued now."""

    requests: int = 0
    rows: int = 0
    bytes: int = 0


class Batcher:
    """Bounded, deadline-aware queue of jobs grouped by BatchKey.

    Every entry sits in two heaps ordered by (deadline, arrival): its key's, from
    which batches are taken, and a global one, whose top names the most urgent
    key. Both drop taken or cancelled entries lazily, so choosing and taking a
    batch costs O(log n) however many distinct keys are queued.

    Args:
        config: queue bounds and the optional gathering delay.
        on_drop: called with (job, reason) for each job dropped before compute
            ("deadline_exceeded" or "cancelled"), for metrics.
    """

    def __init__(
        self,
        config: BatchingConfig,
        on_drop: Callable[[LossJob, str], None] | None = None,
    ) -> None:
        self._config = config
        # The bytes a batch of several requests may hold.
        self._shared_bytes = min(config.max_batch_bytes, config.max_shared_batch_bytes)
        self._on_drop = on_drop or (lambda job, reason: None)
        self._queues: dict[BatchKey, list[QueuedJob]] = {}
        # Live entries per key: a key whose count drops to 0 is forgotten at once.
        self._live: dict[BatchKey, int] = {}
        self._urgent: list[QueuedJob] = []
        self._seq = itertools.count()
        self._work = asyncio.Event()
        # Requests submitted so far: whether a gathering wait gathered any.
        self._submitted = 0
        # Batches to take without waiting, and how many the next fruitless wait earns.
        self._gather_skip = 0
        self._gather_backoff = 0
        self._closed = False
        self.stats = QueueStats()
        # Smoothed seconds of compute per row, for the retry delay we suggest when full.
        self._seconds_per_row = 1e-6

    def submit(self, job: LossJob, deadline: float | None = None) -> asyncio.Future[JobResult]:
        """Queues a job and returns the future of its result.

        `deadline` is the event-loop time after which its caller no longer waits.

        Raises:
            DrainingError: the server is shutting down.
            OverloadedError: the queue is full (rows or bytes); retry later.
        """
        if self._closed:
            raise DrainingError("the server is shutting down")
        stats, config = self.stats, self._config
        if stats.requests and (
            stats.rows + job.rows > config.max_queue_rows
            or stats.bytes + job.nbytes > config.max_queue_bytes
        ):
            retry = min(5.0, max(0.01, stats.rows * self._seconds_per_row))
            raise OverloadedError(
                "queue_full",
                retry,
                f"the queue is full ({stats.requests} requests, {stats.rows} rows); "
                f"retry in {retry:.3f}s",
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[JobResult] = loop.create_future()
        entry = QueuedJob(
            deadline=math.inf if deadline is None else deadline,
            seq=next(self._seq),
            job=job,
            future=future,
            enqueued_at=loop.time(),
        )
        heapq.heappush(self._queues.setdefault(job.key, []), entry)
        heapq.heappush(self._urgent, entry)
        self._live[job.key] = self._live.get(job.key, 0) + 1
        stats.requests += 1
        stats.rows += job.rows
        stats.bytes += job.nbytes
        # A caller that gives up (cancellation) frees its place at once.
        future.add_done_callback(functools.partial(self._on_done, entry))
        self._submitted += 1
        self._work.set()
        return future

    def _on_done(self, entry: QueuedJob, future: asyncio.Future[JobResult]) -> None:
        if future.cancelled():
            entry.cancelled_at = asyncio.get_running_loop().time()
            if entry.live:
                self._remove(entry)
                self._dropped(entry)

    def _dropped(self, entry: QueuedJob) -> None:
        """Counts a job whose caller gave up before its batch was computed."""
        # gRPC cancels a call whose deadline passes: count that as an expiry, not a cancel.
        when = entry.cancelled_at
        if when is None:
            when = asyncio.get_running_loop().time()
        expired = entry.deadline - DEADLINE_SLACK_S <= when
        self._on_drop(entry.job, "deadline_exceeded" if expired else "cancelled")

    def _remove(self, entry: QueuedJob) -> None:
        entry.live = False
        key = entry.job.key
        self._live[key] -= 1
        if self._live[key] == 0:
            del self._live[key]
            del self._queues[key]
        self.stats.requests -= 1
        self.stats.rows -= entry.job.rows
        self.stats.bytes -= entry.job.nbytes

    def record_compute(self, rows: int, seconds: float) -> None:
        """Feeds the compute speed estimate behind suggested retry delays."""
        if rows > 0:
            self._seconds_per_row = 0.8 * self._seconds_per_row + 0.2 * (seconds / rows)

    async def next_batch(self) -> list[QueuedJob]:
        """Waits for work and takes one batch of jobs sharing a key.

        A batch holds at most `max_batch_rows` rows and `max_batch_bytes` bytes, but
        always at least one job. Expired jobs are failed with DeadlineExpiredError and
        never returned.
        """
        max_rows, max_bytes = self._config.max_batch_rows, self._config.max_batch_bytes
        shared_bytes = self._shared_bytes
        while True:
            key = self._most_urgent_key()
            if key is None:
                self._work.clear()
                await self._work.wait()
                continue
            batch = self._take(key, max_rows, max_bytes)
            if batch and not self._alone(batch[0]):
                rows = sum(queued.job.rows for queued in batch)
                nbytes = sum(queued.job.nbytes for queued in batch)
                if rows < max_rows and nbytes < shared_bytes and await self._wait(batch):
                    joined = self._take(key, max_rows - rows, shared_bytes - nbytes, joining=True)
                    batch.extend(joined)
            batch = self._still_awaited(batch)
            if batch:
                return batch

    def _still_awaited(self, batch: list[QueuedJob]) -> list[QueuedJob]:
        """The batch without the jobs whose callers gave up while it gathered (counted)."""
        kept = []
        for queued in batch:
            if queued.future.cancelled():
                self._dropped(queued)
            elif not queued.future.done():
                kept.append(queued)
        return kept

    async def _wait(self, taken: list[QueuedJob]) -> bool:
        """`_waited_for_more`; jobs taken already are failed if the wait is cancelled."""
        try:
            return await self._waited_for_more()
        except asyncio.CancelledError:
            for queued in taken:
                if not queued.future.done():
                    queued.future.set_exception(
                        DrainingError("the server stopped during this request")
                    )
            raise

    async def _waited_for_more(self) -> bool:
        """Waits for requests that may join a batch that is not full; False: none waited for.

        Under load the event loop reads other calls' requests meanwhile, so the batch
        grows at little cost. Whether a wait will pay is not known beforehand (gRPC does
        not say what it holds unread), so the batcher goes by what its waits gathered:
        a wait that gathered nothing is not tried again for a number of batches that
        doubles with each such wait (a lone caller pays one wait in ~1000 batches), and
        one that gathered something is tried at once. (A call whose request is still
        arriving is no reason to wait: a caller that never sends one would make every
        batch wait.)
        """
        waited = False
        if self._config.max_batch_delay_us > 0:
            await asyncio.sleep(self._config.max_batch_delay_us / 1e6)
            waited = True
        wait_s = self._config.max_gather_wait_us / 1e6
        if wait_s <= 0 or not self._gather_due():
            return waited
        submitted = self._submitted
        await asyncio.sleep(wait_s)
        self._learn(gathered=self._submitted > submitted)
        return True

    def _gather_due(self) -> bool:
        if self._gather_skip:
            self._gather_skip -= 1
            return False
        return True

    def _learn(self, *, gathered: bool) -> None:
        if gathered:
            self._gather_backoff = 0
        else:
            self._gather_backoff = min(2 * self._gather_backoff + 1, MAX_GATHER_BACKOFF)
        self._gather_skip = self._gather_backoff

    def _most_urgent_key(self) -> BatchKey | None:
        while self._urgent and not self._urgent[0].live:
            heapq.heappop(self._urgent)
        return self._urgent[0].job.key if self._urgent else None

    def _alone(self, queued: QueuedJob) -> bool:
        """Whether a request is large enough to be computed alone (batch by cost)."""
        return queued.job.nbytes > self._config.max_shared_request_bytes

    def _take(
        self, key: BatchKey, max_rows: int, max_bytes: int, *, joining: bool = False
    ) -> list[QueuedJob]:
        """Takes the key's most urgent jobs that fit; `joining`: they join a batch taken before.

        A request above `max_shared_request_bytes` is a batch of its own: it would gain
        nothing from sharing and would cost every job beside it a copy into the batch.
        A second request joins only while the batch stays within `max_shared_batch_bytes`.
        """
        shared_bytes = min(max_bytes, self._shared_bytes)
        taken: list[QueuedJob] = []
        rows = nbytes = 0
        alone = False
        now = asyncio.get_running_loop().time()
        # The key's heap disappears once its last live entry is removed.
        while heap := self._queues.get(key):
            entry = heap[0]
            if not entry.live:
                heapq.heappop(heap)
                continue
            if (taken or joining) and (
                alone
                or self._alone(entry)
                or rows + entry.job.rows > max_rows
                or nbytes + entry.job.nbytes > shared_bytes
            ):
                break
            heapq.heappop(heap)
            self._remove(entry)
            if entry.deadline <= now:
                if not entry.future.done():
                    entry.future.set_exception(
                        DeadlineExpiredError("the deadline passed while the request was queued")
                    )
                self._on_drop(entry.job, "deadline_exceeded")
                continue
            taken.append(entry)
            alone = self._alone(entry)
            rows += entry.job.rows
            nbytes += entry.job.nbytes
        return taken

    def close(self) -> None:
        """Refuses new jobs; queued ones still run."""
        self._closed = True

    def fail_all(self, error: Exception) -> None:
        """Fails every queued job (used when the drain time is up)."""
        for entry in self._urgent:
            if entry.live:
                self._remove(entry)
                if not entry.future.done():
                    entry.future.set_exception(error)
        self._urgent.clear()
