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

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager kernels serve
    triton = None

AVAILABLE = triton is not None
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


if AVAILABLE:

    @triton.jit
    def _weston_watkins_chunk(  # type: ignore[no-untyped-def]
        base,
        cols,
        num_classes,
        target,
        shift,
        skip,
        row_coef,
        grad_row,
        HAS_IGNORED: tl.constexpr,
        POWER: tl.constexpr,
        KINK_ONE: tl.constexpr,
        NEED_GRAD: tl.constexpr,
    ):
        """One chunk of a row: its hinge terms and activity, and its gradient written.

        Returns h, whether each entry is active, and per entry whether the score was
        not finite and whether the written gradient overflowed.
        """
        compute = row_coef.dtype
        inside = cols < num_classes
        raw = tl.load(base + cols, mask=inside, other=0.0).to(compute)
        bad_in = (inside & ~(tl.abs(raw) < float("inf"))).to(tl.int32)
        value = raw
        if HAS_IGNORED:
            value = tl.where(skip, 0.0, raw)
        competitor = inside & (cols != target)
        z = tl.where(competitor, value - shift, -1.0)
        if KINK_ONE and POWER == 1:
            on = z >= 0
        else:
            on = z > 0
        h = tl.maximum(z, 0.0)
        bad_out = tl.zeros_like(bad_in)
        if NEED_GRAD:
            if POWER == 1:
                g = tl.where(on, row_coef, 0.0 * row_coef)
            else:
                g = h * row_coef
            g_wire = g.to(grad_row.dtype.element_ty)
            bad_out = (competitor & ~(tl.abs(g_wire.to(compute)) < float("inf"))).to(tl.int32)
            tl.store(grad_row + cols, g_wire, mask=competitor)
        return h, on, bad_in, bad_out

    @triton.jit
    def _weston_watkins_kernel(  # type: ignore[no-untyped-def]
        scores,
        stride_scores,
        targets,
        factor,
        coef,
        margin,
        ignored,
        grad,
        stride_grad,
        loss,
        active,
        grad_bad,
        scores_bad,
        num_classes,
        HAS_IGNORED: tl.constexpr,
        POWER: tl.constexpr,
        KINK_ONE: tl.constexpr,
        NEED_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
        NUM_CHUNKS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = scores + row * stride_scores
        target = tl.load(targets + row)
        row_factor = tl.load(factor + row)
        row_coef = tl.load(coef + row)
        compute = row_coef.dtype
        true_score = tl.load(base + target).to(compute)
        skip = row < 0  # never: no row is ignored
        if HAS_IGNORED:  # ignored rows count as all-zero scores, as eager masks them
            skip = tl.load(ignored + row) != 0
            true_score = tl.where(skip, 0.0, true_score)
        # As eager: z = f_ij - (f_iy - margin), each step rounded in the compute dtype.
        shift = true_score - tl.load(margin)
        total = tl.zeros((BLOCK,), dtype=tl.float64)
        total_sq = tl.zeros((BLOCK,), dtype=tl.float64)
        count = tl.zeros((BLOCK,), dtype=tl.int32)
        bad_in = tl.zeros((BLOCK,), dtype=tl.int32)
        bad_out = tl.zeros((BLOCK,), dtype=tl.int32)
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK + tl.arange(0, BLOCK)
            h, on, bad_in_chunk, bad_out_chunk = _weston_watkins_chunk(
                base,
                cols,
                num_classes,
                target,
                shift,
                skip,
                row_coef,
                grad + row * stride_grad,
                HAS_IGNORED,
                POWER,
                KINK_ONE,
                NEED_GRAD,
            )
            total += h.to(tl.float64)
            if POWER == 2:
                total_sq += h.to(tl.float64) * h.to(tl.float64)
            count += on.to(tl.int32)
            bad_in += bad_in_chunk
            bad_out += bad_out_chunk
        hits = tl.sum(count, axis=0)
        if POWER == 1:
            row_loss = tl.sum(total, axis=0).to(compute)
        else:
            row_loss = tl.sum(total_sq, axis=0).to(compute)
        tl.store(loss + row, row_loss * row_factor)
        tl.store(active + row, ((hits > 0) & (row_factor > 0)).to(tl.int8))
        tl.store(scores_bad + row, (tl.sum(bad_in, axis=0) > 0).to(tl.int8))
        if NEED_GRAD:
            if POWER == 1:
                true_grad = -(row_coef * hits.to(compute))
            else:
                true_grad = -(row_coef * tl.sum(total, axis=0).to(compute))
            true_wire = true_grad.to(grad.dtype.element_ty)
            tl.store(grad + row * stride_grad + target, true_wire)
            overflow = ~(tl.abs(true_wire.to(compute)) < float("inf"))
            tl.store(grad_bad + row, ((tl.sum(bad_out, axis=0) > 0) | overflow).to(tl.int8))
        else:
            tl.store(grad_bad + row, 0)


if AVAILABLE:

    @triton.jit
    def _binary_hinge_kernel(  # type: ignore[no-untyped-def]
        scores,
        labels,
        scale,
        margin,
        grad,
        loss,
        active,
        grad_bad,
        scores_bad,
        rows,
        POWER: tl.constexpr,
        KINK_ONE: tl.constexpr,
        NEED_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = index < rows
        r = tl.load(scale + index, mask=inside, other=0.0)
        compute = r.dtype
        f = tl.load(scores + index, mask=inside, other=0.0).to(compute)
        y = tl.load(labels + index, mask=inside, other=1).to(compute)
        # As eager: z = -(y * f) + margin.
        z = -(y * f) + tl.load(margin)
        if KINK_ONE and POWER == 1:
            on = z >= 0
        else:
            on = z > 0
        h = tl.maximum(z, 0.0)
        if POWER == 1:
            tl.store(loss + index, h, mask=inside)
            slope = on.to(compute) * r
        else:
            tl.store(loss + index, h * h, mask=inside)
            slope = (h * r) * 2
        tl.store(active + index, on.to(tl.int8), mask=inside)
        tl.store(scores_bad + index, (~(tl.abs(f) < float("inf"))).to(tl.int8), mask=inside)
        if NEED_GRAD:
            g_wire = (-(slope * y)).to(grad.dtype.element_ty)
            tl.store(grad + index, g_wire, mask=inside)
            bad = ~(tl.abs(g_wire.to(compute)) < float("inf"))
            tl.store(grad_bad + index, bad.to(tl.int8), mask=inside)
        else:
            tl.store(grad_bad + index, tl.zeros((BLOCK,), dtype=tl.int8), mask=inside)


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
    block = min(MAX_BLOCK, triton.next_power_of_2(num_classes))
    chunks = -(-num_classes // block)
    if rows:
        _weston_watkins_kernel[(rows,)](
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
        _binary_hinge_kernel[(triton.cdiv(rows, BINARY_BLOCK),)](
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
