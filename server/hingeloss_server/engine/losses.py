"""Closed-form hinge-family losses and their gradients, in plain torch.

Every kernel takes validated inputs in float32 or float64 on any device and a
per-row scale ``r_i`` (1 for SUM and NONE, 1/N for MEAN, w_i / sum(w) for
WEIGHTED_MEAN), so that one call on the concatenated rows of many requests
serves them all: the kernels never reduce across rows. They return the
per-sample losses l_i (not scaled by r_i), the gradients r_i * dl_i/df and the
per-sample activity defined in LOSSES.md ("Sparsity"). No autograd is involved
and nothing synchronises with the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hingeloss import _factored as factored_format

__all__ = [
    "Factors",
    "LossOutput",
    "binary_hinge",
    "crammer_singer",
    "gan_discriminator",
    "gan_generator",
    "margin_ranking",
    "multiclass_hinge",
]

# Class indices are recovered from a float reduction in crammer_singer; float32
# holds every integer up to 2**24 exactly.
_EXACT_FLOAT32_INTEGERS = 2**24


@dataclass(frozen=True)
class LossOutput:
    """What a kernel returns for one concatenated batch.

    Attributes:
        per_sample: One tensor per sample set, shape (N_k,): l_i, including the
            class weight and 1/D of Weston-Watkins, not multiplied by row_scale.
        grads: One tensor per score input, in declaration order and shaped like
            it: r_i * dl_i/df. Empty when gradients were not requested.
        active: One bool tensor per sample set, shape (N_k,): the loss is
            non-zero (kink ZERO) or the gradient is non-zero ignoring r_i
            (kink ONE). Ignored and zero-weight rows are inactive.
    """

    per_sample: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]
    active: tuple[Tensor, ...]
    factors: tuple[Factors, ...] = ()


@dataclass(frozen=True)
class Factors:
    """A power-1 multi-class gradient as its packed mask and row values (hingeloss._factored).

    Attributes:
        mask_bits: uint8, shape (N, ceil(C / 8)): the entries that take the row's value.
        values: v_i, shape (N,), in the compute dtype.
        peak: the true class's entry, shape (N,): the row's largest magnitude, so that
            the row overflows a dtype exactly when this value does.
    """

    mask_bits: Tensor
    values: Tensor
    peak: Tensor


def _row_sum(z: Tensor) -> Tensor:
    """Sum of each row, the same bits to one ulp whatever the batch around the row.

    CUDA's reduction splits a row differently with the number of rows, so the order
    of the additions (and the last bits) would depend on what shares the batch. In
    float64 each float32 row sum is the correctly rounded value of nearly the same
    number, batched or alone. The CPU's order depends on the row alone.
    """
    if z.device.type != "cuda" or z.dtype == torch.float64:
        return z.sum(1)
    return z.sum(1, dtype=torch.float64).to(z.dtype)


def _row_sum_of_squares(z: Tensor) -> Tensor:
    """Sum of squares of each row without an (N, C) temporary; see _row_sum on CUDA."""
    wide = z.device.type == "cuda" and z.dtype != torch.float64
    norm: Tensor = torch.linalg.vector_norm(z, dim=1, dtype=torch.float64 if wide else None)
    return norm.square_().to(z.dtype)


def _check_factorable(power: int, need_factors: bool) -> None:
    if need_factors and power != 1:
        raise ValueError(f"only a power-1 gradient factors into a mask and row values, not {power}")


def _active(z: Tensor, *, power: int, kink_one: bool) -> Tensor:
    """Where max(0, z)^power has a non-zero (sub)gradient under the kink convention."""
    # For the squared hinge the derivative 2z vanishes on the kink either way.
    if kink_one and power == 1:
        return z >= 0
    return z > 0


def _hinge(
    z: Tensor, *, power: int, kink_one: bool, row_scale: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Elementwise hinge of a fresh temporary ``z``, which it consumes.

    Returns:
        The terms max(0, z)^power, their activity, and r * d/dz of the terms
        (None unless need_grad).
    """
    active = _active(z, power=power, kink_one=kink_one)
    h = z.clamp_min_(0)
    slope: Tensor | None = None
    if power == 1:
        if need_grad:
            slope = active.to(h.dtype).mul_(row_scale)
        return h, active, slope
    if need_grad:
        slope = torch.mul(h, row_scale).mul_(2)
    return h.square_(), active, slope


