"""`make bench-sdk`: what SDK callers get for large requests, in parts or in one message.

For each shape and gradient format, a sync LossClient with 1 call in flight and an
AsyncLossClient with 8 compute Weston-Watkins (float32) against one server, every
request uploaded in parts (ComputeUpload, `upload_min_bytes=0`) or sent in one
message (Compute, `upload_min_bytes=None`). The SDK is on the clock whole: building
the request, sending it, decoding the answer. Each measurement runs in a fresh
process, since one process measuring both ways mixes their allocator states (one-
message sync calls at 4096x1000 ran at 15 to 39 a second there), and the two ways
alternate, `--repeats` times. Prints requests/s (the range over the repeats) and
writes JSON. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hingeloss import AsyncLossClient, LossClient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for the helpers package
from helpers.servers import ServerProcess, server_argv  # noqa: E402

WAYS = {"parts": 0, "one message": None}
FLAVOURS = {"sync": 1, "asyncio": 8}  # requests in flight


def _inputs(rows: int, classes: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(rows)
    return rng.standard_normal((rows, classes)).astype(np.float32), rng.integers(0, classes, rows)


def _sync_rps(args: argparse.Namespace, upload_min_bytes: int | None) -> float:
    scores, targets = _inputs(args.rows, args.classes)
    with LossClient(args.target, upload_min_bytes=upload_min_bytes) as client:
        for _ in range(2):
            client.multiclass_hinge(scores, targets, gradient_format=args.format)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            client.multiclass_hinge(scores, targets, gradient_format=args.format)
            done += 1
        return done / (time.perf_counter() - started)


async def _asyncio_rps(args: argparse.Namespace, upload_min_bytes: int | None) -> float:
    scores, targets = _inputs(args.rows, args.classes)
    async with AsyncLossClient(args.target, upload_min_bytes=upload_min_bytes) as client:
        for _ in range(2):
            await client.multiclass_hinge(scores, targets, gradient_format=args.format)
        done, started = 0, time.perf_counter()

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() - started < args.seconds:
                await client.multiclass_hinge(scores, targets, gradient_format=args.format)
                done += 1

        await asyncio.gather(*(caller() for _ in range(FLAVOURS["asyncio"])))
        return done / (time.perf_counter() - started)


def _child(args: argparse.Namespace) -> None:
    """One measurement, in this fresh process; prints its requests/s."""
    upload_min_bytes = WAYS[args.way]
    if args.flavour == "sync":
        rps = _sync_rps(args, upload_min_bytes)
    else:
        rps = asyncio.run(_asyncio_rps(args, upload_min_bytes))
    print(json.dumps({"rps": rps}))


def _measure(args: argparse.Namespace, target: str, cell: dict[str, Any]) -> float:
    argv = [sys.executable, __file__, "--child", "--target", target]
    argv += ["--seconds", str(args.seconds)]
    argv += [f"--{k}={v}" for k, v in cell.items()]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["rps"])


def _cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {"rows": rows, "classes": args.classes, "format": gradient_format}
        for rows in args.rows_list
        for gradient_format in args.formats
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-list", type=int, nargs="+", default=[128, 1024, 2048, 4096])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--formats", nargs="+", default=["dense", "factored"])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench-sdk-results.json"))
    # One measurement (run by the parent in a fresh process).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--flavour", choices=FLAVOURS, help=argparse.SUPPRESS)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        server = ServerProcess(server_argv("--log-level", "WARNING"), Path(workdir)).start()
        try:
            server.wait_ready()
            for cell in _cells(args):
                for flavour in FLAVOURS:
                    rps: dict[str, list[float]] = {way: [] for way in WAYS}
                    for repeat in range(args.repeats):
                        ways = list(WAYS) if repeat % 2 == 0 else list(reversed(WAYS))
                        for way in ways:
                            measured = {**cell, "flavour": flavour, "way": way}
                            rps[way].append(_measure(args, server.target, measured))
                    results.append({**cell, "flavour": flavour, "rps": rps})
                    print(_line(results[-1]), flush=True)
        finally:
            server.stop()
    args.output.write_text(json.dumps({"cells": results}, indent=2))
    return 0


def _line(result: dict[str, Any]) -> str:
    def span(values: list[float]) -> str:
        return f"{min(values):,.0f}-{max(values):,.0f}"

    rps = result["rps"]
    shape = f"{result['rows']}x{result['classes']}"
    return (
        f"{shape:>10} {result['format']:>8} {result['flavour']:>7} "
        f"({FLAVOURS[result['flavour']]} in flight): parts {span(rps['parts'])}, "
        f"one message {span(rps['one message'])} requests/s"
    )


if __name__ == "__main__":
    sys.exit(main())
