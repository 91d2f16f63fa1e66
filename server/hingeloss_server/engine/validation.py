"""Checks a batch's values and derives what the kernels need: +-1 labels, masks, row scales.

Runs on a worker thread (it reads every element). The checks run once over the
whole batch with a few vectorised ops (`prepare_batch`); only when one fails is
each job checked alone (`prepare`), so that a bad request fails alone, with the
error it would get on its own, and never reaches a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.engine.jobs import LossJob, Reduction, RequestOptions
from hingeloss_server.engine.losses import SPECS


@dataclass
class PreparedJob:
    """A job whose values passed every check, with its per-row inputs for the kernels."""

    job: LossJob
    # +-1 labels as int8 (one byte a row to upload) for binary hinge and margin ranking.
    labels: torch.Tensor | None
    # int64 class targets; ignored rows carry 0.
    targets: torch.Tensor | None
    ignore_mask: torch.Tensor | None
    # One row scale per sample set, such that loss = sum(scale * per_sample): a float
    # where every row of the set has the same one (it is expanded on the device), else
    # float64 per row (WEIGHTED_MEAN).
    scales: tuple[float | torch.Tensor, ...]
    # Rows of each sample set.
    set_rows: tuple[int, ...]
    # Samples that count (ignored rows excluded).
    samples: int


def _index_text(shape: torch.Size, flat: int) -> str:
    if len(shape) == 2:
        return f"[{flat // shape[1]}][{flat % shape[1]}]"
    return f"[{flat}]"


def _first(mask: torch.Tensor) -> int | None:
    """Flat index of the first True element, or None."""
    flat = mask.reshape(-1)
    if not bool(flat.any()):
        return None
    return int(torch.argmax(flat.to(torch.uint8)))


def _check_finite(tensor: torch.Tensor, field: str) -> None:
    # Fast path: one reduction, no temporary. A NaN or Inf anywhere makes the sum
    # non-finite; a finite sum proves every element finite. Only a non-finite sum
    # (bad data, or finite values summing past the dtype's range) pays the exact scan.
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return
    bad = _first(~torch.isfinite(tensor))
    if bad is not None:
        value = tensor.reshape(-1)[bad].item()
        raise InvalidInputError(
            f"{field}{_index_text(tensor.shape, bad)}", f"must be finite, got {value}"
        )


def _check_non_negative(tensor: torch.Tensor, field: str) -> None:
    _check_finite(tensor, field)
    bad = _first(tensor < 0)
    if bad is not None:
        value = tensor[bad].item()
        raise InvalidInputError(f"{field}[{bad}]", f"must be >= 0, got {value}")


def _plus_minus_one(labels: torch.Tensor, zero_one: bool, field: str) -> torch.Tensor:
    values = labels.to(torch.float64)
    low = 0.0 if zero_one else -1.0
    bad = _first((values != low) & (values != 1.0))
    if bad is not None:
        allowed = "0 or 1 (LABEL_ENCODING_ZERO_ONE)" if zero_one else "-1 or +1"
        raise InvalidInputError(f"{field}[{bad}]", f"must be {allowed}, got {labels[bad].item()}")
    return (values == 1.0).to(torch.int8).mul_(2).sub_(1)


def check_scores_finite(job: LossJob) -> None:
    """The finiteness check of every score input, naming the first bad element."""
    prefix = job.key.params.kind.value
    for tensor, name in zip(job.inputs, job.input_fields, strict=True):
        _check_finite(tensor, f"{prefix}.{name}")


def prepare(job: LossJob, *, check_scores: bool = True) -> PreparedJob:
    """Validates every value of a job and computes its row scales.

    Args:
        job: The decoded job.
        check_scores: Whether to scan the scores for NaN and Inf here. A GPU worker
            passes False: it flags non-finite rows on the device after the upload
            (cheaper than a host scan) and calls `check_scores_finite` for a flagged
            job, so the error is the same.

    Raises:
        InvalidInputError: naming the field and the first bad index.
    """
    kind = job.key.params.kind
    prefix = kind.value
    if check_scores:
        check_scores_finite(job)
    if job.class_weights is not None:
        _check_non_negative(job.class_weights, f"{prefix}.target_class_weights")
    # Checked whenever sent, even where the reduction ignores them: a bad weight is a bug.
    if job.sample_weights is not None:
        _check_non_negative(job.sample_weights, "sample_weights")

    labels = None
    if job.labels is not None:
        labels = _plus_minus_one(job.labels, job.options.label_zero_one, f"{prefix}.labels")

    targets, ignore_mask = None, None
    if job.targets is not None:
        targets, ignore_mask = _class_targets(job, f"{prefix}.targets")

    rows_per_set = SPECS[kind].set_rows(job.inputs)
    counted = job.rows if ignore_mask is None else job.rows - int(ignore_mask.sum())
    if counted == 0:
        raise InvalidInputError(f"{prefix}.targets", "every sample is ignored (ignore_index)")
    scales = _row_scales(job, rows_per_set, ignore_mask, counted)
    return PreparedJob(
        job=job,
        labels=labels,
        targets=targets,
        ignore_mask=ignore_mask,
        scales=scales,
        set_rows=tuple(rows_per_set),
        samples=counted,
    )


def prepare_batch(
    jobs: Sequence[LossJob], *, check_scores: bool = True
) -> list[PreparedJob | InvalidInputError]:
    """Validates a batch (jobs sharing a BatchKey); returns each job prepared or its error.

    Every check runs once over the batch's concatenated values. Where one fails, or
    where the jobs' options differ in a way the batch-wide checks do not cover, each
    job is prepared alone (`prepare`): the errors, fields and indices are those of
    that job alone, and the other jobs are prepared as usual.
    """
    together = _prepare_together(jobs, check_scores) if jobs else []
    if together is not None:
        return list(together)
    prepared: list[PreparedJob | InvalidInputError] = []
    for job in jobs:
        try:
            prepared.append(prepare(job, check_scores=check_scores))
        except InvalidInputError as error:
            prepared.append(error)
    return prepared


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _prepare_together(jobs: Sequence[LossJob], check_scores: bool) -> list[PreparedJob] | None:
    """Every job prepared at once, or None where a check fails or the options are mixed."""
    first = jobs[0]
    spec = SPECS[first.key.params.kind]
    if not _same_value_rules(jobs) or not _weights_and_scores_pass(jobs, check_scores):
        return None
    labels = _batch_labels(jobs)
    found = _batch_targets_split(jobs)
    if labels is None or found is None:
        return None
    targets, masks, ignored = found
    prepared = []
    for i, job in enumerate(jobs):
        rows_per_set = spec.set_rows(job.inputs)
        counted = job.rows - int(ignored[i])
        if counted == 0:
            return None
        prepared.append(
            PreparedJob(
                job=job,
                labels=labels[i],
                targets=targets[i],
                ignore_mask=masks[i],
                scales=_row_scales(job, rows_per_set, None, counted),
                set_rows=tuple(rows_per_set),
                samples=counted,
            )
        )
    return prepared


def _same_value_rules(jobs: Sequence[LossJob]) -> bool:
    """Whether one set of checks serves every job (weighted means go one by one)."""
    options = jobs[0].options
    return not any(
        job.options.label_zero_one != options.label_zero_one
        or job.options.ignore_index != options.ignore_index
        or job.options.reduction is Reduction.WEIGHTED_MEAN
        for job in jobs
    )


def _weights_and_scores_pass(jobs: Sequence[LossJob], check_scores: bool) -> bool:
    first = jobs[0]
    if check_scores:
        for k in range(len(first.inputs)):
            sums = [job.inputs[k].sum() for job in jobs]
            # A finite sum proves every element finite (as in _check_finite); one that
            # overflows sends the batch through the exact checks, job by job.
            total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
            if not math.isfinite(total.item()):
                return False
    if first.class_weights is not None and not _non_negative(first.class_weights):
        return False  # the weights are part of the BatchKey: every job has the same ones
    weights = [job.sample_weights for job in jobs if job.sample_weights is not None]
    return not weights or _non_negative(_joined(weights))


def _batch_labels(jobs: Sequence[LossJob]) -> list[torch.Tensor | None] | None:
    """Each job's labels as int8 +-1 from one check over the batch; None: one is bad."""
    first = jobs[0]
    if first.labels is None:
        return [None] * len(jobs)
    values = _joined([job.labels for job in jobs if job.labels is not None])
    values = values.to(torch.float64)
    low = 0.0 if first.options.label_zero_one else -1.0
    if bool(((values != low) & (values != 1.0)).any()):
        return None
    plus_minus = (values == 1.0).to(torch.int8).mul_(2).sub_(1)
    return list(torch.split(plus_minus, [_rows(job.labels) for job in jobs]))


