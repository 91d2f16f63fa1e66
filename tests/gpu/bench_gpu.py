"""The GPU benchmark: kernels against the bandwidth floor, engine latency, service throughput.

What it measures, in one run (figures are ratios to floors measured in the same run):

- bandwidth: a device-to-device copy `dst.copy_(src)` of a large buffer (one read and
  one write: 2 x bytes / time); on the CPU the same copy in host memory (memcpy).
- kernels: loss + gradient of Weston-Watkins (`multiclass_hinge`) and `binary_hinge`
  as the server runs them (up-cast of half scores, kernel, gradient back to the score
  dtype), timed with CUDA events (median of N after a warm-up), against the floor of
  one read of the scores and targets (labels) and one write of the gradient at the
  measured copy bandwidth. Binary hinge has as many scores as the multiclass matrix
  has elements. Target: >= 60% of the copy bandwidth at float32 on a GPU.
- engine: a Worker's whole batch (checks, host-to-device copy, kernel, split,
  device-to-host copy), no gRPC, on the GPU and on the CPU: the small-batch latencies
  that decide whether small requests should go to a CPU worker.
- service: closed-loop throughput of a real server process (`--devices cuda:0`, then
  `--devices cpu`) at concurrency 8 and 32, and single-caller latency of small
  requests. The driver sends pre-serialized requests (the SDK's work is not measured)
  and verifies one answer per request shape against a float64 reference.

Without CUDA (or with --device cpu) only the CPU cells run and the GPU ones are
reported as skipped. The table comes last; JSON goes to --output after every section.

    python tests/gpu/bench_gpu.py [--device auto|cpu] [--quick] [--output gpu-check.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from hingeloss._requests import build_request
from hingeloss._results import decode_response
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import BatchingConfig, LimitsConfig
from hingeloss_server.engine import fused, losses
from hingeloss_server.engine.compute import compute_batch
from hingeloss_server.engine.device_worker import Worker, staging_bytes
from hingeloss_server.engine.losses import weston_watkins
from hingeloss_server.engine.staging import DeviceStaging
from hingeloss_server.engine.validation import prepare
from hingeloss_server.transport.request_codec import decode_request

# tests/, for the helpers package: this runs as a script (gpu_check.sh) and is imported by
# test_gpu_check_script.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.servers import ServerProcess, server_argv  # noqa: E402

SCHEMA = "hingeloss-gpu-check/1"
TARGET_FRACTION = 0.6
COMPUTE_METHOD = "/hingeloss.v1.LossService/Compute"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.max_send_message_length", 1 << 30),
    # One connection per channel: several channels to one target would share one otherwise.
    ("grpc.use_local_subchannel_pool", 1),
]
CALLERS_PER_CHANNEL = 8


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run."""

    gpu_kernel_shape: tuple[int, int] = (65536, 1000)
    cpu_kernel_shape: tuple[int, int] = (4096, 1000)
    gpu_copy_bytes: int = 1 << 30
    cpu_copy_bytes: int = 256 << 20
    warmup: int = 3
    reps: int = 20
    cpu_reps: int = 10
    engine_shapes: tuple[tuple[int, int], ...] = ((32, 10), (256, 1000), (4096, 1000))
    engine_gpu_only_shapes: tuple[tuple[int, int], ...] = ((65536, 1000),)
    throughput_shapes: tuple[tuple[int, int], ...] = ((256, 1000), (4096, 1000))
    concurrencies: tuple[int, ...] = (8, 32)
    latency_shapes: tuple[tuple[int, int], ...] = ((32, 10), (256, 1000))
    warmup_s: float = 0.5
    min_window_s: float = 2.0
    max_window_s: float = 6.0
    latency_window_s: float = 1.0


QUICK = Plan(
    gpu_kernel_shape=(4096, 1000),
    cpu_kernel_shape=(1024, 256),
    gpu_copy_bytes=64 << 20,
    cpu_copy_bytes=32 << 20,
    warmup=3,
    reps=5,
    cpu_reps=5,
    engine_shapes=((32, 10), (256, 1000)),
    engine_gpu_only_shapes=(),
    throughput_shapes=((256, 1000),),
    concurrencies=(8,),
    latency_shapes=((32, 10),),
    warmup_s=0.1,
    min_window_s=0.3,
    max_window_s=1.0,
    latency_window_s=0.3,
)


