"""The figures of a batch on their way to the host: packed on the device, one copy, read back.

Per-sample losses, activity, per-row flags and the margins sampled for the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hingeloss_server.engine import losses
from hingeloss_server.engine.row_flags import ACTIVE
from hingeloss_server.engine.staging import DeviceStaging, HostLease


@dataclass
class Figures:
    """The per-row figures of a batch on the host, one array per sample set."""

    per_sample: list[np.ndarray[Any, Any]]
    active: list[np.ndarray[Any, Any]]
    flags: list[np.ndarray[Any, Any]]
    margins: torch.Tensor


@dataclass
class Downloads:
    """The batch's host copies, started; read only after the batch's wait.

    On CUDA the figures are one byte buffer: per-sample losses and margins in the
    compute dtype, then one flags byte per row (activity included): 5 bytes a row
    at float32, one copy. On the CPU they are the tensors themselves.
    """

    figures: list[torch.Tensor]
    set_sizes: list[int]
    dtype: torch.dtype
    grads: tuple[torch.Tensor, ...]
    per_sample: tuple[torch.Tensor, ...]
    lease: HostLease | None
    # Per score input with a factored gradient: its packed mask and its row values.
    factors: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def read_figures(self) -> Figures:
        n = len(self.set_sizes)
        if len(self.figures) > 1:  # the CPU: as computed
            pieces = self.figures
            return Figures(
                per_sample=[t.numpy() for t in pieces[:n]],
                active=[t.numpy() for t in pieces[n : 2 * n]],
                flags=[t.numpy() for t in pieces[2 * n : 3 * n]],
                margins=pieces[3 * n],
            )
        packed = self.figures[0]
        rows = sum(self.set_sizes)
        values_bytes = packed.numel() - rows
        values = packed[:values_bytes].view(self.dtype)
        bits = [t.numpy() for t in torch.split(packed[values_bytes:], self.set_sizes)]
        return Figures(
            per_sample=[t.numpy() for t in torch.split(values[:rows], self.set_sizes)],
            active=[(b & ACTIVE) != 0 for b in bits],
            # Without the activity bit: a job whose rows carry no other bit skips the scan.
            flags=[b & (0xFF ^ ACTIVE) for b in bits],
            margins=values[rows:],
        )


def pack_figures(
    per_sample: Sequence[torch.Tensor],
    active: Sequence[torch.Tensor],
    flags: Sequence[torch.Tensor],
    margins: torch.Tensor,
) -> torch.Tensor:
    """One byte buffer: losses and margins in their dtype, then a flags byte per row."""
    values = torch.cat([*per_sample, margins]).view(torch.uint8)
    bits = [f | a.to(torch.uint8) * ACTIVE for f, a in zip(flags, active, strict=True)]
    return torch.cat([values, *bits])


def download(
    staging: DeviceStaging,
    output: losses.LossOutput,
    flags: list[torch.Tensor],
    margins: torch.Tensor,
    grads_wire: tuple[torch.Tensor, ...],
    per_sample_wire: tuple[torch.Tensor, ...],
) -> Downloads:
    """Starts every device-to-host copy of the batch; on CUDA the figures go packed in one."""
    dtype = output.per_sample[0].dtype
    if staging.cuda:
        figures = [pack_figures(output.per_sample, output.active, flags, margins)]
    else:
        figures = [*output.per_sample, *output.active, *flags, margins]
    factors = [t for f in output.factors for t in (f.mask_bits, f.values)]
    hosts, lease = staging.download([*figures, *grads_wire, *per_sample_wire, *factors])
    grads_end = len(figures) + len(grads_wire)
    per_sample_end = grads_end + len(per_sample_wire)
    factor_hosts = hosts[per_sample_end:]
    return Downloads(
        figures=hosts[: len(figures)],
        set_sizes=[int(p.shape[0]) for p in output.per_sample],
        dtype=dtype,
        grads=tuple(hosts[len(figures) : grads_end]),
        per_sample=tuple(hosts[grads_end:per_sample_end]),
        lease=lease,
        factors=tuple(zip(factor_hosts[::2], factor_hosts[1::2], strict=True)),
    )
