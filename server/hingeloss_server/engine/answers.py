"""Each job's answer from its batch's host figures: loss sum, overflow errors, wire arrays.

Each job's loss is the correctly rounded sum (math.fsum) of its own scaled
per-sample terms: the same bits whatever else shares the batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.engine.figures import Downloads, Figures
from hingeloss_server.engine.jobs import (
    BatchInfo,
    FactoredRows,
    GradientFormat,
    JobResult,
    LossJob,
    SparseRows,
    WireArray,
)
from hingeloss_server.engine.losses import SPECS
from hingeloss_server.engine.row_flags import (
    GRAD_OVERFLOW,
    LOSS_OVERFLOW,
    PER_SAMPLE_OVERFLOW,
    SCORES_NOT_FINITE,
)
from hingeloss_server.engine.validation import PreparedJob, check_scores_finite


def split(
    jobs: Sequence[PreparedJob],
    figures: Figures,
    downloads: Downloads,
    dtype: torch.dtype,
    batch: BatchInfo,
) -> list[JobResult | InvalidInputError]:
    """Splits the batch's host figures per job and reduces each job's rows.

    Each job's loss is the correctly rounded sum (math.fsum) of its own scaled
    per-sample terms: the same bits whatever else shares the batch and in whatever
    order a device would have added them. What can be done for the whole batch at
    once (scaling, counting, the byte views of the answers) is: a job costs a few
    slices, not a dozen tensor operations.
    """
    input_sets = SPECS[jobs[0].job.key.params.kind].input_sets
    rows = _BatchRows(jobs, figures, downloads)
    results: list[JobResult | InvalidInputError] = []
    offsets = [0] * len(figures.per_sample)
    for prepared in jobs:
        spans = []
        for s, set_rows in enumerate(prepared.set_rows):
            spans.append(slice(offsets[s], offsets[s] + set_rows))
            offsets[s] += set_rows
        loss = rows.loss(spans)
        if rows.flagged or not math.isfinite(loss):
            error = job_error(prepared, figures, spans, input_sets, loss)
            if error is not None:
                results.append(error)
                continue
        job = prepared.job
        options = job.options
        grads: tuple[WireArray | SparseRows | FactoredRows, ...] = ()
        if options.gradient_format is GradientFormat.FACTORED:
            grads = tuple(
                _factored_rows(bits[spans[input_sets[k]]], values[spans[input_sets[k]]], job)
                for k, (bits, values) in enumerate(downloads.factors)
            )
        elif options.gradient_format is GradientFormat.DENSE:
            grads = tuple(g.wire(spans[input_sets[k]]) for k, g in enumerate(rows.grads))
        elif options.gradient_format is GradientFormat.ROW_SPARSE:
            grads = tuple(
                _row_sparse(downloads.grads[k][spans[input_sets[k]]])
                for k in range(len(downloads.grads))
            )
        per_sample_arrays: tuple[WireArray, ...] = ()
        if options.return_per_sample:
            per_sample_arrays = tuple(
                p.wire(span) for p, span in zip(rows.per_sample, spans, strict=True)
            )
        results.append(
            JobResult(
                loss=loss,
                grads=grads,
                per_sample=per_sample_arrays,
                samples=prepared.samples,
                active=rows.active(spans),
                batch=batch,
                compute_dtype=dtype,
                host_lease=downloads.lease,
            )
        )
    return results


class _RowBytes:
    """A host tensor's bytes row by row: a job's rows are a numpy view, cut without torch."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.dtype = tensor.dtype
        self.trailing = tuple(int(d) for d in tensor.shape[1:])
        row_bytes = tensor.element_size() * math.prod(self.trailing)
        # Bytes as uint8, viewed, not copied: through numpy where it has the dtype (one
        # call into torch), through torch's own view for bfloat16.
        if tensor.dtype != torch.bfloat16 and tensor.is_contiguous():
            flat = tensor.numpy().reshape(-1).view(np.uint8)
        else:
            flat = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
        self._rows = flat.reshape(int(tensor.shape[0]), row_bytes)

    def wire(self, span: slice) -> WireArray:
        part = self._rows[span]
        return WireArray(self.dtype, (int(part.shape[0]), *self.trailing), part.reshape(-1).data)


