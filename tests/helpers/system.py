"""What the machine has: a process's memory, whether CUDA is there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
