"""Binary hinge l_i = max(0, margin - y_i f_i)^power: its kernel and its LossSpec."""

from __future__ import annotations

import torch
from torch import Tensor

from hingeloss_server.engine import fused
from hingeloss_server.engine.jobs import LossKind
from hingeloss_server.engine.losses.common import LossOutput, hinge
from hingeloss_server.engine.losses.spec import (
    Aux,
    DeviceBatch,
    FusedKernel,
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
    loss, active, slope = hinge(
        z, power=power, kink_one=kink_one, row_scale=row_scale, need_grad=need_grad
    )
    grads = () if slope is None else (slope.mul_(labels).neg_(),)
    return LossOutput(per_sample=(loss,), grads=grads, active=(active,))


def _kernel(batch: KernelBatch) -> LossOutput:
    params = batch.params
    return binary_hinge(
        batch.inputs[0],
        present(batch.labels),
        margin=params.margin,
        power=params.power,
        kink_one=params.kink_one,
        row_scale=batch.scales[0],
        need_grad=batch.need_grad,
    )


def _fused(batch: DeviceBatch, margin: Tensor) -> fused.FusedOutput:
    params = batch.params
    return fused.binary_hinge(
        batch.inputs[0],
        present(batch.labels),
        margin=margin,
        power=params.power,
        kink_one=params.kink_one,
        row_scale=batch.scales[0],
        grad_dtype=batch.wire,
        need_grad=batch.need_grad,
    )


def _margins(batch: KernelBatch, rows: int) -> Tensor:
    return batch.inputs[0][:rows] * head(batch.labels, rows)


def _warm_up_inputs(scores: ScoresFactory, rows: int, classes: int) -> dict[str, object]:
    return {"scores": scores(rows), "labels": signs(rows)}


SPEC = LossSpec(
    kind=LossKind.BINARY_HINGE,
    scores=(ScoreInput("scores"),),
    aux=(Aux.LABELS,),
    kernel=_kernel,
    margins=_margins,
    fused=FusedKernel(_fused),
    warm_up=WarmUp(
        _warm_up_inputs,
        (
            {},
            {
                "power": 2,
                "label_encoding": "zero_one",
                "reduction": "sum",
                "return_per_sample": True,
            },
            {"kink": "one", "gradient_format": "none"},
            {"reduction": "weighted_mean", "gradient_format": "row_sparse"},
        ),
    ),
)
