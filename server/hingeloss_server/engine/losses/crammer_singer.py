"""Crammer-Singer multi-class hinge: its kernel and its LossSpec.

l_i = max(0, margin - (f_iy - max_{j != y_i} f_ij))^power.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hingeloss import _factored as factored_format
from hingeloss_server.engine.jobs import LossKind
from hingeloss_server.engine.losses.common import Factors, LossOutput, check_factorable, hinge
from hingeloss_server.engine.losses.spec import (
    Aux,
    KernelBatch,
    LossSpec,
    ScoreInput,
    WarmUp,
    present,
)
from hingeloss_server.engine.losses.weston_watkins import class_margins, class_warm_up_inputs

# Class indices are recovered from a float reduction in _first_maximum; float32
# holds every integer up to 2**24 exactly.
_EXACT_FLOAT32_INTEGERS = 2**24


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
    check_factorable(power, need_factors)
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
    loss, active, slope = hinge(
        z, power=power, kink_one=kink_one, row_scale=row_scale, need_grad=need_grad or need_factors
    )
    if slope is None:
        return LossOutput(per_sample=(loss,), grads=(), active=(active,))

    grad, factors = _competitor_slopes(
        others,
        best,
        first,
        slope,
        split_ties=split_ties,
        need_grad=need_grad,
        need_factors=need_factors,
    )
    if grad is None:
        return LossOutput(per_sample=(loss,), grads=(), active=(active,), factors=factors)
    grad.scatter_(1, tt, slope.unsqueeze(1).neg())
    return LossOutput(per_sample=(loss,), grads=(grad,), active=(active,), factors=factors)


def _competitor_slopes(
    others: Tensor,
    best: Tensor,
    first: Tensor | None,
    slope: Tensor,
    *,
    split_ties: bool,
    need_grad: bool,
    need_factors: bool,
) -> tuple[Tensor | None, tuple[Factors, ...]]:
    """The gradient's competitor entries (true class not yet set) and the factored form.

    `others` holds the scores with -inf in the true class's column; it is reused.
    """
    factors: tuple[Factors, ...] = ()
    slope_column = slope.unsqueeze(1)
    if split_ties:
        # 1.0 on every maximum among j != y; the target column holds -inf and never ties.
        tied = others.eq_(best)
        if need_factors:
            factors = (Factors(factored_format.pack_rows(tied), slope, slope.neg()),)
        grad = tied.mul_(slope_column / tied.sum(1, keepdim=True)) if need_grad else None
        return grad, factors
    if first is None:
        first = _first_maximum(others, best)
    if need_factors:
        bits = factored_format.pack_one_hot(first, int(others.shape[1]))
        factors = (Factors(bits, slope, slope.neg()),)
    grad = others.zero_().scatter_(1, first, slope_column) if need_grad else None
    return grad, factors


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


def _kernel(batch: KernelBatch) -> LossOutput:
    params = batch.params
    return crammer_singer(
        batch.inputs[0],
        present(batch.targets),
        margin=params.margin,
        power=params.power,
        kink_one=params.kink_one,
        split_ties=params.split_ties,
        row_scale=batch.scales[0],
        need_grad=batch.need_grad,
        need_factors=batch.need_factors,
    )


SPEC = LossSpec(
    kind=LossKind.CRAMMER_SINGER,
    scores=(ScoreInput("scores", ndim=2),),
    aux=(Aux.TARGETS,),
    kernel=_kernel,
    margins=class_margins,
    factorable=True,
    warm_up=WarmUp(
        class_warm_up_inputs,
        (
            {},
            {"tie_break": "split_evenly"},
            {"power": 2, "kink": "one"},
            {"gradient_format": "none"},
            {"gradient_format": "factored"},
            {"gradient_format": "factored", "tie_break": "split_evenly"},
        ),
    ),
)
