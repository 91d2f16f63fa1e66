"""Computes one batch: concatenate the jobs' rows, one kernel call, split and reduce per job.

Pure torch and no gRPC: this is what a worker thread runs. Every job's answer equals
the one it would get alone, since the kernels never mix rows and each job's
reduction sums only its own rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hingeloss_server.config import MARGIN_SAMPLE_ROWS
from hingeloss_server.engine import fused, losses
from hingeloss_server.engine.answers import split
from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.engine.figures import download
from hingeloss_server.engine.jobs import (
    INPUT_SETS,
    BatchInfo,
    GradientFormat,
    JobResult,
    LossKind,
    LossParams,
)
from hingeloss_server.engine.row_flags import (
    GRAD_OVERFLOW,
    SCORES_NOT_FINITE,
    not_finite_rows,
    row_flags,
    scores_flags,
)
from hingeloss_server.engine.staging import DeviceStaging
from hingeloss_server.engine.validation import PreparedJob


@dataclass
class BatchOutput:
    """Per-job results of a batch, plus batch-level facts for metrics."""

    results: list[JobResult | InvalidInputError]
    margins: torch.Tensor
    kind: LossKind


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_batch(
    jobs: Sequence[PreparedJob],
    device: torch.device,
    margin_rows: int = MARGIN_SAMPLE_ROWS,
    staging: DeviceStaging | None = None,
    *,
    scores_checked: bool = True,
) -> BatchOutput:
    """Computes every job of a batch (all with the same BatchKey) on `device`.

    On CUDA the host waits for the device once: per-row figures (losses, activity,
    overflow flags, margins) come back packed in one tensor, beside the gradients.

    Args:
        jobs: The batch, validated.
        device: Where to compute.
        margin_rows: Rows of the batch (0: none) whose margins feed the metrics.
        staging: The worker's transfers (pinned buffers, cached class weights); a
            throwaway one with pageable memory when None.
        scores_checked: False where `prepare` left the finiteness of the scores to
            this batch (GPU workers): rows are flagged on the device, and a flagged
            job gets the same error as the host check would give.
    """
    started = time.perf_counter()
    staging = staging if staging is not None else DeviceStaging(device)
    staging.begin()
    key = jobs[0].job.key
    dtype = compute_dtype(key.dtype)
    need_per_sample = any(p.job.options.return_per_sample for p in jobs)
    batch = _upload(jobs, dtype, staging)
    if _fusable(batch):
        computed = _compute_fused(batch, margin_rows, not scores_checked, staging)
    else:
        computed = _compute_eager(batch, margin_rows, not scores_checked)
    output = computed.output
    per_sample_wire = tuple(p.to(batch.wire) for p in output.per_sample) if need_per_sample else ()
    flags = row_flags(output, per_sample_wire, computed.flags)
    grads_wire, margins = computed.grads_wire, computed.margins
    downloads = download(staging, output, flags, margins, grads_wire, per_sample_wire)
    staging.wait()
    info = BatchInfo(
        rows=sum(p.job.rows for p in jobs),
        requests=len(jobs),
        compute_s=time.perf_counter() - started,
        device=str(device),
    )
    figures = downloads.read_figures()
    results = split(jobs, figures, downloads, dtype, info)
    return BatchOutput(results=results, margins=figures.margins, kind=key.params.kind)


@dataclass
class _DeviceBatch:
    """A batch's inputs on the device: scores in the wire dtype, the rest ready for kernels."""

    params: LossParams
    dtype: torch.dtype
    wire: torch.dtype
    inputs: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None
    targets: torch.Tensor | None
    ignore_mask: torch.Tensor | None
    class_weights: torch.Tensor | None
    # Some job reads the dense gradient (DENSE, ROW_SPARSE); some reads it factored.
    need_grad: bool
    need_factors: bool
    host_reads_free: bool


@dataclass
class _Computed:
    """A kernel's output, its gradients in the wire dtype, flags found so far, margins."""

    output: losses.LossOutput
    grads_wire: tuple[torch.Tensor, ...]
    flags: list[torch.Tensor]
    margins: torch.Tensor


def _upload(
    jobs: Sequence[PreparedJob], dtype: torch.dtype, staging: DeviceStaging
) -> _DeviceBatch:
    """Every input of the batch on the device, concatenated: the batch's only uploads."""
    key = jobs[0].job.key
    params = key.params
    inputs = tuple(
        staging.upload([p.job.inputs[k] for p in jobs]) for k in range(len(jobs[0].job.inputs))
    )
    labels = None  # int8 on the device; the eager kernels take them in the compute dtype
    if jobs[0].labels is not None:
        labels = staging.upload([p.labels for p in jobs if p.labels is not None])
    targets = None
    if jobs[0].targets is not None:
        targets = staging.upload([p.targets for p in jobs if p.targets is not None])
    class_weights = None
    if jobs[0].job.class_weights is not None:
        weights = jobs[0].job.class_weights
        class_weights = staging.cached(
            (params.class_weights, dtype), lambda: weights.to(dtype=dtype)
        )
    return _DeviceBatch(
        params=params,
        dtype=dtype,
        wire=key.dtype,
        inputs=inputs,
        scales=tuple(_row_scale(jobs, s, dtype, staging) for s in range(len(jobs[0].scales))),
        labels=labels,
        targets=targets,
        ignore_mask=_ignore_mask(jobs, staging),
        class_weights=class_weights,
        need_grad=any(p.job.options.gradient_format.dense for p in jobs),
        need_factors=any(p.job.options.gradient_format is GradientFormat.FACTORED for p in jobs),
        host_reads_free=staging.host_reads_free,
    )


