"""The factored multi-class gradient: its bitmask's bit order, and its expansion to dense.

At power 1 every entry of a Weston-Watkins or Crammer-Singer gradient row is 0, the
row's value v_i (a share of it, for tied Crammer-Singer maxima) or, on the true
class, minus a multiple of it: a bitmask and one value per row carry all of it. The
server packs the mask here (on its device, in one pass) and the SDK expands it here
(numpy, or torch on the caller's device), repeating the server kernels' operations in
the same dtype and order: the expansion equals the dense gradient bit for bit.

Bit order: ceil(C / 8) bytes per row; entry j of a row is bit j % 8 of byte j // 8,
least significant bit first, as ``numpy.packbits(mask, axis=1, bitorder="little")``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


class FactoredRule(enum.Enum):
    """How a row's value spreads over its row (see FactoredGradient in the proto)."""

    # m_ij * v_i on competitors; -(v_i * count_i) on the true class.
    WESTON_WATKINS = "weston_watkins"
    # v_i on the one marked competitor, 0 elsewhere; -v_i on the true class.
    FIRST_INDEX = "first_index"
    # m_ij * (v_i / k_i) on the k_i marked competitors; -v_i on the true class.
    SPLIT_EVENLY = "split_evenly"


def packed_width(num_classes: int) -> int:
    """Bytes of one packed row."""
    return (num_classes + 7) // 8


# ---- packing (the server, on its device) -------------------------------------------


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """Packs an (N, C) mask of 0s and 1s into (N, ceil(C/8)) uint8, LSB first, on its device.

    On the CPU, numpy's packbits (1.7x faster at 4096x1000 than the product below).
    """
    import torch

    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.bool().numpy(), axis=1, bitorder="little"))
    return pack_rows_by_product(mask)


