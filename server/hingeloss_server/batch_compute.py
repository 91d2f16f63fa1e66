"""Computes one batch: concatenate the jobs' rows, one kernel call, split and reduce per job.

Pure torch and no gRPC: this is what a worker thread runs. Every job's answer equals
the one it would get alone, since the kernels never mix rows and each job's
reduction sums only its own rows.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hingeloss import tensors
from hingeloss_server import fused, losses
from hingeloss_server.errors import InvalidInputError
from hingeloss_server.jobs import (
    INPUT_SETS,
    BatchInfo,
    FactoredRows,
    GradientFormat,
    JobResult,
    LossJob,
    LossKind,
    LossParams,
    SparseRows,
    WireArray,
)
from hingeloss_server.prepare import PreparedJob, check_scores_finite
from hingeloss_server.staging import DeviceStaging, HostLease

# Rows of each batch whose margins feed the margin histogram (a sample keeps it cheap).
MARGIN_SAMPLE_ROWS = 256


@dataclass
class BatchOutput:
    """Per-job results of a batch, plus batch-level facts for metrics."""

    results: list[JobResult | InvalidInputError]
    margins: torch.Tensor
    kind: LossKind


def compute_dtype(wire_dtype: int) -> torch.dtype:
    """float64 stays float64; every other float computes in float32."""
    return torch.float64 if tensors.torch_dtype(wire_dtype) == torch.float64 else torch.float32


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
    dtype = compute_dtype(key.wire_dtype)
    need_per_sample = any(p.job.options.return_per_sample for p in jobs)
    batch = _upload(jobs, dtype, staging)
    if _fusable(batch):
        computed = _compute_fused(batch, margin_rows, not scores_checked, staging)
    else:
        computed = _compute_eager(batch, margin_rows, not scores_checked)
    output = computed.output
    per_sample_wire = tuple(p.to(batch.wire) for p in output.per_sample) if need_per_sample else ()
    flags = _row_flags(output, per_sample_wire, computed.flags)
    grads_wire, margins = computed.grads_wire, computed.margins
    downloads = _download(staging, output, flags, margins, grads_wire, per_sample_wire)
    staging.wait()
    figures = downloads.read_figures()
    results = _split(jobs, figures, downloads, key.wire_dtype, dtype)
    kind = key.params.kind
    elapsed = time.perf_counter() - started
    info = BatchInfo(
        rows=sum(p.job.rows for p in jobs),
        requests=len(jobs),
        compute_s=elapsed,
        device=str(device),
    )
    for result in results:
        if isinstance(result, JobResult):
            result.batch = info
    return BatchOutput(results=results, margins=figures.margins, kind=kind)


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
        wire=tensors.torch_dtype(key.wire_dtype),
        inputs=inputs,
        scales=tuple(_row_scale(jobs, s, dtype, staging) for s in range(len(jobs[0].scales))),
        labels=labels,
        targets=targets,
        ignore_mask=_ignore_mask(jobs, staging),
        class_weights=class_weights,
        need_grad=any(p.job.options.gradient_format.dense for p in jobs),
        need_factors=any(p.job.options.gradient_format is GradientFormat.FACTORED for p in jobs),
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
    params = batch.params
    input_sets = INPUT_SETS[params.kind]
    inputs = tuple(x.to(batch.dtype) for x in batch.inputs)
    labels = None if batch.labels is None else batch.labels.to(batch.dtype)
    # Before ignored rows are masked: a NaN is refused there too, as on the host.
    flags = _scores_flags(inputs, input_sets, check_scores)
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
        flags[input_sets[k]] |= _not_finite_rows(grad).to(torch.uint8) * _GRAD_OVERFLOW
    if not grads_wire:
        # A factored row overflows the wire dtype exactly where its largest entry does.
        for k, factors in enumerate(output.factors):
            overflow = ~torch.isfinite(factors.peak.to(batch.wire))
            flags[input_sets[k]] |= overflow.to(torch.uint8) * _GRAD_OVERFLOW
    margins = _sample_margins(params.kind, inputs, labels, batch.targets, margin_rows)
    return _Computed(output, grads_wire, flags, margins)


def _compute_fused(
    batch: _DeviceBatch, margin_rows: int, check_scores: bool, staging: DeviceStaging
) -> _Computed:
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
    flags = result.grad_not_finite.to(torch.uint8) * _GRAD_OVERFLOW
    if check_scores:
        flags |= result.scores_not_finite.to(torch.uint8) * _SCORES_NOT_FINITE
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


# Bits of the per-row flags (one value per row of each sample set).
_LOSS_OVERFLOW = 1  # the loss in the compute dtype
_GRAD_OVERFLOW = 2  # the gradient in the wire dtype (matters to jobs that asked for it)
_PER_SAMPLE_OVERFLOW = 4  # the per-sample loss in the wire dtype (likewise)
_SCORES_NOT_FINITE = 8  # a score input holds NaN or Inf (only where not checked on the host)


def _row_flags(
    output: losses.LossOutput,
    per_sample_wire: tuple[torch.Tensor, ...],
    flags: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Per row of each sample set, which of the things that can go wrong did (bit set).

    Adds to what the kernel step found (scores, gradients) the losses' own overflow.
    Computed on the device with a few vectorised passes and never read there: the
    host reads them with the losses, after the batch's one wait.
    """
    for s, loss in enumerate(output.per_sample):
        flags[s] |= (~torch.isfinite(loss)).to(torch.uint8) * _LOSS_OVERFLOW
    for s, wire in enumerate(per_sample_wire):
        flags[s] |= (~torch.isfinite(wire)).to(torch.uint8) * _PER_SAMPLE_OVERFLOW
    return flags


