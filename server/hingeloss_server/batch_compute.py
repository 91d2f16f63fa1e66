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

from hingeloss import tensors
from hingeloss_server import losses
from hingeloss_server.errors import InvalidInputError
from hingeloss_server.jobs import (
    BatchInfo,
    GradientFormat,
    JobResult,
    LossKind,
    LossParams,
    SparseRows,
    WireArray,
)
from hingeloss_server.prepare import PreparedJob

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


class _Staging:
    """Moves host tensors to the device: pinned memory and non-blocking copies on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def cat(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        host = parts[0] if len(parts) == 1 else torch.cat(list(parts))
        if not self.cuda:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)


def compute_batch(
    jobs: Sequence[PreparedJob], device: torch.device, margin_rows: int = MARGIN_SAMPLE_ROWS
) -> BatchOutput:
    """Computes every job of a batch (all with the same BatchKey) on `device`.

    `margin_rows` rows of the batch (0: none) report their margins for the metrics.
    """
    started = time.perf_counter()
    key = jobs[0].job.key
    params = key.params
    kind = params.kind
    dtype = compute_dtype(key.wire_dtype)
    staging = _Staging(device)
    need_grad = any(p.job.options.gradient_format is not GradientFormat.NONE for p in jobs)

    inputs = tuple(
        staging.cat([p.job.inputs[k] for p in jobs]).to(dtype)
        for k in range(len(jobs[0].job.inputs))
    )
    n_sets = len(jobs[0].scales)
    scales64 = tuple(staging.cat([p.scales[s] for p in jobs]) for s in range(n_sets))
    scales = tuple(s.to(dtype) for s in scales64)
    labels = (
        staging.cat([p.labels for p in jobs if p.labels is not None]).to(dtype)
        if (jobs[0].labels is not None)
        else None
    )
    targets = (
        staging.cat([p.targets for p in jobs if p.targets is not None])
        if (jobs[0].targets is not None)
        else None
    )
    ignore_mask = _ignore_mask(jobs, staging)
    class_weights = (
        None
        if jobs[0].job.class_weights is None
        else jobs[0].job.class_weights.to(device=device, dtype=dtype)
    )

    output = _run_kernel(
        kind, params, inputs, labels, targets, ignore_mask, class_weights, scales, need_grad
    )
    margins = _sample_margins(kind, inputs, labels, targets, margin_rows)
    results = _split(jobs, output, scales64, inputs, key.wire_dtype, dtype)
    if staging.cuda:
        torch.cuda.current_stream(device).synchronize()
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
    return BatchOutput(results=results, margins=margins.cpu(), kind=kind)


def _ignore_mask(jobs: Sequence[PreparedJob], staging: _Staging) -> torch.Tensor | None:
    if all(p.ignore_mask is None for p in jobs):
        return None
    parts = [
        p.ignore_mask if p.ignore_mask is not None else torch.zeros(p.job.rows, dtype=torch.bool)
        for p in jobs
    ]
    return staging.cat(parts)


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
    output: losses.LossOutput,
    scales64: tuple[torch.Tensor, ...],
    inputs: tuple[torch.Tensor, ...],
    wire_dtype: int,
    dtype: torch.dtype,
) -> list[JobResult | InvalidInputError]:
    """Splits the kernel's output per job: reductions on the device, one copy to the host."""
    kind = jobs[0].job.key.params.kind
    n_jobs = len(jobs)
    device = inputs[0].device
    torch_wire = tensors.torch_dtype(wire_dtype)
    # Per-job sums of scale * per_sample and of active rows via one index_add per set.
    losses64 = torch.zeros(n_jobs, dtype=torch.float64, device=device)
    active = torch.zeros(n_jobs, dtype=torch.int64, device=device)
    bad_rows = torch.zeros(n_jobs, dtype=torch.int64, device=device)
    set_sizes = [[int(p.scales[s].shape[0]) for p in jobs] for s in range(len(scales64))]
    owners = [_owners(sizes, device) for sizes in set_sizes]
    for s, per_sample in enumerate(output.per_sample):
        losses64.index_add_(0, owners[s], per_sample.to(torch.float64) * scales64[s])
        active.index_add_(0, owners[s], output.active[s].to(torch.int64))
    input_sets = _input_sets(kind, len(inputs))
    grads_wire = tuple(g.to(torch_wire) for g in output.grads)
    # Overflow check. Fast path: finite sums prove every element finite; only a
    # batch that fails it pays for locating the jobs with non-finite rows.
    sums = [p.sum() for p in output.per_sample] + [g.sum() for g in grads_wire]
    if not bool(torch.isfinite(torch.stack([s.to(torch.float64) for s in sums])).all()):
        for s, per_sample in enumerate(output.per_sample):
            bad_rows.index_add_(0, owners[s], (~torch.isfinite(per_sample)).to(torch.int64))
        for k, grad in enumerate(grads_wire):
            row_bad = ~torch.isfinite(grad)
            if row_bad.dim() == 2:
                row_bad = row_bad.any(dim=1)
            bad_rows.index_add_(0, owners[input_sets[k]], row_bad.to(torch.int64))
    per_sample_wire = tuple(p.to(torch_wire) for p in output.per_sample)
    # Device to host: the large tensors into pinned memory without blocking, then one
    # blocking copy of the per-job figures, which (same stream) waits for them all.
    grads_host = tuple(_to_host(g) for g in grads_wire)
    per_sample_host = tuple(_to_host(p) for p in per_sample_wire)
    summary = torch.stack([losses64, active.to(torch.float64), bad_rows.to(torch.float64)])
    losses_host, active_float, bad_float = summary.cpu().tolist()
    active_host = [int(a) for a in active_float]
    bad_host = [int(b) for b in bad_float]

    results: list[JobResult | InvalidInputError] = []
    offsets = [0] * len(scales64)
    for j, prepared in enumerate(jobs):
        spans = []
        for s in range(len(scales64)):
            spans.append((offsets[s], offsets[s] + set_sizes[s][j]))
            offsets[s] += set_sizes[s][j]
        job = prepared.job
        if bad_host[j] or not _finite(losses_host[j]):
            results.append(
                InvalidInputError(
                    f"{kind.value}.{job.input_fields[0]}",
                    f"overflow: the hinge term or its gradient exceeds the range of "
                    f"{str(torch_wire).removeprefix('torch.')}",
                )
            )
            continue
        options = job.options
        grads: tuple[WireArray | SparseRows, ...] = ()
        if options.gradient_format is not GradientFormat.NONE:
            grads = tuple(
                _encode_grad(
                    grads_host[k][slice(*spans[input_sets[k]])], wire_dtype, options.gradient_format
                )
                for k in range(len(grads_host))
            )
        per_sample_arrays: tuple[WireArray, ...] = ()
        if options.return_per_sample:
            per_sample_arrays = tuple(
                _wire(per_sample_host[s][slice(*spans[s])], wire_dtype)
                for s in range(len(per_sample_host))
            )
        results.append(
            JobResult(
                loss=losses_host[j],
                grads=grads,
                per_sample=per_sample_arrays,
                samples=prepared.samples,
                active=active_host[j],
                batch=BatchInfo(rows=0, requests=0, compute_s=0.0, device=""),
                compute_dtype=dtype,
            )
        )
    return results


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy started without blocking (pinned memory); the CPU tensor itself on CPU."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _owners(sizes: list[int], device: torch.device) -> torch.Tensor:
    """Row -> job index, for per-job segment sums."""
    counts = torch.tensor(sizes, dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(sizes)), counts).to(device)


def _input_sets(kind: LossKind, n_inputs: int) -> tuple[int, ...]:
    """The sample set each score input belongs to."""
    if kind is LossKind.GAN_DISCRIMINATOR:
        return (0, 1)
    return (0,) * n_inputs


def _wire(tensor: torch.Tensor, wire_dtype: int) -> WireArray:
    shape = tuple(int(d) for d in tensor.shape)
    contiguous = tensor.contiguous()
    data = contiguous.view(torch.uint8).numpy().tobytes() if contiguous.numel() else b""
    return WireArray(dtype=wire_dtype, shape=shape, data=data)


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