class _BatchRows:
    """The batch-wide arrays each job's answer is cut from, made once per batch."""

    def __init__(self, jobs: Sequence[PreparedJob], figures: Figures, downloads: Downloads):
        # r_i * l_i in float64 for every row of each sample set (the job's sum follows).
        self._scaled = [
            figures.per_sample[s].astype(np.float64) * _row_scales(jobs, s)
            for s in range(len(figures.per_sample))
        ]
        # Running counts of active rows: a job's count is one subtraction.
        self._active = [np.concatenate(([0], np.cumsum(a, dtype=np.int64))) for a in figures.active]
        # Whether any row of the batch carries a flag: if none, no job has an error to find.
        self.flagged = any(bool(f.any()) for f in figures.flags)
        # Byte views only of what some job sends back.
        options = [p.job.options for p in jobs]
        dense = any(o.gradient_format is GradientFormat.DENSE for o in options)
        self.grads = tuple(_RowBytes(g) for g in downloads.grads) if dense else ()
        per_sample = any(o.return_per_sample for o in options)
        self.per_sample = tuple(_RowBytes(p) for p in downloads.per_sample) if per_sample else ()

    def loss(self, spans: list[slice]) -> float:
        """sum(r_i * l_i) over a job's rows, correctly rounded (inf past float64's range)."""
        try:
            return math.fsum(
                itertools.chain.from_iterable(
                    self._scaled[s][span].tolist() for s, span in enumerate(spans)
                )
            )
        except OverflowError:
            return math.inf

    def active(self, spans: list[slice]) -> int:
        return sum(
            int(self._active[s][span.stop] - self._active[s][span.start])
            for s, span in enumerate(spans)
        )


def _row_scales(jobs: Sequence[PreparedJob], set_index: int) -> np.ndarray[Any, Any]:
    """Each row's scale r_i of one sample set, in float64, for the whole batch."""
    scales = [p.scales[set_index] for p in jobs]
    if all(isinstance(scale, float) for scale in scales):
        counts = [p.set_rows[set_index] for p in jobs]
        return np.repeat(np.array(scales, dtype=np.float64), counts)
    return np.concatenate(
        [
            np.full(p.set_rows[set_index], scale, dtype=np.float64)
            if isinstance(scale, float)
            else scale.numpy().astype(np.float64, copy=False)
            for p, scale in zip(jobs, scales, strict=True)
        ]
    )


def job_error(
    prepared: PreparedJob,
    figures: Figures,
    spans: list[slice],
    input_sets: tuple[int, ...],
    loss: float,
) -> InvalidInputError | None:
    """The job's error from its rows' flags: scores not finite, or an overflow it would see.

    Only what the job receives may overflow: its loss (compute dtype, and the float64
    total), and the gradient or per-sample losses in the wire dtype if it asked for them.
    """
    flagged = [figures.flags[s][span] for s, span in enumerate(spans)]
    if math.isfinite(loss) and not any(f.any() for f in flagged):
        return None  # the usual case: no bit set on any row
    job = prepared.job
    options = job.options
    counted = LOSS_OVERFLOW
    if options.gradient_format is not GradientFormat.NONE:
        counted |= GRAD_OVERFLOW
    if options.return_per_sample:
        counted |= PER_SAMPLE_OVERFLOW
    if any(bool((f & SCORES_NOT_FINITE).any()) for f in flagged):
        try:
            check_scores_finite(job)
        except InvalidInputError as error:
            return error
    overflow = None
    for s, flags in enumerate(flagged):
        rows = np.flatnonzero(flags & counted)
        if rows.size:
            overflow = (s, int(rows[0]))
            break
    if overflow is None and math.isfinite(loss):
        return None
    set_index, row = overflow if overflow is not None else (0, 0)
    kind = job.key.params.kind
    field = job.input_fields[input_sets.index(set_index)]
    where = f"[{row}]" if overflow is not None else ""
    return InvalidInputError(
        f"{kind.value}.{field}{where}",
        "overflow: the hinge term or its gradient exceeds the range of "
        f"{str(job.key.dtype).removeprefix('torch.')}",
    )


def _wire(tensor: torch.Tensor) -> WireArray:
    """A whole (N, ...) host tensor as a WireArray, viewed, not copied."""
    return _RowBytes(tensor).wire(slice(None))


def _factored_rows(bits: torch.Tensor, values: torch.Tensor, job: LossJob) -> FactoredRows:
    """One job's rows of a factored gradient, viewed, not copied."""
    return FactoredRows(
        dense_shape=(int(bits.shape[0]), *job.key.trailing_shape),
        dtype=job.key.dtype,
        mask=bits.contiguous().reshape(-1).numpy().data,
        values=_wire(values),
    )


def _row_sparse(grad: torch.Tensor) -> SparseRows:
    """The non-zero rows of one job's gradient, with their indices."""
    nonzero = grad != 0
    if nonzero.dim() == 2:
        nonzero = nonzero.any(dim=1)
    rows = torch.nonzero(nonzero).squeeze(1)
    return SparseRows(
        dense_shape=tuple(int(d) for d in grad.shape),
        indices=_wire(rows.to(torch.int64)),
        values=_wire(grad.index_select(0, rows)),
    )