_Targets = tuple[list[torch.Tensor | None], list[torch.Tensor | None], list[int]]


def _batch_targets_split(jobs: Sequence[LossJob]) -> _Targets | None:
    """Each job's targets, ignore mask and count of ignored rows, from one check."""
    first = jobs[0]
    none: list[torch.Tensor | None] = [None] * len(jobs)
    if first.targets is None:
        return none, list(none), [0] * len(jobs)
    joined = _joined([job.targets for job in jobs if job.targets is not None])
    if joined.dtype != torch.int64:
        joined = joined.to(torch.int64)
    found = _batch_targets(joined, first.key.trailing_shape[0], first.options)
    if found is None:
        return None
    all_targets, ignore_mask = found
    rows = [_rows(job.targets) for job in jobs]
    targets: list[torch.Tensor | None] = list(torch.split(all_targets, rows))
    if ignore_mask is None:
        return targets, list(none), [0] * len(jobs)
    # Ignored rows per job from one running count: no op per job.
    running = np.concatenate([[0], np.cumsum(ignore_mask.numpy(), dtype=np.int64)])
    ends = np.cumsum(rows)
    ignored = (running[ends] - running[ends - rows]).tolist()
    masks: list[torch.Tensor | None] = [
        m if n else None for m, n in zip(torch.split(ignore_mask, rows), ignored, strict=True)
    ]
    return targets, masks, ignored