@torch.no_grad()
def binary_hinge(
    scores: Tensor,
    labels: Tensor,
    *,
    margin: float,
    power: int,
    kink_one: bool,
    row_scale: Tensor,
    need_grad: bool = True,
) -> LossOutput:
    """Binary hinge l_i = max(0, margin - y_i f_i)^power.

    Args:
        scores: Raw scores, shape (N,).
        labels: +-1 in the dtype of scores, shape (N,).
        margin: The margin.
        power: 1 (hinge) or 2 (squared hinge).
        kink_one: Whether z == 0 counts as active (p = 1 only).
        row_scale: r_i, shape (N,).
        need_grad: Whether to compute d/dscores.

    Returns:
        per_sample (l,), grads (dscores,), active (active,).
    """
    z = torch.mul(labels, scores).neg_().add_(margin)
    loss, active, slope = _hinge(
        z, power=power, kink_one=kink_one, row_scale=row_scale, need_grad=need_grad
    )
    grads = () if slope is None else (slope.mul_(labels).neg_(),)
    return LossOutput(per_sample=(loss,), grads=grads, active=(active,))


def class_factor(
    targets: Tensor,
    *,
    num_classes: int,
    dtype: torch.dtype,
    class_weights: Tensor | None,
    divide_by_num_classes: bool,
    ignore_mask: Tensor | None,
) -> Tensor | float:
    """Weston-Watkins' factor_i = w[y_i] / D, zero on ignored rows.

    A float where it is the same for every row (no class weights, no ignored rows),
    so that the kernel pays no per-row tensor for it. The fused kernel takes the same
    values (fused.row_factor), rounded by these same operations.
    """
    factor: Tensor | float = 1.0
    if class_weights is not None:
        factor = class_weights.gather(0, targets)
    if ignore_mask is not None:
        if isinstance(factor, Tensor):
            factor = factor.masked_fill(ignore_mask, 0.0)
        else:
            factor = torch.logical_not(ignore_mask).to(dtype)
    if divide_by_num_classes:
        factor = factor / num_classes
    return factor


@torch.no_grad()
def multiclass_hinge(
    scores: Tensor,
    targets: Tensor,
    *,
    margin: float,
    power: int,
    kink_one: bool,
    class_weights: Tensor | None,
    divide_by_num_classes: bool,
    row_scale: Tensor,
    ignore_mask: Tensor | None = None,
    need_grad: bool = True,
    need_factors: bool = False,
) -> LossOutput:
    """Weston-Watkins l_i = (w[y_i] / D) * sum_{j != y_i} max(0, margin - f_iy + f_ij)^power.

    Args:
        scores: Raw scores, shape (N, C).
        targets: int64 classes in [0, C), shape (N,); ignored rows hold any valid class.
        margin: The margin.
        power: 1 or 2.
        kink_one: Whether z == 0 counts as active (p = 1 only).
        class_weights: Weight of each TRUE class, shape (C,), or None for all ones.
        divide_by_num_classes: D = C (torch's multi_margin_loss) instead of D = 1.
        row_scale: r_i, shape (N,).
        ignore_mask: True for rows that contribute nothing, shape (N,), or None.
        need_grad: Whether to compute d/dscores.
        need_factors: Whether to return d/dscores factored (power 1 only).

    Returns:
        per_sample (l,), grads (dscores,), active (active,), factors (when asked).
    """
    _check_factorable(power, need_factors)
    num_classes = scores.shape[1]
    tt = targets.unsqueeze(1)
    # z = f_ij - (f_iy - margin) rounds exactly like margin - f_iy + f_ij.
    z = torch.sub(scores, scores.gather(1, tt).sub_(margin))
    # The true class is no competitor: any negative z drops it from every term below.
    z.scatter_(1, tt, -1.0)

    factor = class_factor(
        targets,
        num_classes=num_classes,
        dtype=scores.dtype,
        class_weights=class_weights,
        divide_by_num_classes=divide_by_num_classes,
        ignore_mask=ignore_mask,
    )

    grad: Tensor | None = None
    factors: tuple[Factors, ...] = ()
    if power == 1:
        if need_grad or need_factors:
            coef = row_scale if isinstance(factor, float) and factor == 1.0 else row_scale * factor
            # Keep the kink ONE indicator before relu_ erases the sign of z == 0.
            indicator = torch.ge(z, 0, out=torch.empty_like(z)) if kink_one else None
            z.relu_()
            raw = _row_sum(z)
            if indicator is None:
                indicator = z.gt_(0)
            count = indicator.sum(1)
            active = count > 0
            true_entry = coef.mul(count).neg_()
            if need_factors:
                bits = factored_format.pack_rows(indicator)
                factors = (Factors(mask_bits=bits, values=coef, peak=true_entry),)
            if need_grad:
                grad = indicator.mul_(coef.unsqueeze(1))
                grad.scatter_(1, tt, true_entry.unsqueeze(1))
        else:
            zmax = z.amax(1) if kink_one else None
            raw = _row_sum(z.relu_())
            active = raw > 0 if zmax is None else zmax >= 0
    else:
        z.relu_()
        # The plain sum of non-negative terms is positive exactly when one is,
        # which the sum of squares is not (underflow).
        hsum = _row_sum(z)
        active = hsum > 0
        raw = _row_sum_of_squares(z)
        if need_grad:
            coef2 = row_scale * factor * 2
            grad = z.mul_(coef2.unsqueeze(1))
            grad.scatter_(1, tt, coef2.mul_(hsum).neg_().unsqueeze(1))

    if isinstance(factor, Tensor):
        loss = raw.mul_(factor)
        active &= factor > 0
    else:
        loss = raw.mul_(factor) if factor != 1.0 else raw
    grads = () if grad is None else (grad,)
    return LossOutput(per_sample=(loss,), grads=grads, active=(active,), factors=factors)


