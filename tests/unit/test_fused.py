"""The fused CUDA kernel for Weston-Watkins, checked on the CPU by Triton's interpreter.

The GPU tests (tests/gpu) run it compiled; here every dtype and option runs
interpreted against the eager kernel, which stays the reference.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_fused_kernel_matches_eager_in_every_dtype_and_option() -> None:
    pytest.importorskip("triton", reason="Triton is not installed (the fused kernel is unused)")
    seed = int(os.environ.get("HINGELOSS_TEST_SEED", secrets.randbits(32)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "server"), str(ROOT / "client")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "fused_interpreted.py"), str(seed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, f"seed {seed}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    assert "fused kernel matches eager" in done.stdout
