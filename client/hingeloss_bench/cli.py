"""`hingeloss-bench`: load-tests a hingeloss server and verifies a sample of its answers.

Closed loop (`--concurrency 1,8,32`, a sweep) or open loop (`--rate 500`, Poisson
or constant arrivals, latency from the scheduled send time). Exits 1 when any
request failed or any verified answer differed from the local float64 reference.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hingeloss import __version__
from hingeloss_bench import reference
from hingeloss_bench.cells import MODES, CellSpec, TargetSpec
from hingeloss_bench.processes import run_shares
from hingeloss_bench.report import errors_text, render_table, write_csv, write_json, write_plot
from hingeloss_bench.stats import CellResult, merge
from hingeloss_bench.workload import DTYPES, GRADIENT_FORMATS, LOSSES, WorkloadSpec, parse_shape


def _numbers(kind: type[int] | type[float], text: str) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, got {text!r}") from None
    if width < 100 or height < 100:
        raise argparse.ArgumentTypeError(f"the plot must be at least 100x100, got {text!r}")
    return width, height


def _option(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    parsed: Any = value
    for kind in (int, float):
        try:
            parsed = kind(value)
            break
        except ValueError:
            continue
    return name.strip().replace("-", "_"), parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hingeloss-bench",
        description="Load-test a hingeloss server: throughput, latency percentiles, the "
        "server's queue/compute split, and verified answers.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    target = parser.add_argument_group("target")
    target.add_argument(
        "--target", default="localhost:50051", help="host:port (default %(default)s)"
    )
    target.add_argument("--tls", action="store_true", help="use TLS (the system's CA roots)")
    target.add_argument("--tls-ca", type=Path, help="CA certificate (PEM): use TLS with it")
    target.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mTLS")
    target.add_argument("--tls-key", type=Path, help="client private key (PEM), for mTLS")
    target.add_argument(
        "--tls-server-name", help="expected server name, when it differs from the host"
    )
    target.add_argument("--token", help="bearer token")
    target.add_argument("--token-file", type=Path, help="file holding the bearer token")
    target.add_argument(
        "--local-token",
        action="store_true",
        help="send the token without TLS to a server on this machine (testing only)",
    )
    target.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, s")

    work = parser.add_argument_group("workload")
    work.add_argument("--loss", choices=LOSSES, default="multiclass_hinge")
    work.add_argument(
        "--shape", default="256x1000", help="BxC (1-D losses use B); default %(default)s"
    )
    work.add_argument("--dtype", choices=DTYPES, default="float32")
    work.add_argument("--gradient-format", choices=GRADIENT_FORMATS, default="dense")
    work.add_argument("--sparsity", type=float, help="share of samples with a zero loss, e.g. 0.9")
    work.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"loss option, repeatable; one of {', '.join(reference.SUPPORTED_OPTIONS)}",
    )
    work.add_argument("--seed", type=int, default=0)

    load = parser.add_argument_group("load")
    sweep = load.add_mutually_exclusive_group()
    sweep.add_argument(
        "--concurrency",
        type=lambda t: _numbers(int, t),
        help="closed loop: requests in flight, a comma-separated sweep (default 1,8,32)",
    )
    sweep.add_argument(
        "--rate",
        type=lambda t: _numbers(float, t),
        help="open loop: requests per second, a comma-separated sweep",
    )
    load.add_argument(
        "--arrivals",
        choices=("poisson", "constant"),
        default="poisson",
        help="open-loop arrival process (default %(default)s)",
    )
    length = load.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, default=5.0, help="seconds per cell (default 5)")
    length.add_argument("--requests", type=int, help="measured requests per cell, instead")
    load.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds first (default 1)"
    )
    load.add_argument(
        "--mode",
        choices=MODES,
        default="unary",
        help="unary Compute calls, ComputeUpload calls (the scores in parts of 1 MiB, as "
        "the SDK sends large requests: from 0.5 MB of scores on LossClient, 8 MB on "
        "AsyncLossClient), or pipelined on ComputeStream calls",
    )
    load.add_argument("--connections", type=int, default=1, help="channels per load process")
    load.add_argument("--processes", type=int, default=1, help="load processes (spawned)")
    load.add_argument(
        "--verify-fraction",
        type=float,
        default=0.02,
        help="share of answers checked against a float64 numpy reference; the "
        "first of each cell always is; 0 turns checking off (default %(default)s)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, help="results as JSON")
    out.add_argument("--csv", type=Path, help="results as CSV, one row per cell")
    out.add_argument("--plot", type=Path, help="PNG of p50/p99 latency against throughput")
    out.add_argument(
        "--plot-size", type=_size, default=(960, 600), help="WxH pixels (default 960x600)"
    )
    out.add_argument("--quiet", action="store_true", help="no live progress")
    return parser


def _target(args: argparse.Namespace) -> TargetSpec:
    token = args.token
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return TargetSpec(
        address=args.target,
        use_tls=args.tls,
        root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
        private_key=args.tls_key.read_bytes() if args.tls_key else None,
        certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
        server_name=args.tls_server_name,
        token=token,
        local_token=args.local_token,
    )


def cell_specs(args: argparse.Namespace) -> list[CellSpec]:
    """The sweep the arguments ask for, one CellSpec per concurrency or rate."""
    batch, classes = parse_shape(args.shape)
    options = dict(args.option)
    reference.check_options(options, args.loss)
    workload = WorkloadSpec(
        loss=args.loss,
        batch=batch,
        classes=classes or 2,
        dtype=args.dtype,
        sparsity=args.sparsity,
        gradient_format=args.gradient_format,
        options=options,
        seed=args.seed,
    )
    target = _target(args)
    common: dict[str, Any] = {
        "target": target,
        "workload": workload,
        "arrivals": args.arrivals,
        "mode": args.mode,
        "duration_s": args.duration,
        "requests": args.requests,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "verify_fraction": args.verify_fraction,
        "timeout_s": args.timeout,
        "seed": args.seed,
    }
    if args.rate:
        return [CellSpec(concurrency=None, rate=rate, **common) for rate in args.rate]
    return [CellSpec(concurrency=c, **common) for c in (args.concurrency or [1, 8, 32])]


class _Progress:
    """Live progress with rich on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self._progress: Any = None
        self.console: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[answered]} answered, {task.fields[rate]} req/s"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def hook(self, spec: CellSpec) -> Any:
        if self._progress is None:
            return None
        expected = spec.warmup_s + (spec.duration_s if spec.requests is None else 0.0)
        task = self._progress.add_task(spec.label, total=expected or None, answered=0, rate="-")

        def update(answered: int, elapsed: float) -> None:
            measured = max(1e-9, elapsed - spec.warmup_s)
            rate = f"{answered / measured:,.0f}" if elapsed > spec.warmup_s else "-"
            completed = min(elapsed, expected) if spec.requests is None else None
            self._progress.update(task, completed=completed, answered=answered, rate=rate)

        return update