def _fusable(batch: _DeviceBatch) -> bool:
    """Binary hinge, and Weston-Watkins with enough classes, run fused on CUDA with Triton.

    A batch with a factored gradient runs eager: the fused kernels write no mask.
    """
    if not fused.AVAILABLE or batch.inputs[0].device.type != "cuda" or batch.need_factors:
        return False
    kind = batch.params.kind
    if kind is LossKind.MULTICLASS_HINGE:
        return int(batch.inputs[0].shape[1]) >= fused.MIN_CLASSES
    return kind is LossKind.BINARY_HINGE


def _compute_eager(batch: _DeviceBatch, margin_rows: int, check_scores: bool) -> _Computed:
    """The closed-form kernels of losses.py (every loss, any device), then the flag passes."""
    params = batch.params
    input_sets = INPUT_SETS[params.kind]
    inputs = tuple(x.to(batch.dtype) for x in batch.inputs)
    labels = None if batch.labels is None else batch.labels.to(batch.dtype)
    # Before ignored rows are masked: a NaN is refused there too, as on the host.
    flags = scores_flags(inputs, input_sets, check_scores)
    if batch.ignore_mask is not None:
        # Ignored rows contribute nothing, whatever their scores: not even an overflow.
        inputs = (inputs[0].masked_fill(batch.ignore_mask.unsqueeze(1), 0.0),)
    output = _run_kernel(
        params.kind,
        params,
        inputs,
        labels,
        batch.targets,
        batch.ignore_mask,
        batch.class_weights,
        batch.scales,
        batch.need_grad,
        batch.need_factors,
    )
    grads_wire = tuple(g.to(batch.wire) for g in output.grads)
    for k, grad in enumerate(grads_wire):
        bad = not_finite_rows(grad, reads_free=batch.host_reads_free)
        flags[input_sets[k]] |= bad.to(torch.uint8) * GRAD_OVERFLOW
    if not grads_wire:
        # A factored row overflows the wire dtype exactly where its largest entry does.
        for k, factors in enumerate(output.factors):
            overflow = ~torch.isfinite(factors.peak.to(batch.wire))
            flags[input_sets[k]] |= overflow.to(torch.uint8) * GRAD_OVERFLOW
    margins = _sample_margins(params.kind, inputs, labels, batch.targets, margin_rows)
    return _Computed(output, grads_wire, flags, margins)


def _compute_fused(
    batch: _DeviceBatch, margin_rows: int, check_scores: bool, staging: DeviceStaging
) -> _Computed:
    """One Triton kernel (fused.py): loss, gradient in the wire dtype and flags in one pass."""
    params = batch.params
    scores = batch.inputs[0]
    margin = staging.cached(
        ("margin", params.margin, batch.dtype),
        lambda: torch.tensor([params.margin], dtype=batch.dtype),
    )
    head = scores[:margin_rows].to(batch.dtype)
    if params.kind is LossKind.BINARY_HINGE:
        assert batch.labels is not None
        result = fused.binary_hinge(
            scores,
            batch.labels,
            margin=margin,
            power=params.power,
            kink_one=params.kink_one,
            row_scale=batch.scales[0],
            grad_dtype=batch.wire,
            need_grad=batch.need_grad,
        )
        labels = batch.labels[:margin_rows].to(batch.dtype)
        margins = _sample_margins(params.kind, (head,), labels, None, margin_rows)
    else:
        targets = batch.targets
        assert targets is not None
        result = fused.weston_watkins(
            scores,
            targets,
            margin=margin,
            power=params.power,
            kink_one=params.kink_one,
            factor=fused.row_factor(
                targets,
                num_classes=int(scores.shape[1]),
                dtype=batch.dtype,
                class_weights=batch.class_weights,
                divide_by_num_classes=params.divide_by_num_classes,
                ignore_mask=batch.ignore_mask,
            ),
            row_scale=batch.scales[0],
            ignore_mask=batch.ignore_mask,
            grad_dtype=batch.wire,
            need_grad=batch.need_grad,
        )
        if batch.ignore_mask is not None:
            head = head.masked_fill(batch.ignore_mask[:margin_rows].unsqueeze(1), 0.0)
        margins = _sample_margins(params.kind, (head,), None, targets, margin_rows)
    flags = result.grad_not_finite.to(torch.uint8) * GRAD_OVERFLOW
    if check_scores:
        flags |= result.scores_not_finite.to(torch.uint8) * SCORES_NOT_FINITE
    grads = () if result.grad is None else (result.grad,)
    output = losses.LossOutput(
        per_sample=(result.per_sample,), grads=grads, active=(result.active,)
    )
    return _Computed(output, grads, [flags], margins)