def log(message: str) -> None:
    print(message, flush=True)


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


# -------------------------------- timing


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds per call: CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def summary_ms(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered),
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
        "samples": len(ordered),
    }


def copy_bandwidth(device: torch.device, nbytes: int, plan: Plan) -> dict[str, Any]:
    """Bytes moved per second by `dst.copy_(src)`: one read and one write of nbytes."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    reps = plan.reps if device.type == "cuda" else plan.cpu_reps
    times = time_ms(lambda: dst.copy_(src), device, plan.warmup, reps)
    stats = summary_ms(times)
    moved = 2 * src.nbytes
    return {
        "device": str(device),
        "method": "dst.copy_(src)",
        "buffer_bytes": nbytes,
        "bytes_moved": moved,
        **stats,
        "gb_per_s": moved / (stats["median_ms"] / 1e3) / 1e9,
    }


# -------------------------------- kernels against the bandwidth floor


def _reference_multiclass(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample Weston-Watkins (margin 1, kink zero) and its slopes d l_i / d f, float64."""
    rows = np.arange(len(targets))
    z = 1.0 - scores[rows, targets][:, None] + scores
    z[rows, targets] = 0.0
    slopes = (z > 0).astype(np.float64)
    slopes[rows, targets] = -slopes.sum(axis=1)
    return np.maximum(z, 0.0).sum(axis=1), slopes


def _reference_binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = 1.0 - labels * scores
    return np.maximum(z, 0.0), np.where(z > 0, -labels, 0.0)