def _document(args: argparse.Namespace, results: list[CellResult]) -> dict[str, Any]:
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("token", "option")
    }
    settings["option"] = dict(args.option)
    return {
        "tool": "hingeloss-bench",
        "version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": settings,
        "cells": [r.to_dict() for r in results],
    }


def run(args: argparse.Namespace) -> int:
    specs = cell_specs(args)
    interactive = sys.stderr.isatty() and not args.quiet
    results: list[CellResult] = []
    with _Progress(interactive) as progress:
        for spec in specs:
            shares = run_shares(spec, args.processes, progress.hook(spec))
            result = merge(spec, shares, tag=f"{spec.mode}")
            results.append(result)
            if not args.quiet and not interactive:
                print(
                    f"{spec.label}: {result.rps:,.1f} req/s, p99 {result.latency_p99_ms:.2f} ms, "
                    f"errors {errors_text(result)}",
                    file=sys.stderr,
                )
    title = (
        f"hingeloss-bench {args.target}: {specs[0].workload.loss} {specs[0].workload.shape_text} "
        f"{specs[0].workload.dtype}, {args.mode}, gradient {args.gradient_format}"
    )
    console = None
    if sys.stdout.isatty():
        from rich.console import Console

        console = Console()
    text = render_table(results, title, console)
    if text is not None:
        print(text)
    for result in results:
        if result.sent == 0:
            print(
                f"warning ({result.label}): no request was measured; the warm-up answers took "
                "longer than the cell: raise --duration or use --requests",
                file=sys.stderr,
            )
        for mismatch in result.mismatches:
            print(f"MISMATCH ({result.label}): {mismatch}", file=sys.stderr)
    if args.output:
        write_json(args.output, _document(args, results))
    if args.csv:
        write_csv(args.csv, results)
    if args.plot:
        write_plot(args.plot, {f"{args.mode}": results}, args.plot_size, title)
    return 1 if any(r.error_count or not r.sent for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.processes < 1 or args.connections < 1:
        parser.error("--processes and --connections must be >= 1")
    if not 0.0 <= args.verify_fraction <= 1.0:
        parser.error("--verify-fraction must be in [0, 1]")
    try:
        return run(args)
    except (ValueError, OSError) as error:
        print(f"hingeloss-bench: error: {error}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"hingeloss-bench: error: no connection to {args.target}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        print(f"hingeloss-bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = ["build_parser", "cell_specs", "main", "run"]
