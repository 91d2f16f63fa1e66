"""The GAN hinge losses (Lim & Ye 2017; Miyato et al. 2018): kernels and LossSpecs.

The discriminator's terms max(0, 1 - real_i) and max(0, 1 + fake_j) form two sample
sets; the generator's loss -fake_j is linear, so never sparse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hingeloss_server.engine.jobs import LossKind
from hingeloss_server.engine.losses.common import LossOutput, hinge
from hingeloss_server.engine.losses.spec import (
    KernelBatch,
    LossSpec,
    ScoreInput,
    ScoresFactory,
    WarmUp,
)

# Fake rows of the discriminator's warm-up request: fewer than real ones, so that
# the two sample sets differ in size.
_WARM_UP_FAKE_ROWS = 5


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
    real_loss, real_active, real_slope = hinge(
        torch.neg(real).add_(1),
        power=1,
        kink_one=kink_one,
        row_scale=real_scale,
        need_grad=need_grad,
    )
    fake_loss, fake_active, fake_slope = hinge(
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


def _discriminator_kernel(batch: KernelBatch) -> LossOutput:
    return gan_discriminator(
        batch.inputs[0],
        batch.inputs[1],
        kink_one=batch.params.kink_one,
        real_scale=batch.scales[0],
        fake_scale=batch.scales[1],
        need_grad=batch.need_grad,
    )


def _discriminator_margins(batch: KernelBatch, rows: int) -> Tensor:
    half = rows // 2
    return torch.cat([batch.inputs[0][:half], -batch.inputs[1][:half]])


def _discriminator_warm_up(scores: ScoresFactory, rows: int, classes: int) -> dict[str, object]:
    return {"real_scores": scores(rows), "fake_scores": scores(rows)[:_WARM_UP_FAKE_ROWS]}


def _generator_kernel(batch: KernelBatch) -> LossOutput:
    return gan_generator(batch.inputs[0], row_scale=batch.scales[0], need_grad=batch.need_grad)


def _generator_margins(batch: KernelBatch, rows: int) -> Tensor:
    return batch.inputs[0][:rows]


def _generator_warm_up(scores: ScoresFactory, rows: int, classes: int) -> dict[str, object]:
    return {"fake_scores": scores(rows)}


DISCRIMINATOR = LossSpec(
    kind=LossKind.GAN_DISCRIMINATOR,
    scores=(ScoreInput("real_scores", sample_set=0), ScoreInput("fake_scores", sample_set=1)),
    aux=(),
    kernel=_discriminator_kernel,
    margins=_discriminator_margins,
    sums_set_means=True,
    samples_text="real plus fake samples",
    warm_up=WarmUp(
        _discriminator_warm_up,
        (
            {},
            {"combine": "pooled_mean", "kink": "one"},
            {"reduction": "weighted_mean", "gradient_format": "none"},
        ),
    ),
)

GENERATOR = LossSpec(
    kind=LossKind.GAN_GENERATOR,
    scores=(ScoreInput("fake_scores"),),
    aux=(),
    kernel=_generator_kernel,
    margins=_generator_margins,
    hinge=False,
    warm_up=WarmUp(_generator_warm_up, ({}, {"gradient_format": "none"})),
)