def _rows(tensor: torch.Tensor | None) -> int:
    assert tensor is not None  # every job of a batch has the same inputs
    return int(tensor.shape[0])


def _non_negative(weights: torch.Tensor) -> bool:
    """Every weight finite and >= 0 (NaN fails both comparisons)."""
    return bool(((weights >= 0) & (weights < float("inf"))).all())


def _batch_targets(
    targets: torch.Tensor, classes: int, options: RequestOptions
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A batch's int64 targets (ignored ones 0) and ignore mask, or None if one is out of range."""
    ignore_index = options.ignore_index
    if ignore_index is None:  # two numpy reductions: no tensor operation
        values = targets.numpy()
        in_range = values.size == 0 or (values.min() >= 0 and values.max() < classes)
        return (targets, None) if in_range else None
    out_of_range = (targets < 0) | (targets >= classes)
    ignore_mask = targets == ignore_index
    if bool((out_of_range & ~ignore_mask).any()):
        return None
    if not bool(ignore_mask.any()):
        return targets, None
    return targets.masked_fill(ignore_mask, 0), ignore_mask


def _class_targets(job: LossJob, field: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert job.targets is not None
    classes = job.key.trailing_shape[0]
    targets = job.targets.to(torch.int64)
    ignore_index = job.options.ignore_index
    ignore_mask = None if ignore_index is None else targets == ignore_index
    out_of_range = (targets < 0) | (targets >= classes)
    if ignore_mask is not None:
        out_of_range &= ~ignore_mask
    bad = _first(out_of_range)
    if bad is not None:
        raise InvalidInputError(
            f"{field}[{bad}]", f"class {targets[bad].item()} is outside [0, {classes})"
        )
    if ignore_mask is not None and bool(ignore_mask.any()):
        targets = targets.masked_fill(ignore_mask, 0)
    else:
        ignore_mask = None
    return targets, ignore_mask


def _row_scales(
    job: LossJob,
    rows_per_set: list[int],
    ignore_mask: torch.Tensor | None,
    counted: int,
) -> tuple[float | torch.Tensor, ...]:
    reduction = job.options.reduction
    if reduction in (Reduction.SUM, Reduction.NONE):
        return tuple(1.0 for _ in rows_per_set)
    if reduction is Reduction.MEAN:
        if SPECS[job.key.params.kind].sums_set_means and not job.options.pooled_mean:
            return tuple(1.0 / rows for rows in rows_per_set)
        return tuple(1.0 / counted for _ in rows_per_set)
    # WEIGHTED_MEAN: weights over all samples (GAN: real then fake).
    assert job.sample_weights is not None
    weights = job.sample_weights.to(torch.float64)
    if ignore_mask is not None:
        weights = weights.masked_fill(ignore_mask, 0.0)
    # Divided by the largest first: a sum past float64's range (1e308 + 1e308) would
    # otherwise make every share 0.
    largest = float(weights.max())
    if largest > 0.0:
        weights = weights / largest
    total = float(weights.sum())
    if total <= 0.0:
        raise InvalidInputError("sample_weights", "the weights of the counted samples sum to 0")
    return tuple(part / total for part in torch.split(weights, rows_per_set))
