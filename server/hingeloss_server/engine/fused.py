"""Weston-Watkins and binary hinge, loss and gradient in one pass over the scores (Triton, CUDA).

The eager kernels (losses/) make about ten passes over an (N, C) batch
(difference, relu, sum, mask, count, scale, ...) and the engine three more
(half-precision up-cast, gradient cast to the wire dtype, finiteness scans). These
kernels read each score once and write each gradient entry once, in the wire
dtype, and report per row the loss, its activity, and whether the scores held
NaN/Inf or the gradient overflowed the wire dtype.

They give the eager kernels' gradients bit for bit (the same operations on the same
per-row coefficients, which the engine computes in torch exactly as the eager
kernels do); per-row sums accumulate in float64 in a fixed order, so a row's per-sample
loss agrees with the eager one to one ulp and is the same in any batch (binary
hinge: elementwise, bit for bit). The eager kernels stay the reference, and the
fallback where Triton is missing (the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hingeloss_server.engine import fused_kernels as kernels

AVAILABLE = kernels.AVAILABLE

# Columns one program handles at a time; a row longer than this is walked in chunks.
# The kernel is compiled once per block size and chunk count (and dtype and options).
MAX_BLOCK = 4096
# Fewer classes than this stay with the eager kernel: a row's work would not cover
# one program's launch, and each block size costs a compilation.
MIN_CLASSES = 256


@dataclass(frozen=True)
class FusedOutput:
    """Per row: the loss (compute dtype), activity, and what went wrong; the gradient."""

    per_sample: Tensor
    active: Tensor
    grad: Tensor | None
    grad_not_finite: Tensor
    scores_not_finite: Tensor


def _outputs(
    scores: Tensor, row_scale: Tensor, grad_dtype: torch.dtype, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """A kernel's outputs, uninitialised: per row the loss (compute dtype) and three int8
    flags (active, gradient overflowed, scores not finite); the gradient, shaped as the
    scores, where one is written."""
    rows, device = int(scores.shape[0]), scores.device
    flags = [torch.empty(rows, dtype=torch.int8, device=device) for _ in range(3)]
    per_sample = torch.empty(rows, dtype=row_scale.dtype, device=device)
    grad = torch.empty(scores.shape, dtype=grad_dtype, device=device) if need_grad else None
    return per_sample, flags[0], flags[1], flags[2], grad


def _output(
    per_sample: Tensor, active: Tensor, grad: Tensor | None, grad_bad: Tensor, scores_bad: Tensor
) -> FusedOutput:
    """The kernel's int8 0/1 flags seen as bool without a copy (one pass fewer each)."""
    return FusedOutput(
        per_sample=per_sample,
        active=active.view(torch.bool),
        grad=grad,
        grad_not_finite=grad_bad.view(torch.bool),
        scores_not_finite=scores_bad.view(torch.bool),
    )


def weston_watkins(
    scores: Tensor,
    targets: Tensor,
    *,
    margin: Tensor,
    power: int,
    kink_one: bool,
    factor: Tensor,
    row_scale: Tensor,
    ignore_mask: Tensor | None,
    grad_dtype: torch.dtype,
    need_grad: bool,
) -> FusedOutput:
    """Weston-Watkins per-sample losses and r_i * dl_i/df on the scores' device, fused.

    Args:
        scores: (N, C) in the wire dtype (up-cast inside the kernel).
        targets: int64 classes, (N,); ignored rows hold any valid class.
        margin: The margin, a one-element tensor in the compute dtype on the device
            (a Python float would reach the kernel as float32, and making a tensor
            here would copy from pageable memory, which waits for the device).
        power: 1 or 2.
        kink_one: Whether z == 0 counts as active (power 1).
        factor: w[y_i] / D per row (losses.weston_watkins.row_factor), in the compute dtype.
        row_scale: r_i, (N,), in the compute dtype.
        ignore_mask: True for rows that contribute nothing, or None.
        grad_dtype: The dtype of the gradient written (the wire dtype).
        need_grad: Whether to write the gradient.
    """
    rows, num_classes = scores.shape
    coef = row_scale * factor * 2 if power == 2 else row_scale * factor
    per_sample, active, grad_bad, scores_bad, grad = _outputs(
        scores, row_scale, grad_dtype, need_grad
    )
    block = min(MAX_BLOCK, 1 << (num_classes - 1).bit_length())
    chunks = -(-num_classes // block)
    if rows:
        kernels.weston_watkins_kernel[(rows,)](
            scores,
            scores.stride(0),
            targets,
            factor,
            coef,
            margin,
            ignore_mask if ignore_mask is not None else active,
            grad if grad is not None else per_sample,
            grad.stride(0) if grad is not None else 0,
            per_sample,
            active,
            grad_bad,
            scores_bad,
            num_classes,
            HAS_IGNORED=ignore_mask is not None,
            POWER=power,
            KINK_ONE=kink_one,
            NEED_GRAD=need_grad,
            BLOCK=block,
            NUM_CHUNKS=chunks,
            num_warps=4 if block <= 1024 else 8,
        )
    return _output(per_sample, active, grad, grad_bad, scores_bad)


# Elements one program of the binary hinge kernel handles.
BINARY_BLOCK = 1024


def binary_hinge(
    scores: Tensor,
    labels: Tensor,
    *,
    margin: Tensor,
    power: int,
    kink_one: bool,
    row_scale: Tensor,
    grad_dtype: torch.dtype,
    need_grad: bool,
) -> FusedOutput:
    """Binary hinge per-sample losses and r_i * dl_i/df, fused: one pass, every output.

    Args:
        scores: (N,) in the wire dtype (up-cast inside the kernel).
        labels: +-1 as int8, (N,).
        margin: The margin, a one-element tensor in the compute dtype on the device.
        power: 1 or 2.
        kink_one: Whether z == 0 counts as active (power 1).
        row_scale: r_i, (N,), in the compute dtype.
        grad_dtype: The dtype of the gradient written (the wire dtype).
        need_grad: Whether to write the gradient.
    """
    rows = int(scores.shape[0])
    per_sample, active, grad_bad, scores_bad, grad = _outputs(
        scores, row_scale, grad_dtype, need_grad
    )
    if rows:
        kernels.binary_hinge_kernel[(-(-rows // BINARY_BLOCK),)](
            scores,
            labels,
            row_scale,
            margin,
            grad if grad is not None else per_sample,
            per_sample,
            active,
            grad_bad,
            scores_bad,
            rows,
            POWER=power,
            KINK_ONE=kink_one,
            NEED_GRAD=need_grad,
            BLOCK=BINARY_BLOCK,
        )
    return _output(per_sample, active, grad, grad_bad, scores_bad)
