"""Per-row flags of a batch: what went wrong on which row, found on the device.

One byte per row of each sample set, computed with a few vectorised passes and
read by the host only after the batch's one wait (batch_figures.py). A job fails
with "overflow" only for what it receives (answers.py decides from the bits).
"""

from __future__ import annotations

import math

import torch

from hingeloss_server.engine import losses

# Bits of the per-row flags (one value per row of each sample set).
LOSS_OVERFLOW = 1  # the loss in the compute dtype
GRAD_OVERFLOW = 2  # the gradient in the wire dtype (matters to jobs that asked for it)
PER_SAMPLE_OVERFLOW = 4  # the per-sample loss in the wire dtype (likewise)
SCORES_NOT_FINITE = 8  # a score input holds NaN or Inf (only where not checked on the host)
# On CUDA a row's activity travels in its flags byte, beside the overflow bits.
ACTIVE = 16


def row_flags(
    output: losses.LossOutput,
    per_sample_wire: tuple[torch.Tensor, ...],
    flags: list[torch.Tensor],
    *,
    reads_free: bool = False,
) -> list[torch.Tensor]:
    """Per row of each sample set, which of the things that can go wrong did (bit set).

    Adds to what the kernel step found (scores, gradients) the losses' own overflow.
    Computed on the device with a few vectorised passes and never read there: the
    host reads them with the losses, after the batch's one wait. `reads_free`: as
    in `not_finite_rows`, where a finite sum proves a set of values clean.
    """
    for s, loss in enumerate(output.per_sample):
        flag_not_finite(flags[s], loss, LOSS_OVERFLOW, reads_free=reads_free)
    for s, wire in enumerate(per_sample_wire):
        flag_not_finite(flags[s], wire, PER_SAMPLE_OVERFLOW, reads_free=reads_free)
    return flags


def flag_not_finite(
    flags: torch.Tensor, values: torch.Tensor, bit: int, *, reads_free: bool = False
) -> None:
    """Sets `bit` in `flags` on every row of `values` ((N,) or (N, C)) holding a NaN or Inf.

    Where reading a value costs nothing (the CPU), one sum over all the values settles
    the usual case: a finite sum proves every row clean, and no flag is touched.
    """
    if reads_free and math.isfinite(values.sum().item()):
        return  # an empty tensor sums to 0
    flags |= not_finite_rows(values, reads_free=reads_free).to(torch.uint8) * bit


def scores_flags(
    inputs: tuple[torch.Tensor, ...], input_sets: tuple[int, ...], check: bool
) -> list[torch.Tensor]:
    """Zeroed flags per sample set, with SCORES_NOT_FINITE on non-finite rows if `check`."""
    flags = [
        torch.zeros(
            int(inputs[input_sets.index(s)].shape[0]), dtype=torch.uint8, device=inputs[0].device
        )
        for s in range(max(input_sets) + 1)
    ]
    if check:
        for k, scores in enumerate(inputs):
            flags[input_sets[k]] |= not_finite_rows(scores).to(torch.uint8) * SCORES_NOT_FINITE
    return flags


def not_finite_rows(tensor: torch.Tensor, *, reads_free: bool = False) -> torch.Tensor:
    """Rows holding a NaN or Inf.

    Args:
        tensor: (N,) or (N, C).
        reads_free: Whether looking at a value on the host costs nothing (the CPU).
            Then a row sum, the cheapest reduction, finds the candidates and only a
            non-finite sum (a NaN or Inf, or finite values summing past the range)
            pays for the exact scan. Elsewhere that look would wait for the device:
            one exact reduction, which keeps NaN (on CUDA the max-norm, one pass
            without an (N, C) temporary; on the CPU the max of absolute values).
    """
    if tensor.dim() == 1:
        return ~torch.isfinite(tensor)
    if reads_free:
        candidates = ~torch.isfinite(tensor.sum(1))
        if not bool(candidates.any()):
            return candidates
    if tensor.device.type == "cuda":
        return ~torch.isfinite(torch.linalg.vector_norm(tensor, ord=float("inf"), dim=1))
    return ~torch.isfinite(tensor.abs().amax(1))
