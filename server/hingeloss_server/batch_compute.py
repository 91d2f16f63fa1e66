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
from hingeloss_server import losses
from hingeloss_server.errors import InvalidInputError
from hingeloss_server.jobs import (
    INPUT_SETS,
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
        if not self.cuda:
            return parts[0] if len(parts) == 1 else torch.cat(list(parts))
        # One copy into pinned memory (the concatenation itself), then a non-blocking upload.
        rows = sum(int(p.shape[0]) for p in parts)
        pinned = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
        torch.cat(list(parts), out=pinned)
        return pinned.to(self.device, non_blocking=True)


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
    if ignore_mask is not None:
        # Ignored rows contribute nothing, whatever their scores: not even an overflow.
        inputs = (inputs[0].masked_fill(ignore_mask.unsqueeze(1), 0.0),)
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
    """Splits the kernel's output per job and reduces each job's rows on the host.

    Each job's loss is the correctly rounded sum (math.fsum) of its own scaled
    per-sample terms: the same bits whatever else shares the batch and in whatever
    order a device would have added them.
    """
    kind = jobs[0].job.key.params.kind
    torch_wire = tensors.torch_dtype(wire_dtype)
    input_sets = INPUT_SETS[kind]
    grads_wire = tuple(g.to(torch_wire) for g in output.grads)
    per_sample_wire = tuple(p.to(torch_wire) for p in output.per_sample)
    bad = _non_finite_rows(output.per_sample, per_sample_wire, grads_wire, input_sets)
    # Device to host: the large tensors into pinned memory without blocking, then the
    # per-row figures (N values, not N x C), whose blocking copy waits for them all.
    grads_host = tuple(_to_host(g) for g in grads_wire)
    per_sample_host = tuple(_to_host(p) for p in per_sample_wire)
    scaled_host = [
        (p.to(torch.float64) * scale).cpu().numpy()
        for p, scale in zip(output.per_sample, scales64, strict=True)
    ]
    active_host = [a.cpu().numpy() for a in output.active]
    bad_host = None if bad is None else [b.cpu().numpy() for b in bad]

    results: list[JobResult | InvalidInputError] = []
    offsets = [0] * len(scales64)
    for prepared in jobs:
        spans = []
        for s, scale in enumerate(prepared.scales):
            spans.append(slice(offsets[s], offsets[s] + int(scale.shape[0])))
            offsets[s] += int(scale.shape[0])
        job = prepared.job
        overflow = _first_bad_row(bad_host, spans)
        loss = math.fsum(
            itertools.chain.from_iterable(
                scaled_host[s][span].tolist() for s, span in enumerate(spans)
            )
        )
        if overflow is not None or not math.isfinite(loss):
            set_index, row = overflow if overflow is not None else (0, 0)
            field = job.input_fields[_first_input_of(input_sets, set_index)]
            where = f"[{row}]" if overflow is not None else ""
            results.append(
                InvalidInputError(
                    f"{kind.value}.{field}{where}",
                    "overflow: the hinge term or its gradient exceeds the range of "
                    f"{str(torch_wire).removeprefix('torch.')}",
                )
            )
            continue
        options = job.options
        grads: tuple[WireArray | SparseRows, ...] = ()
        if options.gradient_format is not GradientFormat.NONE:
            grads = tuple(
                _encode_grad(
                    grads_host[k][spans[input_sets[k]]], wire_dtype, options.gradient_format
                )
                for k in range(len(grads_host))
            )
        per_sample_arrays: tuple[WireArray, ...] = ()
        if options.return_per_sample:
            per_sample_arrays = tuple(
                _wire(per_sample_host[s][span], wire_dtype) for s, span in enumerate(spans)
            )
        results.append(
            JobResult(
                loss=loss,
                grads=grads,
                per_sample=per_sample_arrays,
                samples=prepared.samples,
                active=sum(int(active_host[s][span].sum()) for s, span in enumerate(spans)),
                batch=BatchInfo(rows=0, requests=0, compute_s=0.0, device=""),
                compute_dtype=dtype,
            )
        )
    return results


def _non_finite_rows(
    per_sample: tuple[torch.Tensor, ...],
    per_sample_wire: tuple[torch.Tensor, ...],
    grads_wire: tuple[torch.Tensor, ...],
    input_sets: tuple[int, ...],
) -> list[torch.Tensor] | None:
    """Rows whose loss or gradient overflowed (in compute or wire dtype), per sample set.

    Fast path: finite sums prove every element finite, and None comes back; only a
    batch that fails it pays for a scan of every row.
    """
    sums = [t.sum() for t in (*per_sample, *per_sample_wire, *grads_wire)]
    if bool(torch.isfinite(torch.stack([x.to(torch.float64) for x in sums])).all()):
        return None
    bad = [
        ~torch.isfinite(p) | ~torch.isfinite(w)
        for p, w in zip(per_sample, per_sample_wire, strict=True)
    ]
    for k, grad in enumerate(grads_wire):
        rows = ~torch.isfinite(grad)
        bad[input_sets[k]] |= rows.any(dim=1) if rows.dim() == 2 else rows
    return bad


def _first_bad_row(
    bad_host: list[np.ndarray[Any, Any]] | None, spans: list[slice]
) -> tuple[int, int] | None:
    """(sample set, row within the job) of a job's first overflowing row, or None."""
    if bad_host is None:
        return None
    for s, span in enumerate(spans):
        rows = np.flatnonzero(bad_host[s][span])
        if rows.size:
            return s, int(rows[0])
    return None


def _first_input_of(input_sets: tuple[int, ...], set_index: int) -> int:
    return input_sets.index(set_index)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy started without blocking (pinned memory); the CPU tensor itself on CPU."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _wire(tensor: torch.Tensor, wire_dtype: int) -> WireArray:
    shape = tuple(int(d) for d in tensor.shape)
    # Bytes as uint8 (bfloat16 included, which numpy lacks), viewed, not copied.
    raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
    return WireArray(dtype=wire_dtype, shape=shape, data=raw.data)


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
