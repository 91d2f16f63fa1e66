"""What every loss kernel shares: the output types and the elementwise hinge, in plain torch.

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


def row_sum(z: Tensor) -> Tensor:
    """Sum of each row, the same bits to one ulp whatever the batch around the row.

    CUDA's reduction splits a row differently with the number of rows, so the order
    of the additions (and the last bits) would depend on what shares the batch. In
    float64 each float32 row sum is the correctly rounded value of nearly the same
    number, batched or alone. The CPU's order depends on the row alone.
    """
    if z.device.type != "cuda" or z.dtype == torch.float64:
        return z.sum(1)
    return z.sum(1, dtype=torch.float64).to(z.dtype)


def row_sum_of_squares(z: Tensor) -> Tensor:
    """Sum of squares of each row without an (N, C) temporary; see row_sum on CUDA."""
    wide = z.device.type == "cuda" and z.dtype != torch.float64
    norm: Tensor = torch.linalg.vector_norm(z, dim=1, dtype=torch.float64 if wide else None)
    return norm.square_().to(z.dtype)


def check_factorable(power: int, need_factors: bool) -> None:
    if need_factors and power != 1:
        raise ValueError(f"only a power-1 gradient factors into a mask and row values, not {power}")


def hinge_active(z: Tensor, *, power: int, kink_one: bool) -> Tensor:
    """Where max(0, z)^power has a non-zero (sub)gradient under the kink convention."""
    # For the squared hinge the derivative 2z vanishes on the kink either way.
    if kink_one and power == 1:
        return z >= 0
    return z > 0


def hinge(
    z: Tensor, *, power: int, kink_one: bool, row_scale: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Elementwise hinge of a fresh temporary ``z``, which it consumes.

    Returns:
        The terms max(0, z)^power, their activity, and r * d/dz of the terms
        (None unless need_grad).
    """
    active = hinge_active(z, power=power, kink_one=kink_one)
    h = z.clamp_min_(0)
    slope: Tensor | None = None
    if power == 1:
        if need_grad:
            slope = active.to(h.dtype).mul_(row_scale)
        return h, active, slope
    if need_grad:
        slope = torch.mul(h, row_scale).mul_(2)
    return h.square_(), active, slope
