"""The GPU check itself, in its CPU mode: `make test` exercises the script and the benchmark.

The GPU-only parts of the report (decisions, the table's GPU rows) run here on a
synthetic report, so that they are known to work before a CUDA machine runs them.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_gpu
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "gpu_check.sh"


def run_script(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HINGELOSS_PYTHON": python}
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cpu_smoke_runs_the_benchmark_and_writes_json(tmp_path: Path) -> None:
    output = tmp_path / "gpu-check.json"
    started = time.monotonic()
    done = run_script("--cpu-smoke", "--output", str(output))
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # About 10 s on two cores; the bound leaves room for a loaded machine.
    assert elapsed < 60

    report = json.loads(output.read_text())
    assert report["schema"] == bench_gpu.SCHEMA
    assert report["gpu_skipped"] == "--device cpu"
    assert report["problems"] == []
    assert report["bandwidth"]["cpu"]["gb_per_s"] > 0
    cells = {(k["device"], k["loss"], k["dtype"]) for k in report["kernels"]}
    assert cells == {
        ("cpu", loss, dtype)
        for loss in ("multiclass_hinge", "binary_hinge")
        for dtype in ("float32", "bfloat16")
    }
    for kernel in report["kernels"]:
        assert kernel["verified"]
        assert kernel["fraction_of_copy_bandwidth"] > 0
        assert kernel["target_met"] is None  # the target is for a GPU at float32
    assert {e["shape"] for e in report["engine"]} == {"32x10", "256x1000"}
    service = report["service"]["cpu"]
    assert all(v["verified"] for v in service["verification"])
    assert service["throughput"][0]["requests_per_s"] > 0
    assert service["throughput"][0]["errors"] == {}
    assert service["latency"][0]["p50_ms"] > 0
    assert report["decisions"]["fused_kernel"]["needed"] is None

    # The table comes last and says what was skipped.
    assert "GPU parts SKIPPED: --device cpu" in done.stdout
    tail = done.stdout.rstrip().splitlines()[-4:]
    assert any(line.startswith("JSON: ") for line in tail)
    assert tail[-1] == "== gpu_check.sh: exit 0"


def test_an_interpreter_that_cannot_run_the_check_is_named(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'missing torch (ImportError: no module)'\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    done = run_script("--cpu-smoke", "--output", str(tmp_path / "x.json"), python=str(fake))
    assert done.returncode == 3
    assert "missing torch" in done.stdout
    assert not (tmp_path / "x.json").exists()


def test_a_gpu_this_torch_cannot_use_fails_the_check(tmp_path: Path) -> None:
    """nvidia-smi lists a GPU, the interpreter's torch has no CUDA: exit 4, no false green."""
    if torch.cuda.is_available():
        pytest.skip("this torch can use CUDA")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0000)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "HINGELOSS_PYTHON": sys.executable}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--output", str(tmp_path / "x.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 4, done.stdout + done.stderr
    assert "cannot use CUDA" in done.stdout
    assert not (tmp_path / "x.json").exists()


def test_unknown_argument_is_refused() -> None:
    done = run_script("--gpu-please")
    assert done.returncode == 2
    assert "unknown argument" in done.stderr


# -------------------------------- the GPU parts of the report, on a synthetic report

GPU = "cuda:0"


def _kernel(device: str, loss: str, dtype: str, fraction: float) -> dict[str, Any]:
    gpu = device.startswith("cuda")
    return {
        "device": device,
        "loss": loss,
        "shape": "65536x1000" if loss == "multiclass_hinge" else "65536000",
        "dtype": dtype,
        "median_ms": 0.5,
        "floor_ms": 0.5 * fraction,
        "achieved_gb_per_s": 1000.0,
        "fraction_of_copy_bandwidth": fraction,
        "target_fraction": 0.6 if gpu and dtype == "float32" else None,
        "target_met": (fraction >= 0.6) if gpu and dtype == "float32" else None,
        "verified": True,
    }


def _service_cell(device: str, shape: str, concurrency: int, rps: float) -> dict[str, Any]:
    return {
        "device": device,
        "shape": shape,
        "concurrency": concurrency,
        "requests_per_s": rps,
        "rows_per_s": rps * 256,
        "request_mb_per_s": rps,
        "p50_ms": 1.5,
        "p99_ms": 3.0,
        "mean_batch_rows": 512.0,
        "errors": {},
    }


@pytest.fixture
def gpu_report(tmp_path: Path) -> dict[str, Any]:
    service = {
        device: {
            "throughput": [
                _service_cell(device, "256x1000", 8, rps),
                _service_cell(device, "4096x1000", 32, rps / 4),
            ],
            "latency": [_service_cell(device, "32x10", 1, 900.0)],
            "verification": [{"shape": "256x1000", "verified": True}],
        }
        for device, rps in ((GPU, 800.0), ("cpu", 200.0))
    }
    return {
        "environment": {
            "gpu": "NVIDIA H100 80GB HBM3",
            "torch": "2.x",
            "cuda": "13.0",
            "cpu_count": 16,
        },
        "gpu_skipped": None,
        "tests": bench_gpu.pytest_summary(tmp_path / "missing.xml", 1),
        "bandwidth": {GPU: {"buffer_bytes": 1 << 30, "median_ms": 0.7, "gb_per_s": 3000.0}},
        "kernels": [
            _kernel(GPU, "multiclass_hinge", "float32", 0.42),
            _kernel(GPU, "multiclass_hinge", "bfloat16", 0.30),
            _kernel(GPU, "binary_hinge", "float32", 0.75),
            _kernel("cpu", "binary_hinge", "float32", 0.05),
        ],
        "engine": [
            {"device": GPU, "shape": "32x10", "median_ms": 0.30},
            {"device": "cpu", "shape": "32x10", "median_ms": 0.12},
            {"device": GPU, "shape": "65536x1000", "median_ms": 40.0},
        ],
        "service": service,
        "problems": [],
        "output": str(tmp_path / "gpu-check.json"),
    }


def test_decisions_and_table_of_a_gpu_report(
    gpu_report: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    report = copy.deepcopy(gpu_report)
    report["decisions"] = bench_gpu.decisions(report)
    fused = report["decisions"]["fused_kernel"]
    assert fused["needed"] is True
    assert "multiclass_hinge 65536x1000 float32 at 42%" in fused["worst"]
    (routing,) = report["decisions"]["small_batch_routing"]
    assert routing["shape"] == "32x10"
    assert routing["engine_cpu_faster"] is True
    assert routing["service_gpu_p50_ms"] == 1.5

    bench_gpu.print_table(report)
    table = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in table
    assert "no junit report" in table
    assert "MISSED" in table
    assert "met" in table
    assert "256x1000 x8: 4.0x" in table
    assert "-> CPU faster" in table
    json.dumps(report)  # the report stays JSON


def test_pytest_summary_counts_outcomes_and_collection_errors(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.gpu.test_a" name="test_ok"/>'
        '<testcase classname="tests.gpu.test_a" name="test_skip"><skipped/></testcase>'
        '<testcase classname="tests.gpu.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="" name="tests.deploy"><error message="collection failure"/>'
        "</testcase></testsuite></testsuites>"
    )
    summary = bench_gpu.pytest_summary(junit, 1)
    assert summary is not None
    assert summary["counts"] == {
        "passed": 1,
        "skipped": 1,
        "failed": 1,
        "collection_error": 1,
    }
    assert summary["failed"] == ["tests.gpu.test_a::test_bad"]
    assert summary["collection_errors"] == ["tests.deploy"]