@torch.no_grad()
def crammer_singer(
    scores: Tensor,
    targets: Tensor,
    *,
    margin: float,
    power: int,
    kink_one: bool,
    split_ties: bool,
    row_scale: Tensor,
    need_grad: bool = True,
    need_factors: bool = False,
) -> LossOutput:
    """Crammer-Singer l_i = max(0, margin - (f_iy - max_{j != y_i} f_ij))^power.

    Args:
        scores: Raw scores, shape (N, C).
        targets: int64 classes in [0, C), shape (N,).
        margin: The margin.
        power: 1 or 2.
        kink_one: Whether z == 0 counts as active (p = 1 only).
        split_ties: Share the gradient among tied maxima (SPLIT_EVENLY) instead
            of giving it to the lowest index (FIRST_INDEX).
        row_scale: r_i, shape (N,).
        need_grad: Whether to compute d/dscores.
        need_factors: Whether to return d/dscores factored (power 1 only): the mask
            marks the competitors that take the row's slope (all tied maxima with
            split_ties, else the first), whether or not the row is active.

    Returns:
        per_sample (l,), grads (dscores,), active (active,), factors (when asked).
    """
    _check_factorable(power, need_factors)
    num_classes = int(scores.shape[1])
    tt = targets.unsqueeze(1)
    others = scores.clone()
    others.scatter_(1, tt, float("-inf"))
    first: Tensor | None = None
    if (need_grad or need_factors) and not split_ties and scores.device.type != "cpu":
        # One pass for the maximum and its lowest index: torch.max(dim) returns the first.
        best, first = others.max(1, keepdim=True)
    else:
        best = others.amax(1, keepdim=True)
    z = torch.sub(scores.gather(1, tt), best).neg_().add_(margin).squeeze(1)
    loss, active, slope = _hinge(
        z, power=power, kink_one=kink_one, row_scale=row_scale, need_grad=need_grad or need_factors
    )
    if slope is None:
        return LossOutput(per_sample=(loss,), grads=(), active=(active,))

    factors: tuple[Factors, ...] = ()
    slope_column = slope.unsqueeze(1)
    if split_ties:
        # 1.0 on every maximum among j != y; the target column holds -inf and never ties.
        tied = others.eq_(best)
        if need_factors:
            factors = (Factors(factored_format.pack_rows(tied), slope, slope.neg()),)
        grad = tied.mul_(slope_column / tied.sum(1, keepdim=True)) if need_grad else None
    else:
        if first is None:
            first = _first_maximum(others, best)
        if need_factors:
            bits = factored_format.pack_one_hot(first, num_classes)
            factors = (Factors(bits, slope, slope.neg()),)
        grad = others.zero_().scatter_(1, first, slope_column) if need_grad else None
    if grad is None:
        return LossOutput(per_sample=(loss,), grads=(), active=(active,), factors=factors)
    grad.scatter_(1, tt, slope_column.neg())
    return LossOutput(per_sample=(loss,), grads=(grad,), active=(active,), factors=factors)


