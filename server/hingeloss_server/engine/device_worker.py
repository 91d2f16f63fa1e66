"""One device worker: a single thread that validates, computes and splits a batch.

On CUDA each worker has its own stream, so its work stays ordered. A failing batch is
split and each job retried alone, so that only the culprit fails and the worker keeps
serving; after running out of memory the retries run alone on their device
(DeviceGate); a device that cannot even synchronise marks the worker broken.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from hingeloss_server.config import MARGIN_SAMPLE_ROWS, BatchingConfig
from hingeloss_server.engine.compute import BatchOutput, compute_batch
from hingeloss_server.engine.errors import (
    ComputeFailedError,
    DeviceFailedError,
    HingelossError,
    InvalidInputError,
)
from hingeloss_server.engine.jobs import JobResult, LossJob
from hingeloss_server.engine.staging import DeviceStaging
from hingeloss_server.engine.validation import PreparedJob, prepare, prepare_batch

logger = logging.getLogger(__name__)


# A test-only hook, called on the worker thread with each batch's jobs before compute.
# It is set only by code that builds the pool in-process; nothing on the wire reaches it.
FaultHook = Callable[[Sequence[LossJob]], None]


@dataclass
class Outcome:
    """What a worker thread hands back for one job: a result or the error for its caller."""

    job: LossJob
    result: JobResult | None = None
    error: HingelossError | None = None


class GateBusyError(Exception):
    """A batch that may not wait (it runs on the event loop) found the device held alone."""


class DeviceGate:
    """Batches on one device run side by side; a retry after running out of memory runs alone.

    With several workers on a device, a request retried alone after its batch ran out
    of memory would otherwise race the other workers' batches for the memory it needs.
    A batch on the event loop never waits here (`wait=False`): it would hold every
    call the server has until another worker's retry ended.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._alone = False
        self._waiting_alone = 0

    @contextmanager
    def shared(self, *, wait: bool = True) -> Iterator[None]:
        """Runs beside other batches; `wait=False`: raises GateBusyError instead of waiting."""
        with self._cond:
            if not wait and not self._open_to_shared():
                raise GateBusyError
            self._cond.wait_for(self._open_to_shared)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _open_to_shared(self) -> bool:
        return not self._alone and not self._waiting_alone

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting_alone += 1
            self._cond.wait_for(lambda: not self._alone and not self._running)
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


def staging_bytes(batching: BatchingConfig) -> int:
    """Pinned bytes a GPU worker keeps per buffer: the largest batch and its per-row extras.

    Per row at most 8 bytes of targets, 1 of labels, 1 of ignore mask and 8 of scale
    travel beside the scores; the packed figures coming back are smaller than that.
    """
    return batching.max_batch_bytes + 32 * batching.max_batch_rows


