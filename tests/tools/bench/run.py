"""`make bench`: the service measured against its floors, in one run, with one load generator.

(a) the service, (b) the echo server (transport floor), (c) the echo with Compute
registered as the service registers it (the floor of the service's contract), (d) the
plain server (plain_server.py: the loss in closed form with torch in a grpc.aio
handler, what a user would write without this service), (e) the loss in-process with
the project's kernel and with torch autograd (compute floor), (f) the service with
batching off (--max-batch-rows 1), for each shape and concurrency; also the service
with one intra-op thread, metrics on against off (both with one intra-op thread),
row-sparse against dense gradients at sparsity 0.9, and factored gradients (decoded
by the SDK on the clock) against dense ones, the echo, and the replay (the service's
factored answers served again without computing: the floor for factored answers).

Every server runs in its own process, all of them up at once; the load generator
(hingeloss-bench's) runs in this one. The servers compared in a cell are measured
back to back, in rounds whose order rotates, and each figure is the median over the
rounds: on a machine shared with other work, drift then moves both sides of a ratio
alike. Prints figures and ratios and writes JSON. Nothing here is a test: no figure
fails the run; a wrong answer or a failed request does (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import compute_floor
import grpc
import torch

from hingeloss_bench import CellResult, CellSpec, TargetSpec, WorkloadSpec, merge, run_shares
from hingeloss_bench.report import render_table, write_json

HERE = Path(__file__).resolve().parent
# tests/, for the helpers package: this runs as a script.
sys.path.insert(0, str(HERE.parents[1]))
from helpers.servers import ServerProcess as ServerProcess  # noqa: E402 - pressure.py's too
from helpers.servers import server_argv  # noqa: E402


@dataclass(frozen=True)
class Settings:
    shapes: tuple[tuple[int, int], ...]
    concurrency: tuple[int, ...]
    # Measured seconds of each round of a cell, after warmup_s unmeasured.
    round_s: float
    warmup_s: float
    rounds: int
    # Scores of a million elements or more are too slow for a window of round_s: a round
    # measures `large_waves` times the requests in flight (at least `large_requests`),
    # after `large_warmup_s` unmeasured. With one wave (as many requests as in flight),
    # a round timed the calls' common start and drain rather than a full pipeline (see
    # docs/benchmarks.md).
    large_requests: int = 8
    large_waves: int = 3
    large_warmup_s: float = 1.0
    sparse_shape: tuple[int, int] = (4096, 1000)
    sparse_concurrency: int = 8
    sparsity: float = 0.9
    metrics_shape: tuple[int, int] = (32, 10)
    metrics_concurrency: int = 8
    factored_shapes: tuple[tuple[int, int], ...] = ((256, 1000), (4096, 1000))
    factored_concurrency: tuple[int, ...] = (1, 8)


FULL = Settings(
    shapes=((32, 10), (256, 1000), (4096, 1000)),
    concurrency=(1, 8, 32),
    round_s=1.5,
    warmup_s=0.3,
    # Three, so that the median is the middle round: with two, the figure was the lower
    # one, and one disturbed round (the first slot of a comparison most often) decided it.
    rounds=3,
)
QUICK = Settings(
    shapes=((32, 10), (256, 1000)),
    concurrency=(1, 32),
    round_s=1.0,
    warmup_s=0.2,
    rounds=1,
    large_requests=6,
    large_waves=1,
    large_warmup_s=0.2,
    factored_shapes=((256, 1000),),
)

# Performance targets, reported (never asserted).
TARGETS = {
    "service_over_echo": 0.9,
    "service_over_plain": 1.0,
    "batched_over_unbatched": 1.4,
    "closed_form_over_autograd": 5.0,
    "sparse_bytes_over_dense": 0.15,
    "sparse_rps_over_dense": 1.3,
    "factored_bytes_over_dense": 0.04,
    "factored_rps_over_echo": 1.5,
}
# Labels of the factored comparison's arms.
FACTORED, FACTORED_DENSE, FACTORED_ECHO = "factored", "factored: dense", "factored: echo"
FACTORED_REPLAY = "factored: replay"
# The echo registered as the service registers Compute.
ECHO_AS_SERVICE = "echo as service"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_argv(*extra: str) -> list[str]:
    return server_argv("--reflection", "false", "--log-level", "WARNING", *extra)


def server_processes(workdir: Path) -> list[ServerProcess]:
    metrics_port = str(_free_port())
    one_thread = {"OMP_NUM_THREADS": "1"}
    return [
        ServerProcess(service_argv(), workdir, name="service"),
        ServerProcess(service_argv("--max-batch-rows", "1"), workdir, name="unbatched"),
        ServerProcess(service_argv(), workdir, name="one_thread", env=one_thread),
        ServerProcess([sys.executable, str(HERE / "echo_server.py")], workdir, name="echo"),
        ServerProcess(
            [sys.executable, str(HERE / "echo_server.py"), "--as-service"],
            workdir,
            name="echo_as_service",
        ),
        # The service's answers, served again: the replay reads the service's port file
        # on its first request, when every server is up.
        ServerProcess(
            [
                sys.executable,
                str(HERE / "echo_server.py"),
                "--replay-port-file",
                str(workdir / "service.port"),
            ],
            workdir,
            name="replay",
        ),
        ServerProcess([sys.executable, str(HERE / "plain_server.py")], workdir, name="plain"),
        # Compared with one_thread: two intra-op threads make 2-core timings too noisy
        # for an effect this small.
        ServerProcess(
            service_argv("--metrics-host", "127.0.0.1", "--metrics-port", metrics_port),
            workdir,
            name="metrics_on",
            env=one_thread,
        ),
    ]


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: a server and what is sent to it."""

    label: str
    server: str
    gradient_format: str = "dense"
    sparsity: float | None = None

    @property
    def verify(self) -> bool:
        # The echoes' zeros are not answers; the replay's are another request's.
        return self.server not in ("echo", "echo_as_service", "replay")