def _first_maximum(values: Tensor, best: Tensor) -> Tensor:
    """The lowest column index where each row of ``values`` equals ``best``; clobbers values.

    On CPU, max(dim) and argmax are several times slower than these elementwise
    passes: max_j [tied_j] * (C-1-j) is C-1-j* for the lowest tied j*.
    """
    num_classes = values.shape[1]
    tied = values.eq_(best)
    if values.dtype == torch.float64 or num_classes <= _EXACT_FLOAT32_INTEGERS:
        rev = torch.arange(num_classes - 1, -1, -1, dtype=values.dtype, device=values.device)
        return tied.mul_(rev).amax(1, keepdim=True).neg_().add_(num_classes - 1).long()
    return tied.argmax(1, keepdim=True)


@torch.no_grad()
def gan_discriminator(
    real: Tensor,
    fake: Tensor,
    *,
    kink_one: bool,
    real_scale: Tensor,
    fake_scale: Tensor,
    need_grad: bool = True,
) -> LossOutput:
    """GAN discriminator hinge: terms max(0, 1 - real_i) and max(0, 1 + fake_j).

    Args:
        real: Discriminator outputs on real data, shape (N_r,).
        fake: Discriminator outputs on generated data, shape (N_f,).
        kink_one: Whether a term at exactly 0 counts as active.
        real_scale: Scale of each real term, shape (N_r,) (1/N_r for SUM_OF_MEANS,
            1/(N_r + N_f) for POOLED_MEAN).
        fake_scale: Scale of each fake term, shape (N_f,).
        need_grad: Whether to compute the gradients.

    Returns:
        per_sample (real_terms, fake_terms), grads (dreal, dfake),
        active (real_active, fake_active).
    """
    real_loss, real_active, real_slope = _hinge(
        torch.neg(real).add_(1),
        power=1,
        kink_one=kink_one,
        row_scale=real_scale,
        need_grad=need_grad,
    )
    fake_loss, fake_active, fake_slope = _hinge(
        torch.add(fake, 1),
        power=1,
        kink_one=kink_one,
        row_scale=fake_scale,
        need_grad=need_grad,
    )
    grads: tuple[Tensor, ...] = ()
    if real_slope is not None and fake_slope is not None:
        grads = (real_slope.neg_(), fake_slope)
    return LossOutput(
        per_sample=(real_loss, fake_loss), grads=grads, active=(real_active, fake_active)
    )


@torch.no_grad()
def gan_generator(fake: Tensor, *, row_scale: Tensor, need_grad: bool = True) -> LossOutput:
    """GAN generator loss l_j = -fake_j: linear, so never sparse.

    Args:
        fake: Discriminator outputs on generated data, shape (N,).
        row_scale: r_j, shape (N,).
        need_grad: Whether to compute d/dfake.

    Returns:
        per_sample (l,), grads (dfake,), active (all True,).
    """
    grads = (torch.neg(row_scale),) if need_grad else ()
    active = torch.ones(fake.shape, dtype=torch.bool, device=fake.device)
    return LossOutput(per_sample=(torch.neg(fake),), grads=grads, active=(active,))


@torch.no_grad()
def margin_ranking(
    scores_a: Tensor,
    scores_b: Tensor,
    labels: Tensor,
    *,
    margin: float,
    kink_one: bool,
    row_scale: Tensor,
    need_grad: bool = True,
) -> LossOutput:
    """Margin ranking l_i = max(0, margin - y_i (a_i - b_i)).

    Args:
        scores_a: Scores of the first items, shape (N,).
        scores_b: Scores of the second items, shape (N,).
        labels: +1 where a should rank higher, -1 where b should, in the dtype of scores.
        margin: The margin.
        kink_one: Whether z == 0 counts as active.
        row_scale: r_i, shape (N,).
        need_grad: Whether to compute the gradients.

    Returns:
        per_sample (l,), grads (da, db), active (active,).
    """
    z = torch.sub(scores_a, scores_b).mul_(labels).neg_().add_(margin)
    loss, active, slope = _hinge(
        z, power=1, kink_one=kink_one, row_scale=row_scale, need_grad=need_grad
    )
    grads: tuple[Tensor, ...] = ()
    if slope is not None:
        grad_b = slope.mul_(labels)
        grads = (grad_b.neg(), grad_b)
    return LossOutput(per_sample=(loss,), grads=grads, active=(active,))