def pack_rows_by_product(mask: torch.Tensor) -> torch.Tensor:
    """`pack_rows` on any device: one matrix-vector product per 8 columns.

    Each byte is the dot product of 8 entries with (1, 2, ..., 128), exact in any
    float dtype (and in TF32).
    """
    import torch

    rows, columns = mask.shape
    whole = columns // 8 * 8
    weights = torch.tensor([1 << b for b in range(8)], dtype=mask.dtype, device=mask.device)
    parts = [mask[:, :whole].reshape(rows, whole // 8, 8) @ weights]
    if whole < columns:
        parts.append((mask[:, whole:] @ weights[: columns - whole]).unsqueeze(1))
    packed = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return packed.to(torch.uint8).reshape(rows, packed_width(columns))


def pack_one_hot(columns: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Packs one set bit per row, at `columns` (int64, shape (N, 1)), without an (N, C) pass."""
    import torch

    packed = torch.zeros(
        (columns.shape[0], packed_width(num_classes)), dtype=torch.uint8, device=columns.device
    )
    bits = torch.bitwise_left_shift(torch.ones_like(columns), columns % 8).to(torch.uint8)
    return packed.scatter_(1, columns // 8, bits)


# ---- expansion (the SDK) -------------------------------------------------------------


@dataclass(frozen=True)
class FactoredGrad:
    """A factored gradient as it came: the packed mask and the per-row values.

    Attributes:
        mask_bits: uint8, shape (B, ceil(C / 8)), in the bit order above.
        values: v, shape (B,), in the compute dtype.
        dense_shape: (B, C).
        rule: how v spreads over a row.
        true_classes: the column of each row's true class (0 on ignored rows), int64.
    """

    mask_bits: Any
    values: Any
    dense_shape: tuple[int, int]
    rule: FactoredRule
    true_classes: Any

    def mask(self) -> Any:
        """The mask as booleans, shape (B, C), as numpy or torch like `values`."""
        if isinstance(self.mask_bits, np.ndarray):
            return unpack_numpy(self.mask_bits, self.dense_shape[1]).astype(bool)
        return unpack_torch(self.mask_bits, self.dense_shape[1]).bool()


def unpack_numpy(bits: np.ndarray[Any, Any], num_classes: int) -> np.ndarray[Any, Any]:
    """(B, ceil(C/8)) uint8 -> (B, C) uint8 of 0s and 1s."""
    return np.unpackbits(bits, axis=1, count=num_classes, bitorder="little")


# Set bits of each byte value, for numpy releases before np.bitwise_count (2.0).
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def row_counts_numpy(bits: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """Set entries per row, counted on the packed bytes, as `dtype`, shape (B,).

    Equal to the sum of the unpacked 0/1 row in `dtype` wherever that sum is exact or
    correctly rounded, as torch's is (it accumulates half and bfloat16 in float32): the
    count is an integer, rounded once. An eighth of the reads of a sum over the mask.
    """
    bitwise_count = getattr(np, "bitwise_count", None)
    ones = bitwise_count(bits) if bitwise_count is not None else _POPCOUNT[bits]
    counts: np.ndarray[Any, Any] = ones.sum(1, dtype=np.int64).astype(dtype)
    return counts


def unpack_torch(bits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, ceil(C/8)) uint8 -> (B, C) uint8 of 0s and 1s, on the bits' device."""
    import torch

    if bits.device.type == "cpu":  # numpy's table lookup: several times faster than shifts
        return torch.from_numpy(unpack_numpy(bits.numpy(), num_classes))
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    spread = torch.bitwise_right_shift(bits.unsqueeze(2), shifts).bitwise_and_(1)
    return spread.reshape(bits.shape[0], -1)[:, :num_classes]


def expand_torch(factored: FactoredGrad, dtype: torch.dtype) -> torch.Tensor:
    """The dense gradient in `dtype`, computed on the device of `factored.values`.

    The operations are the eager kernels' (losses.py), in the compute dtype, in order;
    only the row counts may come from the packed bits, which give the same values.
    """
    import torch

    values = factored.values
    mask = unpack_torch(factored.mask_bits, factored.dense_shape[1]).to(values.dtype)
    true = factored.true_classes.unsqueeze(1)
    column = values.unsqueeze(1)
    if factored.rule is FactoredRule.WESTON_WATKINS:
        count = _row_counts_torch(factored.mask_bits, mask)
        grad = mask.mul_(column)
        grad.scatter_(1, true, values.mul(count).neg_().unsqueeze(1))
    elif factored.rule is FactoredRule.SPLIT_EVENLY:
        grad = mask.mul_(column / _row_counts_torch(factored.mask_bits, mask).unsqueeze(1))
        grad.scatter_(1, true, column.neg())
    else:
        # The kernel scatters v into zeros: +0.0 elsewhere, whatever the sign of v.
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        grad = torch.where(mask.bool(), column, zero)
        grad.scatter_(1, true, column.neg())
    return grad.to(dtype)


def _row_counts_torch(bits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`mask.sum(1)` in the mask's dtype; on the CPU counted on the packed bytes instead.

    The same values (an integer count, rounded once, as torch's float accumulation
    rounds it), from an eighth of the reads.
    """
    import torch

    if bits.device.type != "cpu":
        return mask.sum(1)
    counts = row_counts_numpy(bits.numpy(), np.dtype(np.int64))
    return torch.from_numpy(counts).to(mask.dtype)


def expand_numpy(factored: FactoredGrad, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """The dense gradient as a numpy array of `dtype`; the same operations as expand_torch."""
    values = factored.values
    compute = values.dtype
    bits = factored.mask_bits
    # 0s and 1s as uint8: the products below widen them to `compute` as they go, one
    # pass, where widening first would write and read back a (B, C) float array.
    mask = unpack_numpy(bits, factored.dense_shape[1])
    rows = np.arange(mask.shape[0])
    true = factored.true_classes
    column = values[:, None]
    if factored.rule is FactoredRule.WESTON_WATKINS:
        grad = np.multiply(mask, column, dtype=compute)
        grad[rows, true] = -(values * row_counts_numpy(bits, compute))
    elif factored.rule is FactoredRule.SPLIT_EVENLY:
        share = column / row_counts_numpy(bits, compute)[:, None]
        grad = np.multiply(mask, share, dtype=compute)
        grad[rows, true] = -values
    else:
        grad = np.where(mask != 0, column, compute.type(0))
        grad[rows, true] = -values
    dense: np.ndarray[Any, Any] = grad.astype(dtype, copy=False)
    return dense