def _shape(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class Runner:
    """Runs interleaved comparisons with the shared load generator; keeps every round."""

    def __init__(self, settings: Settings, servers: dict[str, ServerProcess]) -> None:
        self.settings = settings
        self.servers = servers
        # (arm label, median round) per cell, and every round.
        self.results: list[tuple[str, CellResult]] = []
        self.rounds: list[tuple[str, CellResult]] = []

    def _spec(self, arm: Arm, shape: tuple[int, int], concurrency: int) -> CellSpec:
        settings = self.settings
        large = shape[0] * shape[1] >= 1 << 20
        return CellSpec(
            target=TargetSpec(self.servers[arm.server].target),
            workload=WorkloadSpec(
                loss="multiclass_hinge",
                batch=shape[0],
                classes=shape[1],
                dtype="float32",
                sparsity=arm.sparsity,
                gradient_format=arm.gradient_format,
            ),
            concurrency=concurrency,
            duration_s=settings.round_s,
            requests=(
                max(settings.large_requests, settings.large_waves * concurrency) if large else None
            ),
            warmup_s=settings.large_warmup_s if large else settings.warmup_s,
            verify_fraction=0.02 if arm.verify else 0.0,
            timeout_s=120.0,
        )

    def compare(
        self, shape: tuple[int, int], concurrency: int, arms: Sequence[Arm], rounds: int
    ) -> dict[str, CellResult]:
        """Measures every arm once per round, in an order that rotates; returns the medians."""
        measured: dict[str, list[CellResult]] = {arm.label: [] for arm in arms}
        for round_index in range(rounds):
            shift = round_index % len(arms)
            for arm in [*arms[shift:], *arms[:shift]]:
                spec = self._spec(arm, shape, concurrency)
                result = merge(spec, run_shares(spec), tag=arm.label)
                measured[arm.label].append(result)
                self.rounds.append((arm.label, result))
        medians = {}
        for arm in arms:
            ordered = sorted(measured[arm.label], key=lambda r: r.rps)
            # The lower median, so that it is a real round, with its own percentiles.
            median = ordered[(len(ordered) - 1) // 2]
            # Errors of any round count.
            errors = [r for r in measured[arm.label] if r.error_count]
            chosen = errors[0] if errors else median
            medians[arm.label] = chosen
            self.results.append((arm.label, chosen))
            self._print(chosen, [r.rps for r in measured[arm.label]])
        return medians

    @staticmethod
    def _print(result: CellResult, rps: list[float]) -> None:
        rounds = "/".join(f"{v:.1f}" for v in rps)
        print(
            f"  {result.tag:<18} {result.shape:>9} c={result.concurrency:<3} "
            f"{result.rps:>8.1f} req/s (rounds {rounds})  p50 {result.latency_p50_ms:7.2f} ms  "
            f"p99 {result.latency_p99_ms:7.2f} ms  queue {result.queue_ms:6.2f}  "
            f"compute {result.compute_ms:6.2f}  batch {result.batch_requests:4.1f}  "
            f"errors {result.error_count}",
            file=sys.stderr,
            flush=True,
        )

    def find(self, label: str, shape: str, concurrency: int) -> CellResult | None:
        for name, result in self.results:
            if name == label and result.shape == shape and result.concurrency == concurrency:
                return result
        return None


def _ratio(
    numerator: CellResult | None, denominator: CellResult | None, attr: str = "rps"
) -> float | None:
    if numerator is None or denominator is None:
        return None
    bottom = getattr(denominator, attr)
    return getattr(numerator, attr) / bottom if bottom else None


def ratios(runner: Runner, floors: list[dict[str, Any]]) -> dict[str, Any]:
    settings = runner.settings
    per_cell = []
    for shape in settings.shapes:
        for concurrency in settings.concurrency:
            name = _shape(shape)
            service = runner.find("service", name, concurrency)
            per_cell.append(
                {
                    "shape": name,
                    "concurrency": concurrency,
                    "service_rps": service.rps if service else None,
                    "service_over_echo": _ratio(service, runner.find("echo", name, concurrency)),
                    "service_over_plain": _ratio(service, runner.find("plain", name, concurrency)),
                    "service_over_echo_as_service": _ratio(
                        service, runner.find(ECHO_AS_SERVICE, name, concurrency)
                    ),
                    "echo_as_service_over_plain": _ratio(
                        runner.find(ECHO_AS_SERVICE, name, concurrency),
                        runner.find("plain", name, concurrency),
                    ),
                    "batched_over_unbatched": _ratio(
                        service, runner.find("unbatched", name, concurrency)
                    ),
                    "one_thread_over_default": _ratio(
                        runner.find("one thread", name, concurrency), service
                    ),
                }
            )
    sparse_shape, sparse_c = _shape(settings.sparse_shape), settings.sparse_concurrency
    sparse = runner.find("row_sparse@0.9", sparse_shape, sparse_c)
    dense = runner.find("dense@0.9", sparse_shape, sparse_c)
    metrics_shape, metrics_c = _shape(settings.metrics_shape), settings.metrics_concurrency
    factored_cells = []
    for shape in settings.factored_shapes:
        for concurrency in settings.factored_concurrency:
            name = _shape(shape)
            factored = runner.find(FACTORED, name, concurrency)
            # Names of their own: `dense` above is the row-sparse comparison's.
            factored_dense = runner.find(FACTORED_DENSE, name, concurrency)
            echo = runner.find(FACTORED_ECHO, name, concurrency)
            replay = runner.find(FACTORED_REPLAY, name, concurrency)
            factored_cells.append(
                {
                    "shape": name,
                    "concurrency": concurrency,
                    "factored_rps": factored.rps if factored else None,
                    "factored_bytes_over_dense": _ratio(factored, factored_dense, "response_bytes"),
                    "factored_rps_over_dense": _ratio(factored, factored_dense),
                    "factored_rps_over_echo": _ratio(factored, echo),
                    # About what a server computing in no time would serve: how far
                    # the ratio above could go with this transport here.
                    "replay_rps_over_echo": _ratio(replay, echo),
                    "factored_rps_over_replay": _ratio(factored, replay),
                }
            )
    return {
        "cells": per_cell,
        "closed_form_over_autograd": {f["shape"]: f["closed_form_over_autograd"] for f in floors},
        "closed_form_over_multi_margin_loss": {
            f["shape"]: f["closed_form_over_multi_margin_loss"] for f in floors
        },
        "metrics_on_over_off": {
            "shape": metrics_shape,
            "concurrency": metrics_c,
            "ratio": _ratio(
                runner.find("metrics on", metrics_shape, metrics_c),
                runner.find("metrics off", metrics_shape, metrics_c),
            ),
        },
        "sparse": {
            "shape": sparse_shape,
            "concurrency": sparse_c,
            "sparsity": settings.sparsity,
            "sparse_bytes_over_dense": _ratio(sparse, dense, "response_bytes"),
            "sparse_rps_over_dense": _ratio(sparse, dense),
            "sparse_rps_over_echo_dense": _ratio(
                sparse, runner.find("echo dense@0.9", sparse_shape, sparse_c)
            ),
        },
        "factored": factored_cells,
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _met(value: float | None, target: float, below: bool = False) -> str:
    if value is None:
        return ""
    return "met" if (value <= target if below else value >= target) else "MISSED"


def print_summary(
    runner: Runner,
    floors: list[dict[str, Any]],
    stages: list[dict[str, Any]],
    ratio: dict[str, Any],
) -> None:
    labels = dict.fromkeys(label for label, _ in runner.results)
    for label in labels:
        rows = [r for name, r in runner.results if name == label]
        title = f"{label} (multiclass_hinge, float32, unary; median of {runner.settings.rounds})"
        print(render_table(rows, title), end="\n\n")

    print("compute floor (in-process, float32, 1 intra-op thread; ms per call)")
    print(
        f"{'shape':>10} {'closed form':>12} {'autograd':>10} {'multi_margin':>13} "
        f"{'copy floor':>11} {'autograd/cf':>12} {'mml/cf(C)':>10}"
    )
    for f in floors:
        print(
            f"{f['shape']:>10} {f['closed_form_s'] * 1e3:12.3f} {f['autograd_s'] * 1e3:10.3f} "
            f"{f['multi_margin_loss_s'] * 1e3:13.3f} {f['bandwidth_floor_s'] * 1e3:11.3f} "
            f"{f['closed_form_over_autograd']:12.1f} "
            f"{f['closed_form_over_multi_margin_loss']:10.1f}"
        )
    print()
    print("server stages, one request in-process (ms): where the time goes without transport")
    keys = ("parse_s", "decode_s", "prepare_s", "compute_batch_s", "encode_s")
    print(f"{'shape':>10} " + " ".join(f"{k[:-2]:>13}" for k in keys) + f" {'kernel':>8}")
    for s in stages:
        if "error" in s:
            print(f"{s['shape']:>10} {s['error']}")
            continue
        print(
            f"{s['shape']:>10} "
            + " ".join(f"{s[k] * 1e3:13.3f}" for k in keys)
            + f" {s['kernel_only_s'] * 1e3:8.3f}"
        )
    print()
    print("ratios (throughput; against the performance targets, reported, never asserted)")
    print(
        f"{'shape':>10} {'c':>3} {'service/echo':>13} {'':>7} {'service/plain':>14} {'':>7} "
        f"{'batched/unbatched':>18} {'':>7} {'1 thread/default':>17} "
        f"{'service/echo as service':>24} {'echo as service/plain':>22}"
    )
    for cell in ratio["cells"]:
        soe, bou = cell["service_over_echo"], cell["batched_over_unbatched"]
        sop = cell["service_over_plain"]
        print(
            f"{cell['shape']:>10} {cell['concurrency']:>3} {_fmt(soe):>13} "
            f"{_met(soe, TARGETS['service_over_echo']):>7} {_fmt(sop):>14} "
            f"{_met(sop, TARGETS['service_over_plain']):>7} {_fmt(bou):>18} "
            f"{_met(bou, TARGETS['batched_over_unbatched']):>7} "
            f"{_fmt(cell['one_thread_over_default']):>17} "
            f"{_fmt(cell['service_over_echo_as_service']):>24} "
            f"{_fmt(cell['echo_as_service_over_plain']):>22}"
        )
    for shape, value in ratio["closed_form_over_autograd"].items():
        print(
            f"closed form / autograd at {shape}: {value:.1f}x "
            f"{_met(value, TARGETS['closed_form_over_autograd'])}"
        )
    metrics = ratio["metrics_on_over_off"]
    print(
        f"metrics on / off at {metrics['shape']} c={metrics['concurrency']}: "
        f"{_fmt(metrics['ratio'], 3)}"
    )
    sparse = ratio["sparse"]
    print(
        f"row-sparse / dense at {sparse['shape']}, sparsity {sparse['sparsity']}, "
        f"c={sparse['concurrency']}: bytes {_fmt(sparse['sparse_bytes_over_dense'], 3)} "
        f"{_met(sparse['sparse_bytes_over_dense'], TARGETS['sparse_bytes_over_dense'], True)}, "
        f"throughput {_fmt(sparse['sparse_rps_over_dense'])} "
        f"{_met(sparse['sparse_rps_over_dense'], TARGETS['sparse_rps_over_dense'])}, "
        f"sparse service / dense echo {_fmt(sparse['sparse_rps_over_echo_dense'])}"
    )
    for cell in ratio["factored"]:
        figures = [
            f"bytes / dense {_against(cell, 'factored_bytes_over_dense', below=True)}",
            f"throughput / echo {_against(cell, 'factored_rps_over_echo')}",
            f"/ dense {_fmt(cell['factored_rps_over_dense'])}",
            f"replay / echo {_fmt(cell['replay_rps_over_echo'])}",
            f"service / replay {_fmt(cell['factored_rps_over_replay'])}",
        ]
        where = f"{cell['shape']} c={cell['concurrency']}"
        print(f"factored (SDK decoding on the clock) at {where}: " + ", ".join(figures))


def _against(cell: dict[str, Any], key: str, below: bool = False) -> str:
    """A ratio of a cell and whether it meets its target."""
    value = cell[key]
    return f"{_fmt(value, 4 if below else 2)} {_met(value, TARGETS[key], below)}".rstrip()


def measure(runner: Runner) -> None:
    """Every comparison of the run."""
    settings = runner.settings
    extremes = (min(settings.concurrency), max(settings.concurrency))
    for shape in settings.shapes:
        for concurrency in settings.concurrency:
            arms = [
                Arm("service", "service"),
                Arm("unbatched", "unbatched"),
                Arm("echo", "echo"),
                Arm(ECHO_AS_SERVICE, "echo_as_service"),
                Arm("plain", "plain"),
            ]
            if concurrency in extremes:
                arms.append(Arm("one thread", "one_thread"))
            runner.compare(shape, concurrency, arms, settings.rounds)
    print("row-sparse against dense ...", file=sys.stderr, flush=True)
    sparsity = settings.sparsity
    runner.compare(
        settings.sparse_shape,
        settings.sparse_concurrency,
        [
            Arm("dense@0.9", "service", "dense", sparsity),
            Arm("row_sparse@0.9", "service", "row_sparse", sparsity),
            Arm("echo dense@0.9", "echo", "dense", sparsity),
        ],
        settings.rounds,
    )
    print("factored against dense and the echo ...", file=sys.stderr, flush=True)
    for shape in settings.factored_shapes:
        for concurrency in settings.factored_concurrency:
            runner.compare(
                shape,
                concurrency,
                [
                    Arm(FACTORED, "service", "factored"),
                    Arm(FACTORED_DENSE, "service", "dense"),
                    Arm(FACTORED_ECHO, "echo", "dense"),
                    Arm(FACTORED_REPLAY, "replay", "factored"),
                ],
                settings.rounds,
            )
    print("metrics on against off ...", file=sys.stderr, flush=True)
    runner.compare(
        settings.metrics_shape,
        settings.metrics_concurrency,
        [Arm("metrics off", "one_thread"), Arm("metrics on", "metrics_on")],
        settings.rounds + 1,
    )


def _loadavg() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--quick", action="store_true", help="a smaller sweep (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds per comparison")
    parser.add_argument("--round-seconds", type=float, help="measured seconds per round")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds:
        settings = replace(settings, rounds=args.rounds)
    if args.round_seconds:
        settings = replace(settings, round_s=args.round_seconds)
    started = time.perf_counter()
    document: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "grpc": grpc.__version__,
            "loadavg_before": _loadavg(),
        },
        "settings": {**settings.__dict__, "quick": args.quick},
    }

    print("compute floor ...", file=sys.stderr, flush=True)
    floors, stages = [], []
    with compute_floor.torch_threads(1):
        for shape in settings.shapes:
            floors.append(compute_floor.compute_floor(*shape))
            try:
                stages.append(compute_floor.server_stages(*shape))
            except Exception as error:  # the internals move; the rest of the run still counts
                stages.append({"shape": _shape(shape), "error": repr(error)})

    with tempfile.TemporaryDirectory(prefix="hingeloss-bench-") as tmp:
        processes = server_processes(Path(tmp))
        with contextlib.ExitStack() as stack:
            print("starting the servers ...", file=sys.stderr, flush=True)
            for process in processes:
                stack.callback(process.stop)
                process.start()
            for process in processes:
                process.wait_ready()
            runner = Runner(settings, {p.name: p for p in processes})
            measure(runner)

    ratio = ratios(runner, floors)
    print_summary(runner, floors, stages, ratio)
    document["machine"]["loadavg_after"] = _loadavg()
    document["elapsed_s"] = time.perf_counter() - started
    document["compute_floor"] = floors
    document["server_stages"] = stages
    document["cells"] = [{"arm": label, **r.to_dict()} for label, r in runner.results]
    document["rounds"] = [{"arm": label, **r.to_dict()} for label, r in runner.rounds]
    document["ratios"] = ratio
    document["targets"] = TARGETS
    write_json(args.output, document)
    print(f"\nwrote {args.output} in {document['elapsed_s']:.0f} s", file=sys.stderr)
    bad = [(label, r) for label, r in runner.rounds if r.error_count and "echo" not in label]
    for label, result in bad:
        print(f"errors in {label} {result.label}: {result.errors} {result.mismatches}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
