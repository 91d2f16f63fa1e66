"""Computes one batch: concatenate the jobs' rows, one kernel call, split and reduce per job.

Pure torch and no gRPC: this is what a worker thread runs. Every job's answer equals
the one it would get alone, since the kernels never mix rows and each job's
reduction sums only its own rows. The loss's LossSpec (losses/) supplies its
kernel, its fused kernel where one exists, and the margins the metrics sample.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hingeloss_server.config import MARGIN_SAMPLE_ROWS
from hingeloss_server.engine import fused
from hingeloss_server.engine.answers import split
from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.engine.figures import download
from hingeloss_server.engine.jobs import BatchInfo, GradientFormat, JobResult, LossKind
from hingeloss_server.engine.losses import SPECS, LossOutput, LossSpec
from hingeloss_server.engine.losses.spec import DeviceBatch, KernelBatch
from hingeloss_server.engine.row_flags import (
    GRAD_OVERFLOW,
    SCORES_NOT_FINITE,
    flag_not_finite,
    row_flags,
    scores_flags,
)
from hingeloss_server.engine.staging import DeviceStaging
from hingeloss_server.engine.validation import PreparedJob


@dataclass
class BatchOutput:
    """Per-job results of a batch, plus batch-level facts for metrics."""

    results: list[JobResult | InvalidInputError]
    # float64, made on the worker's thread: the event loop runs no tensor operation for them.
    margins: np.ndarray[Any, Any]
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
    spec = SPECS[key.params.kind]
    if _fusable(batch, spec):
        computed = _compute_fused(batch, spec, margin_rows, not scores_checked, staging)
    else:
        computed = _compute_eager(batch, spec, margin_rows, not scores_checked)
    output = computed.output
    per_sample_wire = tuple(p.to(batch.wire) for p in output.per_sample) if need_per_sample else ()
    flags = row_flags(output, per_sample_wire, computed.flags, reads_free=staging.host_reads_free)
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
    margins = figures.margins
    sampled = margins.to(torch.float64).numpy() if margins.numel() else np.empty(0)
    return BatchOutput(results=results, margins=sampled, kind=spec.kind)


@dataclass
class _Computed:
    """A kernel's output, its gradients in the wire dtype, flags found so far, margins."""

    output: LossOutput
    grads_wire: tuple[torch.Tensor, ...]
    flags: list[torch.Tensor]
    margins: torch.Tensor


def _upload(jobs: Sequence[PreparedJob], dtype: torch.dtype, staging: DeviceStaging) -> DeviceBatch:
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
    return DeviceBatch(
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


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)`, without a call into torch where it would change nothing."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _fusable(batch: DeviceBatch, spec: LossSpec) -> bool:
    """Whether the loss's Triton kernel serves the batch (CUDA, Triton, enough classes).

    A batch with a factored gradient runs eager: the fused kernels write no mask.
    """
    scores = batch.inputs[0]
    if spec.fused is None or not fused.AVAILABLE or scores.device.type != "cuda":
        return False
    if batch.need_factors:
        return False
    return scores.dim() == 1 or int(scores.shape[1]) >= spec.fused.min_classes


def _kernel_batch(batch: DeviceBatch, inputs: tuple[torch.Tensor, ...]) -> KernelBatch:
    """The batch as an eager kernel takes it: these inputs, labels in the compute dtype."""
    labels = None if batch.labels is None else batch.labels[: inputs[0].shape[0]]
    return KernelBatch(
        params=batch.params,
        inputs=inputs,
        labels=None if labels is None else labels.to(batch.dtype),
        targets=batch.targets,
        ignore_mask=batch.ignore_mask,
        class_weights=batch.class_weights,
        scales=batch.scales,
        need_grad=batch.need_grad,
        need_factors=batch.need_factors,
    )


def _masked(batch: DeviceBatch, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Ignored rows (ignore_index) zeroed: they contribute nothing, not even an overflow."""
    if batch.ignore_mask is None:
        return inputs
    rows = int(inputs[0].shape[0])
    return (inputs[0].masked_fill(batch.ignore_mask[:rows].unsqueeze(1), 0.0), *inputs[1:])


def _sample_margins(spec: LossSpec, batch: KernelBatch, rows: int) -> torch.Tensor:
    """Signed margins of the first rows of the batch (positive: on the right side)."""
    if rows == 0:
        return batch.inputs[0].new_empty(0)
    return spec.margins(batch, rows)


def _compute_eager(
    batch: DeviceBatch, spec: LossSpec, margin_rows: int, check_scores: bool
) -> _Computed:
    """The loss's closed-form kernel (every loss, any device), then the flag passes."""
    input_sets = spec.input_sets
    inputs = tuple(_as(x, batch.dtype) for x in batch.inputs)
    # Before ignored rows are masked: a NaN is refused there too, as on the host.
    flags = scores_flags(inputs, input_sets, check_scores)
    kernel_batch = _kernel_batch(batch, _masked(batch, inputs))
    output = spec.kernel(kernel_batch)
    grads_wire = tuple(_as(g, batch.wire) for g in output.grads)
    for k, grad in enumerate(grads_wire):
        flag_not_finite(flags[input_sets[k]], grad, GRAD_OVERFLOW, reads_free=batch.host_reads_free)
    if not grads_wire:
        # A factored row overflows the wire dtype exactly where its largest entry does.
        for k, factors in enumerate(output.factors):
            overflow = ~torch.isfinite(factors.peak.to(batch.wire))
            flags[input_sets[k]] |= overflow.to(torch.uint8) * GRAD_OVERFLOW
    margins = _sample_margins(spec, kernel_batch, margin_rows)
    return _Computed(output, grads_wire, flags, margins)


def _compute_fused(
    batch: DeviceBatch,
    spec: LossSpec,
    margin_rows: int,
    check_scores: bool,
    staging: DeviceStaging,
) -> _Computed:
    """The loss's Triton kernel (fused.py): loss, gradient in the wire dtype and flags at once."""
    assert spec.fused is not None
    params = batch.params
    margin = staging.cached(
        ("margin", params.margin, batch.dtype),
        lambda: torch.tensor([params.margin], dtype=batch.dtype),
    )
    result = spec.fused.run(batch, margin)
    heads = _masked(batch, tuple(x[:margin_rows].to(batch.dtype) for x in batch.inputs))
    margins = _sample_margins(spec, _kernel_batch(batch, heads), margin_rows)
    flags = result.grad_not_finite.to(torch.uint8) * GRAD_OVERFLOW
    if check_scores:
        flags |= result.scores_not_finite.to(torch.uint8) * SCORES_NOT_FINITE
    grads = () if result.grad is None else (result.grad,)
    output = LossOutput(per_sample=(result.per_sample,), grads=grads, active=(result.active,))
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