def _mismatch(got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> dict[str, Any]:
    bad = ~np.isclose(got, want, rtol=rtol, atol=atol)
    return {
        "max_abs_error": float(np.max(np.abs(got - want))) if got.size else 0.0,
        "mismatches": int(bad.sum()),
        "elements": int(bad.size),
    }


def kernel_cell(
    device: torch.device,
    loss: str,
    shape: tuple[int, int],
    dtype: torch.dtype,
    bandwidth: dict[str, Any],
    plan: Plan,
) -> dict[str, Any]:
    """Times loss + gradient as a worker computes it; compares with the copy floor."""
    rows, classes = shape
    generator = torch.Generator(device=device).manual_seed(0)
    compute = torch.float32
    if loss == "multiclass_hinge":
        scores = torch.randn(shape, generator=generator, device=device).to(dtype)
        other = torch.randint(0, classes, (rows,), generator=generator, device=device)
        n = rows
    else:
        n = rows * classes
        scores = torch.randn((n,), generator=generator, device=device).to(dtype)
        signs = torch.randint(0, 2, (n,), generator=generator, device=device)
        other = signs.to(torch.int8).mul_(2).sub_(1)  # +-1 as int8, as the server uploads them
    row_scale = torch.full((n,), 1.0 / n, dtype=compute, device=device)

    def eager_step() -> tuple[torch.Tensor, torch.Tensor]:
        x = scores if scores.dtype == compute else scores.to(compute)
        if loss == "multiclass_hinge":
            out = losses.multiclass_hinge(
                x,
                other,
                margin=1.0,
                power=1,
                kink_one=False,
                class_weights=None,
                divide_by_num_classes=False,
                row_scale=row_scale,
            )
        else:
            out = losses.binary_hinge(
                x, other.to(compute), margin=1.0, power=1, kink_one=False, row_scale=row_scale
            )
        grad = out.grads[0]
        return out.per_sample[0], grad if grad.dtype == dtype else grad.to(dtype)

    margin = torch.ones(1, dtype=compute, device=device)

    def fused_step() -> tuple[torch.Tensor, torch.Tensor]:
        """What a GPU worker runs: the Triton kernel, gradient written in the wire dtype."""
        if loss == "multiclass_hinge":
            factor = weston_watkins.row_factor(
                other,
                num_classes=classes,
                dtype=compute,
                class_weights=None,
                divide_by_num_classes=False,
                ignore_mask=None,
            )
            out = fused.weston_watkins(
                scores,
                other,
                margin=margin,
                power=1,
                kink_one=False,
                factor=factor,
                row_scale=row_scale,
                ignore_mask=None,
                grad_dtype=dtype,
                need_grad=True,
            )
        else:
            out = fused.binary_hinge(
                scores,
                other,
                margin=margin,
                power=1,
                kink_one=False,
                row_scale=row_scale,
                grad_dtype=dtype,
                need_grad=True,
            )
        assert out.grad is not None
        return out.per_sample, out.grad

    reps = plan.reps if device.type == "cuda" else plan.cpu_reps
    use_fused = device.type == "cuda" and fused.AVAILABLE
    step = fused_step if use_fused else eager_step
    stats = summary_ms(time_ms(step, device, plan.warmup, reps))
    eager_ms = (
        summary_ms(time_ms(eager_step, device, plan.warmup, reps))["median_ms"]
        if use_fused
        else stats["median_ms"]
    )
    # The floor counts every tensor the contract makes a kernel read or write: the scores,
    # targets (int64) or labels (int8) and row scales in; the gradient (wire dtype),
    # per-sample losses (compute dtype) and activity flags (one byte) out.
    per_row_out = compute.itemsize + 1
    floor_bytes = 2 * scores.nbytes + other.nbytes + row_scale.nbytes + n * per_row_out
    floor_ms = floor_bytes / (bandwidth["gb_per_s"] * 1e9) * 1e3
    fraction = floor_ms / stats["median_ms"]

    per_sample, grad = step()
    check_rows = 256 if loss == "multiclass_hinge" else 256 * classes
    x64 = scores[:check_rows].double().cpu().numpy()
    if loss == "multiclass_hinge":
        want_loss, want_slopes = _reference_multiclass(x64, other[:check_rows].cpu().numpy())
    else:
        want_loss, want_slopes = _reference_binary(x64, other[:check_rows].double().cpu().numpy())
    half = dtype in (torch.float16, torch.bfloat16)
    grad_rtol = 2.0**-7 if half else 1e-5
    loss_check = _mismatch(
        per_sample[:check_rows].double().cpu().numpy(), want_loss, rtol=1e-5, atol=1e-4
    )
    grad_check = _mismatch(
        grad[:check_rows].double().cpu().numpy() * n, want_slopes, rtol=grad_rtol, atol=1e-3
    )
    # Rounding may flip a hinge argument within ~1e-7 of zero: a handful of elements at most.
    verified = all(
        c["mismatches"] <= max(2, c["elements"] // 100_000) for c in (loss_check, grad_check)
    )
    gpu = device.type == "cuda"
    return {
        "device": str(device),
        "loss": loss,
        "shape": shape_text((rows, classes)) if loss == "multiclass_hinge" else str(n),
        "elements": rows * classes,
        "dtype": str(dtype).removeprefix("torch."),
        "kernel": "fused" if use_fused else "eager",
        **stats,
        "eager_median_ms": eager_ms,
        "floor_bytes": floor_bytes,
        "floor_counts": (
            "scores + targets/labels + row scales read; gradient + per-sample losses"
            " + activity flags written"
        ),
        "floor_ms": floor_ms,
        "achieved_gb_per_s": floor_bytes / (stats["median_ms"] / 1e3) / 1e9,
        "fraction_of_copy_bandwidth": fraction,
        "target_fraction": TARGET_FRACTION if gpu and dtype == torch.float32 else None,
        "target_met": (fraction >= TARGET_FRACTION) if gpu and dtype == torch.float32 else None,
        "verified": verified,
        "check": {"per_sample": loss_check, "grad": grad_check, "rows": check_rows},
    }


# -------------------------------- the engine: a worker's whole batch, no gRPC


def multiclass_request(shape: tuple[int, int], seed: int = 0) -> tuple[pb.ComputeRequest, Any]:
    rng = np.random.default_rng(seed)
    rows, classes = shape
    inputs = {
        "scores": rng.standard_normal((rows, classes), dtype=np.float32),
        "targets": rng.integers(0, classes, size=rows),
    }
    request, kind = build_request("multiclass_hinge", inputs, {"request_id": f"bench-{rows}"})
    return request, (inputs, kind)


def engine_cell(device: torch.device, shape: tuple[int, int], plan: Plan) -> dict[str, Any]:
    """Worker.run (value checks + compute_batch) and compute_batch alone (copies + kernel)."""
    request, _ = multiclass_request(shape)
    job = decode_request(request, LimitsConfig())
    prepared = prepare(job, check_scores=device.type != "cuda")
    # Pinned buffers as a server whose --max-batch-bytes admits the request keeps them.
    pinned = staging_bytes(BatchingConfig(max_batch_bytes=max(32 << 20, job.nbytes)))
    worker = Worker(f"hingeloss-bench-{device}", device, None, pinned_bytes=pinned)
    staging = DeviceStaging(device, pinned)
    try:

        def run() -> None:
            outcomes, _ = worker.run([job])
            if outcomes[0].error is not None:
                raise RuntimeError(str(outcomes[0].error))

        def batch() -> None:
            with torch.inference_mode():
                compute_batch(
                    [prepared], device, staging=staging, scores_checked=device.type != "cuda"
                )

        reps = plan.reps if device.type == "cuda" else plan.cpu_reps
        # Both synchronize with the device before they return: wall-clock timing.
        host = torch.device("cpu")
        stats = summary_ms(time_ms(run, host, plan.warmup, reps))
        batch_stats = summary_ms(time_ms(batch, host, plan.warmup, reps))
    finally:
        worker.close()
    return {
        "device": str(device),
        "shape": shape_text(shape),
        **stats,
        "compute_batch_median_ms": batch_stats["median_ms"],
    }


# -------------------------------- the service: a real server process, a closed-loop driver


@dataclass
class LoopResult:
    completed: int
    window_s: float
    latencies_s: list[float]
    errors: dict[str, int]
    samples: list[bytes]


async def closed_loop(
    target: str,
    payload: bytes,
    concurrency: int,
    warmup_s: float,
    min_window_s: float,
    max_window_s: float,
    min_completed: int,
) -> LoopResult:
    """`concurrency` callers, each sending the next request once its answer is back.

    Counts answers that arrive inside the window; the window lasts at least
    min_window_s and until min_completed answers arrived, max_window_s at most.
    Calls still in flight when it closes are cancelled.
    """
    loop = asyncio.get_running_loop()
    channels = [
        grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        for _ in range(max(1, math.ceil(concurrency / CALLERS_PER_CHANNEL)))
    ]
    # No serializers: bytes in, bytes out, so the driver does no protobuf work.
    methods = [channel.unary_unary(COMPUTE_METHOD) for channel in channels]
    window: dict[str, float] = {}
    latencies: list[float] = []
    samples: list[bytes] = []
    errors: Counter[str] = Counter()
    stop = asyncio.Event()

    async def caller(index: int) -> None:
        method = methods[index % len(methods)]
        while not stop.is_set():
            started = loop.time()
            try:
                response = await method(payload, timeout=120)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                await asyncio.sleep(0.01)
                continue
            ended = loop.time()
            if "start" in window and "end" not in window:
                latencies.append(ended - started)
                if len(samples) < 16 and len(latencies) % 4 == 1:
                    samples.append(response)

    async def clock() -> None:
        await asyncio.sleep(warmup_s)
        window["start"] = loop.time()
        while True:
            await asyncio.sleep(0.05)
            elapsed = loop.time() - window["start"]
            if elapsed >= max_window_s or (
                elapsed >= min_window_s and len(latencies) >= min_completed
            ):
                break
        window["end"] = loop.time()
        stop.set()

    callers = [asyncio.create_task(caller(i)) for i in range(concurrency)]
    try:
        await clock()
    finally:
        # Calls still in flight are cancelled, not awaited: a slow device would hold the run.
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return LoopResult(
        completed=len(latencies),
        window_s=window["end"] - window["start"],
        latencies_s=latencies,
        errors=dict(errors),
        samples=samples,
    )


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def service_cell(
    server: ServerProcess,
    device: str,
    shape: tuple[int, int],
    concurrency: int,
    payload: bytes,
    plan: Plan,
    latency_only: bool = False,
) -> dict[str, Any]:
    rows, classes = shape
    window = (
        (plan.latency_window_s, plan.latency_window_s * 4, 30)
        if latency_only
        else (plan.min_window_s, plan.max_window_s, 2 * concurrency)
    )
    result = asyncio.run(closed_loop(server.target, payload, concurrency, plan.warmup_s, *window))
    timings = [pb.ComputeResponse.FromString(raw).timing for raw in result.samples]
    rps = result.completed / result.window_s if result.window_s else 0.0
    latencies_ms = [s * 1e3 for s in result.latencies_s]
    return {
        "device": device,
        "shape": shape_text(shape),
        "dtype": "float32",
        "loss": "multiclass_hinge",
        "concurrency": concurrency,
        "completed": result.completed,
        "window_s": result.window_s,
        "requests_per_s": rps,
        "rows_per_s": rps * rows,
        "request_mb_per_s": rps * rows * classes * 4 / 1e6,
        "p50_ms": _percentile(latencies_ms, 50),
        "p90_ms": _percentile(latencies_ms, 90),
        "p99_ms": _percentile(latencies_ms, 99),
        "errors": result.errors,
        "mean_batch_rows": statistics.mean(t.batch_rows for t in timings) if timings else None,
        "mean_batch_requests": (
            statistics.mean(t.batch_requests for t in timings) if timings else None
        ),
        "mean_server_compute_ms": (
            statistics.mean(t.compute_us for t in timings) / 1e3 if timings else None
        ),
        "served_on": sorted({t.device for t in timings}),
    }


def verify_service(server: ServerProcess, shape: tuple[int, int]) -> dict[str, Any]:
    """One answer against the float64 reference (float32 scores: a few flips at the kink)."""
    request, (inputs, kind) = multiclass_request(shape, seed=1)
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        raw = channel.unary_unary(COMPUTE_METHOD)(request.SerializeToString(), timeout=120)
    result = decode_response(pb.ComputeResponse.FromString(raw), kind)
    per_sample, slopes = _reference_multiclass(
        inputs["scores"].astype(np.float64), inputs["targets"]
    )
    rows = shape[0]
    loss_ok = math.isclose(result.loss, float(per_sample.mean()), rel_tol=1e-5, abs_tol=1e-6)
    grad_check = _mismatch(np.asarray(result.grad, np.float64) * rows, slopes, 1e-5, 1e-3)
    ok = loss_ok and grad_check["mismatches"] <= max(2, grad_check["elements"] // 100_000)
    return {"shape": shape_text(shape), "verified": ok, "loss_ok": loss_ok, "grad": grad_check}


def service_section(device: str, plan: Plan, workdir: Path) -> dict[str, Any]:
    log(f"service on {device}: starting a server process")
    payloads = {
        shape: multiclass_request(shape)[0].SerializeToString()
        for shape in {*plan.throughput_shapes, *plan.latency_shapes}
    }
    section: dict[str, Any] = {"throughput": [], "latency": [], "verification": []}
    started = time.monotonic()
    flags = ("--reflection", "false", "--drain-seconds", "2", "--log-level", "WARNING")
    name = f"server-{device.replace(':', '')}"
    with ServerProcess(server_argv(*flags, device=device), workdir, name=name) as server:
        section["start_s"] = time.monotonic() - started
        for shape in sorted(payloads):
            section["verification"].append(verify_service(server, shape))
        for shape in plan.throughput_shapes:
            for concurrency in plan.concurrencies:
                cell = service_cell(server, device, shape, concurrency, payloads[shape], plan)
                log(
                    f"  {device} {shape_text(shape)} x{concurrency}: "
                    f"{cell['requests_per_s']:.1f} req/s, p50 {_ms(cell['p50_ms'])} ms"
                )
                section["throughput"].append(cell)
        for shape in plan.latency_shapes:
            cell = service_cell(server, device, shape, 1, payloads[shape], plan, latency_only=True)
            log(f"  {device} {shape_text(shape)} x1: p50 {_ms(cell['p50_ms'])} ms")
            section["latency"].append(cell)
    return section


# -------------------------------- pytest's results (from gpu_check.sh)


def pytest_summary(junit: Path | None, exit_code: int | None) -> dict[str, Any] | None:
    if junit is None:
        return None
    summary: dict[str, Any] = {"exit_code": exit_code, "junit": str(junit)}
    if not junit.exists():
        summary["error"] = "no junit report (pytest did not finish)"
        return summary
    counts = Counter[str]()
    failed: list[str] = []
    collection_errors: list[str] = []
    for case in ElementTree.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                if child.get("message") == "collection failure":
                    collection_errors.append(name)
                    outcome = "collection_error"
                else:
                    failed.append(name)
                    outcome = "failed" if child.tag == "failure" else "errors"
                break
            if child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    summary.update(counts=dict(counts), failed=failed, collection_errors=collection_errors)
    return summary


# -------------------------------- the report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def decisions(report: dict[str, Any]) -> dict[str, Any]:
    """What the figures say about a fused kernel and about routing small batches to the CPU."""
    out: dict[str, Any] = {}
    gpu_f32 = [
        k for k in report["kernels"] if k["target_fraction"] is not None and k["dtype"] == "float32"
    ]
    if gpu_f32:
        worst = min(gpu_f32, key=lambda k: k["fraction_of_copy_bandwidth"])
        needed = any(not k["target_met"] for k in gpu_f32)
        out["fused_kernel"] = {
            "needed": needed,
            "worst": f"{worst['loss']} {worst['shape']} float32 at "
            f"{_pct(worst['fraction_of_copy_bandwidth'])} of the copy bandwidth",
            "why": (
                "below the 60% target: the kernel moves more than the contract's bytes"
                if needed
                else "meets the 60% target"
            ),
        }
    else:
        out["fused_kernel"] = {"needed": None, "why": "not measured: no GPU"}
    routing = []
    engine = {(e["device"], e["shape"]): e["median_ms"] for e in report["engine"]}
    latency = {
        (cell["device"], cell["shape"]): cell["p50_ms"]
        for section in report["service"].values()
        for cell in section.get("latency", [])
    }
    for shape in sorted({shape for _, shape in engine}):
        gpu_devices = sorted(d for d, s in engine if s == shape and d.startswith("cuda"))
        if not gpu_devices or ("cpu", shape) not in engine:
            continue
        gpu = gpu_devices[0]
        routing.append(
            {
                "shape": shape,
                "engine_gpu_ms": engine[(gpu, shape)],
                "engine_cpu_ms": engine[("cpu", shape)],
                "engine_cpu_faster": engine[("cpu", shape)] < engine[(gpu, shape)],
                "service_gpu_p50_ms": latency.get((gpu, shape)),
                "service_cpu_p50_ms": latency.get(("cpu", shape)),
            }
        )
    out["small_batch_routing"] = routing or "not measured: no GPU"
    return out


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    lines = [
        "",
        "=" * 100,
        f"hingeloss GPU check: {env.get('gpu') or 'no GPU'} | torch {env['torch']} "
        f"(CUDA {env.get('cuda') or '-'}) | {env['cpu_count']} CPUs",
    ]
    if report.get("gpu_skipped"):
        lines.append(f"GPU parts SKIPPED: {report['gpu_skipped']}")
    tests = report.get("tests")
    if tests:
        counts = tests.get("counts", {})
        text = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or tests.get("error", "")
        lines.append(f"GPU tests (pytest -m gpu, exit {tests.get('exit_code')}): {text}")
        for name in tests.get("failed", [])[:20]:
            lines.append(f"  FAILED {name}")
        for name in tests.get("collection_errors", [])[:20]:
            lines.append(f"  NOT COLLECTED {name}")
    lines.append("")
    lines.append("Copy bandwidth (dst.copy_(src), read + write):")
    for device, bw in report["bandwidth"].items():
        lines.append(
            f"  {device:8} {bw['buffer_bytes'] / 2**20:7.0f} MiB  {bw['median_ms']:8.3f} ms  "
            f"{bw['gb_per_s']:8.1f} GB/s"
        )
    lines.append("")
    lines.append("Kernels: loss + gradient, median time against the bandwidth floor")
    header = (
        f"  {'device':8} {'loss':17} {'shape':11} {'dtype':9} {'kernel':6} {'ms':>8} "
        f"{'eager ms':>9} {'floor ms':>9} {'GB/s':>8} {'of copy bw':>10}  {'target':7} verified"
    )
    lines.append(header)
    for k in report["kernels"]:
        target = "-"
        if k["target_met"] is not None:
            target = "met" if k["target_met"] else "MISSED"
        lines.append(
            f"  {k['device']:8} {k['loss']:17} {k['shape']:11} {k['dtype']:9} "
            f"{k.get('kernel', 'eager'):6} {k['median_ms']:8.3f} "
            f"{k.get('eager_median_ms', k['median_ms']):9.3f} "
            f"{k['floor_ms']:9.3f} {k['achieved_gb_per_s']:8.1f} "
            f"{_pct(k['fraction_of_copy_bandwidth']):>10}  {target:7} "
            f"{'yes' if k['verified'] else 'NO'}"
        )
    lines.append("")
    lines.append(
        "Engine: one request through a worker (value checks + copies, kernel, split), "
        "median ms [compute_batch alone]"
    )
    shapes = sorted({e["shape"] for e in report["engine"]}, key=_shape_key)
    devices = sorted({e["device"] for e in report["engine"]})
    engine = {(e["device"], e["shape"]): e for e in report["engine"]}
    lines.append(f"  {'shape':11} " + " ".join(f"{d:>22}" for d in devices))
    for shape in shapes:
        cells = []
        for device in devices:
            cell = engine.get((device, shape))
            text = "-"
            if cell is not None:
                text = f"{_ms(cell['median_ms'])} [{_ms(cell.get('compute_batch_median_ms'))}]"
            cells.append(f"{text:>22}")
        lines.append(f"  {shape:11} {' '.join(cells)}")
    lines.append("")
    lines.append("Service: multiclass_hinge float32, closed loop over gRPC (one server process)")
    lines.append(
        f"  {'device':8} {'shape':10} {'conc':>4} {'req/s':>9} {'rows/s':>11} {'MB/s in':>8} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'batch rows':>10} errors"
    )
    for device, section in report["service"].items():
        if "error" in section:
            lines.append(f"  {device:8} FAILED: {section['error'].splitlines()[-1]}")
            continue
        for cell in [*section["throughput"], *section["latency"]]:
            batch = cell["mean_batch_rows"]
            lines.append(
                f"  {device:8} {cell['shape']:10} {cell['concurrency']:>4} "
                f"{cell['requests_per_s']:9.1f} {cell['rows_per_s']:11.0f} "
                f"{cell['request_mb_per_s']:8.1f} {_ms(cell['p50_ms']):>8} "
                f"{_ms(cell['p99_ms']):>8} {'-' if batch is None else f'{batch:.0f}':>10} "
                f"{sum(cell['errors'].values()) or ''}"
            )
        bad = [v["shape"] for v in section["verification"] if not v["verified"]]
        if bad:
            lines.append(f"  {device:8} ANSWERS WRONG at {', '.join(bad)}")
    ratios = service_ratios(report)
    if ratios:
        lines.append("  GPU over CPU throughput: " + ", ".join(ratios))
    lines.append("")
    lines.append("Decisions:")
    fused = report["decisions"]["fused_kernel"]
    lines.append(
        f"  fused kernel: {fused['why']}" + (f" ({fused['worst']})" if "worst" in fused else "")
    )
    routing = report["decisions"]["small_batch_routing"]
    if isinstance(routing, str):
        lines.append(f"  small-batch routing: {routing}")
    else:
        for r in routing:
            lines.append(
                f"  small-batch routing {r['shape']}: engine GPU {_ms(r['engine_gpu_ms'])} ms "
                f"vs CPU {_ms(r['engine_cpu_ms'])} ms; service p50 GPU "
                f"{_ms(r['service_gpu_p50_ms'])} vs CPU {_ms(r['service_cpu_p50_ms'])} ms"
                + (" -> CPU faster" if r["engine_cpu_faster"] else "")
            )
    problems = report.get("problems", [])
    for problem in problems:
        lines.append(f"PROBLEM: {problem}")
    lines.append(f"JSON: {report['output']}")
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)


def _shape_key(shape: str) -> tuple[int, ...]:
    return tuple(int(d) for d in shape.split("x"))


def service_ratios(report: dict[str, Any]) -> list[str]:
    cells: dict[tuple[str, str, int], float] = {}
    for device, section in report["service"].items():
        for cell in section.get("throughput", []):
            cells[(device, cell["shape"], cell["concurrency"])] = cell["requests_per_s"]
    ratios = []
    for (device, shape, concurrency), rps in sorted(cells.items()):
        cpu = cells.get(("cpu", shape, concurrency))
        if device.startswith("cuda") and cpu:
            ratios.append(f"{shape} x{concurrency}: {rps / cpu:.1f}x")
    return ratios


# -------------------------------- main


def environment(cuda: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
            visible_gpus=torch.cuda.device_count(),
        )
    return env


@contextmanager
def section(report: dict[str, Any], name: str, write: Callable[[], None]) -> Iterator[None]:
    """Runs one section; a failure is recorded (with its traceback) and the run goes on."""
    started = time.monotonic()
    try:
        yield
    except Exception as error:
        report["problems"].append(f"{name}: {type(error).__name__}: {error}")
        traceback.print_exc()
    report["seconds"][name] = round(time.monotonic() - started, 2)
    write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and windows (smoke run)")
    parser.add_argument("--output", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--pytest-junit", type=Path, default=None)
    parser.add_argument("--pytest-exit-code", type=int, default=None)
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else Plan()
    cuda = args.device == "auto" and torch.cuda.is_available()
    gpu_skipped = None
    if not cuda:
        gpu_skipped = (
            "--device cpu"
            if args.device == "cpu"
            else f"CUDA is not available (torch {torch.__version__})"
        )
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "gpu_skipped": gpu_skipped,
        "environment": environment(cuda),
        "tests": pytest_summary(args.pytest_junit, args.pytest_exit_code),
        "bandwidth": {},
        "kernels": [],
        "engine": [],
        "service": {},
        "problems": [],
        "seconds": {},
        "output": str(args.output),
    }

    def write() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        tmp.replace(args.output)

    log(f"bench_gpu: {'GPU and CPU' if cuda else 'CPU only (' + str(gpu_skipped) + ')'}")
    devices = [torch.device("cuda", 0)] if cuda else []
    devices.append(torch.device("cpu"))

    with section(report, "kernels", write):
        for device in devices:
            gpu = device.type == "cuda"
            nbytes = plan.gpu_copy_bytes if gpu else plan.cpu_copy_bytes
            bandwidth = copy_bandwidth(device, nbytes, plan)
            report["bandwidth"][str(device)] = bandwidth
            log(f"bandwidth {device}: {bandwidth['gb_per_s']:.1f} GB/s")
            shape = plan.gpu_kernel_shape if gpu else plan.cpu_kernel_shape
            for loss in ("multiclass_hinge", "binary_hinge"):
                for dtype in (torch.float32, torch.bfloat16):
                    cell = kernel_cell(device, loss, shape, dtype, bandwidth, plan)
                    report["kernels"].append(cell)
                    log(
                        f"kernel {device} {loss} {cell['shape']} {cell['dtype']}: "
                        f"{cell['median_ms']:.3f} ms, "
                        f"{_pct(cell['fraction_of_copy_bandwidth'])} of copy bandwidth"
                    )
                    if not cell["verified"]:
                        report["problems"].append(
                            f"kernel {device} {loss} {cell['dtype']}: answers differ from "
                            f"the reference: {cell['check']}"
                        )
            if gpu:
                torch.cuda.empty_cache()

    with section(report, "engine", write):
        for device in devices:
            shapes = list(plan.engine_shapes)
            if device.type == "cuda":
                shapes += plan.engine_gpu_only_shapes
            for shape in shapes:
                cell = engine_cell(device, shape, plan)
                report["engine"].append(cell)
                log(f"engine {device} {cell['shape']}: {cell['median_ms']:.3f} ms")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if not args.skip_service:
        with tempfile.TemporaryDirectory(prefix="hingeloss-bench-") as workdir:
            for device in devices:
                name = str(device)
                with section(report, f"service {name}", write):
                    try:
                        report["service"][name] = service_section(name, plan, Path(workdir))
                    except Exception as error:
                        report["service"][name] = {"error": f"{type(error).__name__}: {error}"}
                        raise
                    for check in report["service"][name]["verification"]:
                        if not check["verified"]:
                            report["problems"].append(f"service {name}: wrong answer: {check}")
                    for cell in report["service"][name]["throughput"]:
                        if cell["errors"]:
                            report["problems"].append(
                                f"service {name} {cell['shape']} x{cell['concurrency']}: "
                                f"errors {cell['errors']}"
                            )

    report["decisions"] = decisions(report)
    write()
    print_table(report)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
