"""Weston-Watkins multi-class hinge (multiclass_hinge): its kernel and its LossSpec.

l_i = (w[y_i] / D) * sum_{j != y_i} max(0, margin - f_iy + f_ij)^power.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hingeloss import _factored as factored_format
from hingeloss_server.engine import fused
from hingeloss_server.engine.jobs import LossKind
from hingeloss_server.engine.losses.common import (
    Factors,
    LossOutput,
    check_factorable,
    row_sum,
    row_sum_of_squares,
)
from hingeloss_server.engine.losses.spec import (
    Aux,
    DeviceBatch,
    FusedKernel,
    KernelBatch,
    LossSpec,
    ScoreInput,
    ScoresFactory,
    WarmUp,
    class_targets,
    head,
    present,
)


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
    values (row_factor), rounded by these same operations.
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


def row_factor(
    targets: Tensor,
    *,
    num_classes: int,
    dtype: torch.dtype,
    class_weights: Tensor | None,
    divide_by_num_classes: bool,
    ignore_mask: Tensor | None,
) -> Tensor:
    """class_factor as one value per row: the fused kernel reads it per row."""
    factor = class_factor(
        targets,
        num_classes=num_classes,
        dtype=dtype,
        class_weights=class_weights,
        divide_by_num_classes=divide_by_num_classes,
        ignore_mask=ignore_mask,
    )
    if isinstance(factor, Tensor):
        return factor
    return torch.full(targets.shape, factor, dtype=dtype, device=targets.device)


@dataclass(frozen=True)
class _Terms:
    """Row sums of the hinge terms before the class factor, their activity, the gradient."""

    raw: Tensor
    active: Tensor
    grad: Tensor | None = None
    factors: tuple[Factors, ...] = ()


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
    check_factorable(power, need_factors)
    tt = targets.unsqueeze(1)
    # z = f_ij - (f_iy - margin) rounds exactly like margin - f_iy + f_ij.
    z = torch.sub(scores, scores.gather(1, tt).sub_(margin))
    # The true class is no competitor: any negative z drops it from every term below.
    z.scatter_(1, tt, -1.0)

    factor = class_factor(
        targets,
        num_classes=scores.shape[1],
        dtype=scores.dtype,
        class_weights=class_weights,
        divide_by_num_classes=divide_by_num_classes,
        ignore_mask=ignore_mask,
    )
    if power == 1:
        terms = _hinge_terms(z, tt, factor, row_scale, kink_one, need_grad, need_factors)
    else:
        terms = _squared_terms(z, tt, factor, row_scale, need_grad=need_grad)
    return _weighted(terms, factor)


def _weighted(terms: _Terms, factor: Tensor | float) -> LossOutput:
    """l_i = factor_i * raw_i; a row whose factor is 0 (ignored, zero weight) is inactive."""
    active = terms.active
    if isinstance(factor, Tensor):
        loss = terms.raw.mul_(factor)
        active &= factor > 0
    else:
        loss = terms.raw.mul_(factor) if factor != 1.0 else terms.raw
    grads = () if terms.grad is None else (terms.grad,)
    return LossOutput(per_sample=(loss,), grads=grads, active=(active,), factors=terms.factors)


def _hinge_terms(
    z: Tensor,
    tt: Tensor,
    factor: Tensor | float,
    row_scale: Tensor,
    kink_one: bool,
    need_grad: bool,
    need_factors: bool,
) -> _Terms:
    """Power 1: the sum of max(0, z) per row; the gradient dense, factored or both."""
    if not (need_grad or need_factors):
        zmax = z.amax(1) if kink_one else None
        raw = row_sum(z.relu_())
        return _Terms(raw, raw > 0 if zmax is None else zmax >= 0)
    coef = row_scale if isinstance(factor, float) and factor == 1.0 else row_scale * factor
    # Keep the kink ONE indicator before relu_ erases the sign of z == 0.
    indicator = torch.ge(z, 0, out=torch.empty_like(z)) if kink_one else None
    z.relu_()
    raw = row_sum(z)
    if indicator is None:
        indicator = z.gt_(0)
    count = indicator.sum(1)
    true_entry = coef.mul(count).neg_()
    factors: tuple[Factors, ...] = ()
    if need_factors:
        bits = factored_format.pack_rows(indicator)
        factors = (Factors(mask_bits=bits, values=coef, peak=true_entry),)
    grad = None
    if need_grad:
        grad = indicator.mul_(coef.unsqueeze(1))
        grad.scatter_(1, tt, true_entry.unsqueeze(1))
    return _Terms(raw, count > 0, grad, factors)


def _squared_terms(
    z: Tensor, tt: Tensor, factor: Tensor | float, row_scale: Tensor, *, need_grad: bool
) -> _Terms:
    """Power 2: the sum of max(0, z)^2 per row and its gradient."""
    z.relu_()
    # The plain sum of non-negative terms is positive exactly when one is,
    # which the sum of squares is not (underflow).
    hsum = row_sum(z)
    raw = row_sum_of_squares(z)
    grad = None
    if need_grad:
        coef2 = row_scale * factor * 2
        grad = z.mul_(coef2.unsqueeze(1))
        grad.scatter_(1, tt, coef2.mul_(hsum).neg_().unsqueeze(1))
    return _Terms(raw, hsum > 0, grad)


def _kernel(batch: KernelBatch) -> LossOutput:
    params = batch.params
    return multiclass_hinge(
        batch.inputs[0],
        present(batch.targets),
        margin=params.margin,
        power=params.power,
        kink_one=params.kink_one,
        class_weights=batch.class_weights,
        divide_by_num_classes=params.divide_by_num_classes,
        row_scale=batch.scales[0],
        ignore_mask=batch.ignore_mask,
        need_grad=batch.need_grad,
        need_factors=batch.need_factors,
    )


def _fused(batch: DeviceBatch, margin: Tensor) -> fused.FusedOutput:
    params = batch.params
    scores, targets = batch.inputs[0], present(batch.targets)
    return fused.weston_watkins(
        scores,
        targets,
        margin=margin,
        power=params.power,
        kink_one=params.kink_one,
        factor=row_factor(
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


def class_margins(batch: KernelBatch, rows: int) -> Tensor:
    """The true class's score less the largest other score, per row."""
    scores, target = batch.inputs[0][:rows], head(batch.targets, rows).unsqueeze(1)
    true = scores.gather(1, target).squeeze(1)
    others = scores.scatter(1, target, float("-inf")).amax(dim=1)
    return true - others


def class_warm_up_inputs(scores: ScoresFactory, rows: int, classes: int) -> dict[str, object]:
    """Scores (rows, classes) and every class in turn as the target."""
    return {"scores": scores(rows, classes), "targets": class_targets(rows, classes)}


SPEC = LossSpec(
    kind=LossKind.MULTICLASS_HINGE,
    scores=(ScoreInput("scores", ndim=2),),
    aux=(Aux.TARGETS,),
    kernel=_kernel,
    margins=class_margins,
    factorable=True,
    fused=FusedKernel(_fused, min_classes=fused.MIN_CLASSES),
    warm_up=WarmUp(
        class_warm_up_inputs,
        (
            {},
            {"power": 2, "class_normalization": "divide_by_num_classes"},
            {"kink": "one", "class_weights": "weights", "ignore_index": -100},
            {"gradient_format": "none", "class_weights": "weights"},
            {"kink": "one", "gradient_format": "none"},
            {"power": 2, "gradient_format": "row_sparse", "return_per_sample": True},
            {"gradient_format": "factored", "ignore_index": -100},
        ),
    ),
)