def _scores_flags(
    inputs: tuple[torch.Tensor, ...], input_sets: tuple[int, ...], check: bool
) -> list[torch.Tensor]:
    """Zeroed flags per sample set, with _SCORES_NOT_FINITE on non-finite rows if `check`."""
    flags = [
        torch.zeros(
            int(inputs[input_sets.index(s)].shape[0]), dtype=torch.uint8, device=inputs[0].device
        )
        for s in range(max(input_sets) + 1)
    ]
    if check:
        for k, scores in enumerate(inputs):
            flags[input_sets[k]] |= _not_finite_rows(scores).to(torch.uint8) * _SCORES_NOT_FINITE
    return flags


def _not_finite_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Rows holding a NaN or Inf: one pass, no (N, C) temporary (the max norm keeps NaN)."""
    if tensor.dim() == 1:
        return ~torch.isfinite(tensor)
    return ~torch.isfinite(torch.linalg.vector_norm(tensor, ord=float("inf"), dim=1))


@dataclass
class _Figures:
    """The per-row figures of a batch on the host, one array per sample set."""

    per_sample: list[np.ndarray[Any, Any]]
    active: list[np.ndarray[Any, Any]]
    flags: list[np.ndarray[Any, Any]]
    margins: torch.Tensor


# On CUDA a row's activity travels in its flags byte, beside the overflow bits.
_ACTIVE = 16


@dataclass
class Downloads:
    """The batch's host copies, started; read only after the batch's wait.

    On CUDA the figures are one byte buffer: per-sample losses and margins in the
    compute dtype, then one flags byte per row (activity included): 5 bytes a row
    at float32, one copy. On the CPU they are the tensors themselves.
    """

    figures: list[torch.Tensor]
    set_sizes: list[int]
    dtype: torch.dtype
    grads: tuple[torch.Tensor, ...]
    per_sample: tuple[torch.Tensor, ...]
    lease: HostLease | None
    # Per score input with a factored gradient: its packed mask and its row values.
    factors: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def read_figures(self) -> _Figures:
        n = len(self.set_sizes)
        if len(self.figures) > 1:  # the CPU: as computed
            pieces = self.figures
            return _Figures(
                per_sample=[t.numpy() for t in pieces[:n]],
                active=[t.numpy() for t in pieces[n : 2 * n]],
                flags=[t.numpy() for t in pieces[2 * n : 3 * n]],
                margins=pieces[3 * n],
            )
        packed = self.figures[0]
        rows = sum(self.set_sizes)
        values_bytes = packed.numel() - rows
        values = packed[:values_bytes].view(self.dtype)
        flags = [t.numpy() for t in torch.split(packed[values_bytes:], self.set_sizes)]
        return _Figures(
            per_sample=[t.numpy() for t in torch.split(values[:rows], self.set_sizes)],
            active=[(f & _ACTIVE) != 0 for f in flags],
            flags=flags,
            margins=values[rows:],
        )


def pack_figures(
    per_sample: Sequence[torch.Tensor],
    active: Sequence[torch.Tensor],
    flags: Sequence[torch.Tensor],
    margins: torch.Tensor,
) -> torch.Tensor:
    """One byte buffer: losses and margins in their dtype, then a flags byte per row."""
    values = torch.cat([*per_sample, margins]).view(torch.uint8)
    bits = [f | a.to(torch.uint8) * _ACTIVE for f, a in zip(flags, active, strict=True)]
    return torch.cat([values, *bits])


def _download(
    staging: DeviceStaging,
    output: losses.LossOutput,
    flags: list[torch.Tensor],
    margins: torch.Tensor,
    grads_wire: tuple[torch.Tensor, ...],
    per_sample_wire: tuple[torch.Tensor, ...],
) -> Downloads:
    """Starts every device-to-host copy of the batch; on CUDA the figures go packed in one."""
    dtype = output.per_sample[0].dtype
    if staging.cuda:
        figures = [pack_figures(output.per_sample, output.active, flags, margins)]
    else:
        figures = [*output.per_sample, *output.active, *flags, margins]
    factors = [t for f in output.factors for t in (f.mask_bits, f.values)]
    hosts, lease = staging.download([*figures, *grads_wire, *per_sample_wire, *factors])
    grads_end = len(figures) + len(grads_wire)
    per_sample_end = grads_end + len(per_sample_wire)
    factor_hosts = hosts[per_sample_end:]
    return Downloads(
        figures=hosts[: len(figures)],
        set_sizes=[int(p.shape[0]) for p in output.per_sample],
        dtype=dtype,
        grads=tuple(hosts[len(figures) : grads_end]),
        per_sample=tuple(hosts[grads_end:per_sample_end]),
        lease=lease,
        factors=tuple(zip(factor_hosts[::2], factor_hosts[1::2], strict=True)),
    )


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


def _split(
    jobs: Sequence[PreparedJob],
    figures: _Figures,
    downloads: Downloads,
    wire_dtype: int,
    dtype: torch.dtype,
) -> list[JobResult | InvalidInputError]:
    """Splits the batch's host figures per job and reduces each job's rows.

    Each job's loss is the correctly rounded sum (math.fsum) of its own scaled
    per-sample terms: the same bits whatever else shares the batch and in whatever
    order a device would have added them.
    """
    kind = jobs[0].job.key.params.kind
    input_sets = INPUT_SETS[kind]
    results: list[JobResult | InvalidInputError] = []
    offsets = [0] * len(figures.per_sample)
    for prepared in jobs:
        spans = []
        for s, rows in enumerate(prepared.set_rows):
            spans.append(slice(offsets[s], offsets[s] + rows))
            offsets[s] += rows
        loss = _job_loss(prepared, figures, spans)
        error = _job_error(prepared, figures, spans, input_sets, wire_dtype, loss)
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
                _encode_grad(
                    downloads.grads[k][spans[input_sets[k]]], wire_dtype, options.gradient_format
                )
                for k in range(len(downloads.grads))
            )
        per_sample_arrays: tuple[WireArray, ...] = ()
        if options.return_per_sample:
            per_sample_arrays = tuple(
                _wire(downloads.per_sample[s][span], wire_dtype) for s, span in enumerate(spans)
            )
        results.append(
            JobResult(
                loss=loss,
                grads=grads,
                per_sample=per_sample_arrays,
                samples=prepared.samples,
                active=sum(int(figures.active[s][span].sum()) for s, span in enumerate(spans)),
                batch=BatchInfo(rows=0, requests=0, compute_s=0.0, device=""),
                compute_dtype=dtype,
                host_lease=downloads.lease,
            )
        )
    return results


def _job_loss(prepared: PreparedJob, figures: _Figures, spans: list[slice]) -> float:
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


def _job_error(
    prepared: PreparedJob,
    figures: _Figures,
    spans: list[slice],
    input_sets: tuple[int, ...],
    wire_dtype: int,
    loss: float,
) -> InvalidInputError | None:
    """The job's error from its rows' flags: scores not finite, or an overflow it would see.

    Only what the job receives may overflow: its loss (compute dtype, and the float64
    total), and the gradient or per-sample losses in the wire dtype if it asked for them.
    """
    job = prepared.job
    options = job.options
    counted = _LOSS_OVERFLOW
    if options.gradient_format is not GradientFormat.NONE:
        counted |= _GRAD_OVERFLOW
    if options.return_per_sample:
        counted |= _PER_SAMPLE_OVERFLOW
    flagged = [figures.flags[s][span].astype(np.uint8) for s, span in enumerate(spans)]
    if any(bool((f & _SCORES_NOT_FINITE).any()) for f in flagged):
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
    torch_wire = tensors.torch_dtype(wire_dtype)
    return InvalidInputError(
        f"{kind.value}.{field}{where}",
        "overflow: the hinge term or its gradient exceeds the range of "
        f"{str(torch_wire).removeprefix('torch.')}",
    )


def _wire(tensor: torch.Tensor, wire_dtype: int) -> WireArray:
    shape = tuple(int(d) for d in tensor.shape)
    # Bytes as uint8 (bfloat16 included, which numpy lacks), viewed, not copied.
    raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
    return WireArray(dtype=wire_dtype, shape=shape, data=raw.data)


def _factored_rows(bits: torch.Tensor, values: torch.Tensor, job: LossJob) -> FactoredRows:
    """One job's rows of a factored gradient, viewed, not copied."""
    return FactoredRows(
        dense_shape=(int(bits.shape[0]), *job.key.trailing_shape),
        dtype=job.key.wire_dtype,
        mask=bits.contiguous().reshape(-1).numpy().data,
        values=_wire(values, tensors.wire_dtype_of_torch(values.dtype)),
    )


def _encode_grad(
    grad: torch.Tensor, wire_dtype: int, gradient_format: GradientFormat
) -> WireArray | SparseRows:
    if gradient_format is GradientFormat.DENSE:
        return _wire(grad, wire_dtype)
    nonzero = grad != 0
    if nonzero.dim() == 2:
        nonzero = nonzero.any(dim=1)
    rows = torch.nonzero(nonzero).squeeze(1)
    return SparseRows(
        dense_shape=tuple(int(d) for d in grad.shape),
        indices=_wire(rows.to(torch.int64), tensors.BY_NAME["int64"].wire),
        values=_wire(grad.index_select(0, rows), wire_dtype),
    )
