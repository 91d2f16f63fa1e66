"""Margin ranking l_i = max(0, margin - y_i (a_i - b_i)): its kernel and its LossSpec."""

from __future__ import annotations

import torch
from torch import Tensor

from hingeloss_server.engine.jobs import LossKind
from hingeloss_server.engine.losses.common import LossOutput, hinge
from hingeloss_server.engine.losses.spec import (
    Aux,
    KernelBatch,
    LossSpec,
    ScoreInput,
    ScoresFactory,
    WarmUp,
    head,
    present,
    signs,
)


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
    loss, active, slope = hinge(
        z, power=1, kink_one=kink_one, row_scale=row_scale, need_grad=need_grad
    )
    grads: tuple[Tensor, ...] = ()
    if slope is not None:
        grad_b = slope.mul_(labels)
        grads = (grad_b.neg(), grad_b)
    return LossOutput(per_sample=(loss,), grads=grads, active=(active,))


def _kernel(batch: KernelBatch) -> LossOutput:
    params = batch.params
    return margin_ranking(
        batch.inputs[0],
        batch.inputs[1],
        present(batch.labels),
        margin=params.margin,
        kink_one=params.kink_one,
        row_scale=batch.scales[0],
        need_grad=batch.need_grad,
    )


def _margins(batch: KernelBatch, rows: int) -> Tensor:
    return (batch.inputs[0][:rows] - batch.inputs[1][:rows]) * head(batch.labels, rows)


def _warm_up_inputs(scores: ScoresFactory, rows: int, classes: int) -> dict[str, object]:
    return {"scores_a": scores(rows), "scores_b": -scores(rows) / 2, "labels": signs(rows)}


SPEC = LossSpec(
    kind=LossKind.MARGIN_RANKING,
    # scores_b holds the second item of each of scores_a's samples.
    scores=(ScoreInput("scores_a"), ScoreInput("scores_b")),
    aux=(Aux.LABELS,),
    kernel=_kernel,
    margins=_margins,
    warm_up=WarmUp(
        _warm_up_inputs,
        (
            {"gradient_format": "row_sparse"},
            {"kink": "one", "margin": 0.5, "return_per_sample": True},
            {"gradient_format": "none"},
        ),
    ),
)
