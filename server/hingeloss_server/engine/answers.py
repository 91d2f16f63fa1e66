"""Each job's answer from its batch's host figures: loss sum, overflow errors, wire arrays.

Each job's loss is the correctly rounded sum (math.fsum) of its own scaled
per-sample terms: the same bits whatever else shares the batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

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
    order a device would have added them.
    """
    input_sets = SPECS[jobs[0].job.key.params.kind].input_sets
    results: list[JobResult | InvalidInputError] = []
    offsets = [0] * len(figures.per_sample)
    for prepared in jobs:
        spans = []
        for s, rows in enumerate(prepared.set_rows):
            spans.append(slice(offsets[s], offsets[s] + rows))
            offsets[s] += rows
        loss = job_loss(prepared, figures, spans)
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
        elif options.gradient_format.dense:
            grads = tuple(
                encode_grad(downloads.grads[k][spans[input_sets[k]]], options.gradient_format)
                for k in range(len(downloads.grads))
            )
        per_sample_arrays: tuple[WireArray, ...] = ()
        if options.return_per_sample:
            per_sample_arrays = tuple(
                _wire(downloads.per_sample[s][span]) for s, span in enumerate(spans)
            )
        results.append(
            JobResult(
                loss=loss,
                grads=grads,
                per_sample=per_sample_arrays,
                samples=prepared.samples,
                active=sum(int(figures.active[s][span].sum()) for s, span in enumerate(spans)),
                batch=batch,
                compute_dtype=dtype,
                host_lease=downloads.lease,
            )
        )
    return results


def job_loss(prepared: PreparedJob, figures: Figures, spans: list[slice]) -> float:
    """sum(r_i * l_i) over the job's rows, in float64 and correctly rounded (inf past range)."""
    terms = []
    for s, span in enumerate(spans):
        scale = prepared.scales[s]
        values = figures.per_sample[s][span].astype(np.float64)
        terms.append(values * (scale if isinstance(scale, float) else scale.numpy()))
    try:
        return math.fsum(itertools.chain.from_iterable(t.tolist() for t in terms))
    except OverflowError:
        return math.inf


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
    shape = tuple(int(d) for d in tensor.shape)
    # Bytes as uint8 (bfloat16 included, which numpy lacks), viewed, not copied.
    raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
    return WireArray(dtype=tensor.dtype, shape=shape, data=raw.data)


def _factored_rows(bits: torch.Tensor, values: torch.Tensor, job: LossJob) -> FactoredRows:
    """One job's rows of a factored gradient, viewed, not copied."""
    return FactoredRows(
        dense_shape=(int(bits.shape[0]), *job.key.trailing_shape),
        dtype=job.key.dtype,
        mask=bits.contiguous().reshape(-1).numpy().data,
        values=_wire(values),
    )


def encode_grad(grad: torch.Tensor, gradient_format: GradientFormat) -> WireArray | SparseRows:
    if gradient_format is GradientFormat.DENSE:
        return _wire(grad)
    nonzero = grad != 0
    if nonzero.dim() == 2:
        nonzero = nonzero.any(dim=1)
    rows = torch.nonzero(nonzero).squeeze(1)
    return SparseRows(
        dense_shape=tuple(int(d) for d in grad.shape),
        indices=_wire(rows.to(torch.int64)),
        values=_wire(grad.index_select(0, rows)),
    )
