"""The Triton kernels behind fused.py: Weston-Watkins by row (in chunks of columns), binary
hinge by element.

Each reads a score once and writes each gradient entry once, in the wire dtype, with
per row the loss, its activity, and whether the scores held NaN/Inf or the gradient
overflowed. Defined only where Triton is installed (AVAILABLE).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager kernels serve
    triton = None

AVAILABLE = triton is not None

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
    def _weston_watkins_row_end(  # type: ignore[no-untyped-def]
        loss,
        active,
        scores_bad,
        grad_bad,
        true_grad_at,
        total,
        total_sq,
        count,
        bad_in,
        bad_out,
        row_factor,
        row_coef,
        POWER: tl.constexpr,
        NEED_GRAD: tl.constexpr,
    ):
        """A row's figures from its chunks' sums, and its true-class gradient, stored."""
        compute = row_coef.dtype
        hits = tl.sum(count, axis=0)
        if POWER == 1:
            row_loss = tl.sum(total, axis=0).to(compute)
        else:
            row_loss = tl.sum(total_sq, axis=0).to(compute)
        tl.store(loss, row_loss * row_factor)
        tl.store(active, ((hits > 0) & (row_factor > 0)).to(tl.int8))
        tl.store(scores_bad, (tl.sum(bad_in, axis=0) > 0).to(tl.int8))
        if NEED_GRAD:
            if POWER == 1:
                true_grad = -(row_coef * hits.to(compute))
            else:
                true_grad = -(row_coef * tl.sum(total, axis=0).to(compute))
            true_wire = true_grad.to(true_grad_at.dtype.element_ty)
            tl.store(true_grad_at, true_wire)
            overflow = ~(tl.abs(true_wire.to(compute)) < float("inf"))
            tl.store(grad_bad, ((tl.sum(bad_out, axis=0) > 0) | overflow).to(tl.int8))
        else:
            tl.store(grad_bad, 0)

    @triton.jit
    def weston_watkins_kernel(  # type: ignore[no-untyped-def]
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
        _weston_watkins_row_end(
            loss + row,
            active + row,
            scores_bad + row,
            grad_bad + row,
            grad + row * stride_grad + target,
            total,
            total_sq,
            count,
            bad_in,
            bad_out,
            row_factor,
            row_coef,
            POWER,
            NEED_GRAD,
        )

    @triton.jit
    def binary_hinge_kernel(  # type: ignore[no-untyped-def]
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