def _row_scale(
    jobs: Sequence[PreparedJob], set_index: int, dtype: torch.dtype, staging: DeviceStaging
) -> torch.Tensor:
    """r_i of one sample set for every row of the batch, in the compute dtype.

    Where each job has one scale for all its rows (every reduction but WEIGHTED_MEAN),
    only one value and one count per job travel; the rows are filled on the device.
    """
    scales = [p.scales[set_index] for p in jobs]
    rows = [p.set_rows[set_index] for p in jobs]
    if len(jobs) == 1 and isinstance(scales[0], float):  # filled where it is used
        return torch.full((rows[0],), scales[0], dtype=dtype, device=staging.device)
    if all(isinstance(s, float) for s in scales):
        values = torch.tensor(scales, dtype=torch.float64).to(dtype)
        counts = torch.tensor(rows, dtype=torch.int64)
        return torch.repeat_interleave(
            staging.upload([values]), staging.upload([counts]), output_size=sum(rows)
        )
    parts = [
        torch.full((n,), s, dtype=dtype) if isinstance(s, float) else s.to(dtype)
        for s, n in zip(scales, rows, strict=True)
    ]
    return staging.upload(parts)


def _ignore_mask(jobs: Sequence[PreparedJob], staging: DeviceStaging) -> torch.Tensor | None:
    if all(p.ignore_mask is None for p in jobs):
        return None
    parts = [
        p.ignore_mask if p.ignore_mask is not None else torch.zeros(p.job.rows, dtype=torch.bool)
        for p in jobs
    ]
    return staging.upload(parts)


def _run_kernel(
    kind: LossKind,
    params: LossParams,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor | None,
    targets: torch.Tensor | None,
    ignore_mask: torch.Tensor | None,
    class_weights: torch.Tensor | None,
    scales: tuple[torch.Tensor, ...],
    need_grad: bool,
    need_factors: bool,
) -> losses.LossOutput:
    if kind is LossKind.BINARY_HINGE:
        assert labels is not None
        return losses.binary_hinge(
            inputs[0],
            labels,
            margin=params.margin,
            power=params.power,
            kink_one=params.kink_one,
            row_scale=scales[0],
            need_grad=need_grad,
        )
    if kind is LossKind.MULTICLASS_HINGE:
        assert targets is not None
        return losses.multiclass_hinge(
            inputs[0],
            targets,
            margin=params.margin,
            power=params.power,
            kink_one=params.kink_one,
            class_weights=class_weights,
            divide_by_num_classes=params.divide_by_num_classes,
            row_scale=scales[0],
            ignore_mask=ignore_mask,
            need_grad=need_grad,
            need_factors=need_factors,
        )
    if kind is LossKind.CRAMMER_SINGER:
        assert targets is not None
        return losses.crammer_singer(
            inputs[0],
            targets,
            margin=params.margin,
            power=params.power,
            kink_one=params.kink_one,
            split_ties=params.split_ties,
            row_scale=scales[0],
            need_grad=need_grad,
            need_factors=need_factors,
        )
    if kind is LossKind.GAN_DISCRIMINATOR:
        return losses.gan_discriminator(
            inputs[0],
            inputs[1],
            kink_one=params.kink_one,
            real_scale=scales[0],
            fake_scale=scales[1],
            need_grad=need_grad,
        )
    if kind is LossKind.GAN_GENERATOR:
        return losses.gan_generator(inputs[0], row_scale=scales[0], need_grad=need_grad)
    assert labels is not None
    return losses.margin_ranking(
        inputs[0],
        inputs[1],
        labels,
        margin=params.margin,
        kink_one=params.kink_one,
        row_scale=scales[0],
        need_grad=need_grad,
    )


def _sample_margins(
    kind: LossKind,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor | None,
    targets: torch.Tensor | None,
    rows: int,
) -> torch.Tensor:
    """Signed margins of the first rows of the batch (positive: on the right side)."""
    if rows == 0:
        return inputs[0].new_empty(0)
    if kind is LossKind.BINARY_HINGE:
        assert labels is not None
        return inputs[0][:rows] * labels[:rows]
    if kind in (LossKind.MULTICLASS_HINGE, LossKind.CRAMMER_SINGER):
        assert targets is not None
        scores, target = inputs[0][:rows], targets[:rows].unsqueeze(1)
        true = scores.gather(1, target).squeeze(1)
        others = scores.scatter(1, target, float("-inf")).amax(dim=1)
        return true - others
    if kind is LossKind.GAN_DISCRIMINATOR:
        half = rows // 2
        return torch.cat([inputs[0][:half], -inputs[1][:half]])
    if kind is LossKind.GAN_GENERATOR:
        return inputs[0][:rows]
    assert labels is not None
    return (inputs[0][:rows] - inputs[1][:rows]) * labels[:rows]