class Worker:
    """One compute thread bound to one device.

    Args:
        name: Thread name, also in logs and the watchdog's report.
        device: Where it computes.
        fault_hook: Test-only failure injection, called with each batch's jobs.
        margin_rows: Rows of each batch whose margins feed the metrics (0: none).
        pinned_bytes: Size of each pinned staging buffer on CUDA (default: what the
            default batch limits need).
        gate: Shared by the workers of one device (OOM retries run alone).
    """

    def __init__(
        self,
        name: str,
        device: torch.device,
        fault_hook: FaultHook | None,
        margin_rows: int = MARGIN_SAMPLE_ROWS,
        *,
        pinned_bytes: int | None = None,
        gate: DeviceGate | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self.margin_rows = margin_rows
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._stream = (
            torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            if device.type == "cuda"
            else None
        )
        self._fault_hook = fault_hook
        self._gate = gate or DeviceGate()
        if pinned_bytes is None:
            pinned_bytes = staging_bytes(BatchingConfig())
        self.staging = _make_staging(device, pinned_bytes)
        # Monotonic time the current batch started, or None when idle (read by the watchdog).
        self.busy_since: float | None = None
        # Why the device cannot be used any more (a sticky CUDA error), or None.
        self.broken: str | None = None

    def _stream_context(self) -> AbstractContextManager[object]:
        if self._stream is None:
            return nullcontext()
        return torch.cuda.stream(self._stream)

    def run(
        self, jobs: Sequence[LossJob], *, on_loop: bool = False
    ) -> tuple[list[Outcome], BatchOutput | None]:
        """Validates, computes and encodes a batch, on this worker's thread or the event loop.

        `on_loop`: it may not wait for the device gate; it raises GateBusyError instead
        (nothing is computed or answered then), and the caller runs it on the thread.
        """
        if self.broken is not None:
            error = DeviceFailedError(f"device {self.device} failed: {self.broken}")
            return [Outcome(job, error=error) for job in jobs], None
        self.busy_since = time.monotonic()
        # GPU workers check scores for NaN and Inf on the device, after the upload.
        on_host = self.device.type != "cuda"
        try:
            outcomes: list[Outcome] = []
            prepared: list[PreparedJob] = []
            for job, checked in zip(jobs, self._prepare(jobs, on_host), strict=True):
                if isinstance(checked, PreparedJob):
                    prepared.append(checked)
                else:
                    outcomes.append(Outcome(job, error=checked))
            if not prepared:
                return outcomes, None
            with self._stream_context():
                output = self._compute_isolated(prepared, outcomes, alone=False, wait=not on_loop)
            return outcomes, output
        finally:
            self.busy_since = None

    @staticmethod
    def _prepare(jobs: Sequence[LossJob], on_host: bool) -> list[PreparedJob | HingelossError]:
        """Each job validated, the batch's values at once; a bug fails its request only."""
        try:
            return list(prepare_batch(jobs, check_scores=on_host))
        except Exception:  # found again job by job: only the request that hits it fails
            return [_prepare_alone(job, on_host) for job in jobs]

    def _compute_isolated(
        self, prepared: list[PreparedJob], outcomes: list[Outcome], *, alone: bool, wait: bool
    ) -> BatchOutput | None:
        output: BatchOutput | None
        out_of_memory = False
        try:
            output = self._compute(prepared, alone=alone, wait=wait)
        except GateBusyError:
            raise
        except Exception as error:
            if self._device_failed(error):
                failed = DeviceFailedError(f"device {self.device} failed: {self.broken}")
                outcomes.extend(Outcome(p.job, error=failed) for p in prepared)
                return None
            if len(prepared) == 1:
                job = prepared[0].job
                outcomes.append(Outcome(job, error=_compute_error(job.request_id, error)))
                return None
            # The message only: a log record that kept the exception would keep its traceback.
            logger.warning(
                "batch of %d failed on %s (%s); retrying each request alone",
                len(prepared),
                self.device,
                str(error),
            )
            out_of_memory = _out_of_memory(error)
            if out_of_memory and not wait:
                # The retries run alone, so they may wait: on the worker's thread.
                raise GateBusyError from None
            output = None
        if output is None:
            # Retried outside the except clause: until it ends, the traceback keeps the
            # failed batch's device tensors alive, and a retry after a CUDA OOM needs them freed.
            last = None
            for one in prepared:
                retry = self._compute_isolated([one], outcomes, alone=out_of_memory, wait=wait)
                last = retry or last
            return last
        for one, result in zip(prepared, output.results, strict=True):
            if isinstance(result, InvalidInputError):
                outcomes.append(Outcome(one.job, error=result))
            else:
                outcomes.append(Outcome(one.job, result=result))
        return output

    def _compute(self, prepared: list[PreparedJob], *, alone: bool, wait: bool) -> BatchOutput:
        if self._fault_hook is not None:
            self._fault_hook([p.job for p in prepared])
        gate = self._gate.alone() if alone else self._gate.shared(wait=wait)
        with gate, torch.inference_mode():
            return compute_batch(
                prepared,
                self.device,
                self.margin_rows,
                self.staging,
                scores_checked=self.device.type != "cuda",
            )

    def _device_failed(self, error: Exception) -> bool:
        """Whether a CUDA error left the device unusable; marks the worker broken if so.

        Out-of-memory errors are not sticky. Any other CUDA error is probed: if the
        device cannot even synchronise, every later batch would fail too.
        """
        if self.device.type != "cuda" or _out_of_memory(error):
            return self.broken is not None
        try:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.device).add_(1).cpu()
        except Exception as probe:
            self.broken = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            logger.error("device %s failed and stays failed: %s (%s)", self.device, error, probe)
        return self.broken is not None

    def warm_up(self, jobs: Sequence[LossJob]) -> None:
        """Runs sample jobs once, so that first real requests pay no start-up cost."""
        for job in jobs:
            outcomes, _ = self.run([job])
            for outcome in outcomes:
                if outcome.error is not None:
                    raise RuntimeError(f"warm-up failed on {self.device}: {outcome.error}")

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def _prepare_alone(job: LossJob, on_host: bool) -> PreparedJob | HingelossError:
    try:
        return prepare(job, check_scores=on_host)
    except InvalidInputError as error:
        return error
    except Exception as error:
        return _compute_error(job.request_id, error)


def _make_staging(device: torch.device, pinned_bytes: int) -> DeviceStaging:
    """The worker's transfers; without pinned memory (with a warning) where none can be had."""
    try:
        return DeviceStaging(device, pinned_bytes)
    except RuntimeError as error:
        logger.warning(
            "no %d bytes of pinned memory for %s (%s); transfers use pageable memory",
            pinned_bytes,
            device,
            str(error).splitlines()[0],
        )
        return DeviceStaging(device, 0)


def _out_of_memory(error: Exception) -> bool:
    """CUDA's, the CPU allocator's, or a failed pinned host allocation (RuntimeErrors)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "CUDA error: out of memory" in text
    )


def _compute_error(request_id: str, error: Exception) -> HingelossError:
    # Ids are the caller's: echo a bounded prefix only (statuses travel in size-capped metadata).
    request_id = request_id[:64]
    if _out_of_memory(error):
        logger.warning("request %s: out of device memory", request_id)
        return ComputeFailedError(
            "the device ran out of memory for this request", out_of_memory=True
        )
    logger.exception("request %s failed in compute", request_id, exc_info=error)
    return ComputeFailedError(f"internal error while computing request {request_id!r}")
