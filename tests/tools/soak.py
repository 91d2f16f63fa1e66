"""Soak: mixed load against a real server for a while, with error codes and RSS over time.

    python tests/tools/soak.py --seconds 60               # starts its own server (a subprocess)
    python tests/tools/soak.py --target host:50051 --pid 1234   # an existing one (RSS needs --pid)

The load mixes every loss and dtype: valid requests (a sample of them checked
against float64 references), invalid ones (NaN, labels and targets out of
range, wrong shapes, unknown enum numbers, bytes that are not a request),
client cancellations, tiny deadlines and short streams. Each kind has the codes
it may get; anything else is unexpected (INTERNAL, UNKNOWN, UNAVAILABLE, a
valid request refused, a wrong loss). The server's RSS is sampled throughout.
Exit status 0 when nothing unexpected happened and RSS grew less than the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

# tests/, for the helpers package, when this runs as a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.servers import ServerProcess, server_argv  # noqa: E402

from hingeloss import NO_RETRY, AsyncLossClient, HingelossError
from hingeloss._requests import build_request
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc

MIB = 1 << 20
LOSSES = (
    "binary_hinge",
    "multiclass_hinge",
    "crammer_singer",
    "gan_discriminator",
    "gan_generator",
    "margin_ranking",
)
# Share of each kind of call in the mix.
MIX = {"valid": 55, "invalid": 15, "cancel": 10, "tiny_deadline": 10, "stream": 5, "garbage": 5}
SHED = "RESOURCE_EXHAUSTED"  # load shedding is an acceptable answer to anything
ALLOWED = {
    "valid": {"OK", SHED},
    "invalid": {"INVALID_ARGUMENT", SHED},
    "garbage": {"INVALID_ARGUMENT"},
    "cancel": {"OK", "CANCELLED", SHED},
    "tiny_deadline": {"OK", "DEADLINE_EXCEEDED", SHED},
    "stream": {"OK", SHED},
}


# ---- requests and references -------------------------------------------------------------


def _inputs(loss: str, rng: np.random.Generator, dtype: str) -> tuple[dict[str, Any], float]:
    """Random inputs for a loss with default options, and the float64 reference loss."""
    rows = int(rng.integers(1, 256))
    classes = int(rng.integers(2, 32))
    if loss == "binary_hinge":
        scores, labels = rng.normal(size=rows), rng.choice([-1, 1], size=rows)
        reference = np.maximum(0.0, 1.0 - labels * scores).mean()
        return {"scores": scores.astype(dtype), "labels": labels}, float(reference)
    if loss in ("multiclass_hinge", "crammer_singer"):
        scores = rng.normal(size=(rows, classes))
        targets = rng.integers(0, classes, size=rows)
        true = scores[np.arange(rows), targets][:, None]
        if loss == "multiclass_hinge":
            terms = np.maximum(0.0, 1.0 - true + scores)
            terms[np.arange(rows), targets] = 0.0
            reference = terms.sum(axis=1).mean()
        else:
            others = scores.copy()
            others[np.arange(rows), targets] = -np.inf
            reference = np.maximum(0.0, 1.0 - (true[:, 0] - others.max(axis=1))).mean()
        return {"scores": scores.astype(dtype), "targets": targets}, float(reference)
    if loss == "gan_discriminator":
        real, fake = rng.normal(size=rows), rng.normal(size=int(rng.integers(1, 64)))
        reference = np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean()
        return {"real_scores": real.astype(dtype), "fake_scores": fake.astype(dtype)}, reference
    if loss == "gan_generator":
        fake = rng.normal(size=rows)
        return {"fake_scores": fake.astype(dtype)}, float(-fake.mean())
    a, b, labels = rng.normal(size=rows), rng.normal(size=rows), rng.choice([-1, 1], size=rows)
    reference = np.maximum(0.0, 1.0 - labels * (a - b)).mean()
    return {"scores_a": a.astype(dtype), "scores_b": b.astype(dtype), "labels": labels}, reference


def _invalid(loss: str, rng: np.random.Generator) -> dict[str, Any]:
    """Inputs that break the contract in one of several ways."""
    inputs, _ = _inputs(loss, rng, "float64")
    first = next(iter(inputs))
    broken = {k: np.array(v, copy=True) for k, v in inputs.items()}
    how = rng.integers(0, 3)
    if how == 0:
        broken[first].reshape(-1)[rng.integers(0, broken[first].size)] = np.nan
    elif how == 1 and "labels" in broken:
        broken["labels"][0] = 3
    elif how == 1 and "targets" in broken:
        broken["targets"][-1] = -2
    else:
        broken[first] = broken[first][:-1] if broken[first].shape[0] > 1 else broken[first][:0]
        if loss in ("gan_discriminator", "gan_generator"):
            broken[first] = np.array([np.inf])
    return broken


def _raw_invalid(rng: np.random.Generator) -> pb.ComputeRequest:
    """Requests the SDK would never build: unknown enums, data a few bytes off, nothing set."""
    scores = rng.normal(size=8)
    request, _ = build_request("binary_hinge", {"scores": scores, "labels": np.ones(8)}, {})
    which = rng.integers(0, 4)
    if which == 0:
        request.reduction = 42  # type: ignore[assignment]
    elif which == 1:
        request.binary_hinge.scores.data = request.binary_hinge.scores.data[:-3]
    elif which == 2:
        request.binary_hinge.scores.shape[:] = [1 << 40]
    else:
        request = pb.ComputeRequest(request_id="empty")
    return request


# ---- the load ------------------------------------------------------------------------------


@dataclass
class SoakReport:
    seconds: float = 0.0
    requests: int = 0
    checked: int = 0
    codes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    unexpected: list[str] = field(default_factory=list)
    # (seconds since start, RSS bytes) of the server.
    rss: list[tuple[float, int]] = field(default_factory=list)

    def record(self, kind: str, code: str, detail: str = "") -> None:
        self.requests += 1
        self.codes[kind][code] += 1
        if code not in ALLOWED[kind] and len(self.unexpected) < 50:
            self.unexpected.append(f"{kind}: {code} {detail}".strip()[:300])

    @property
    def rss_growth_bytes(self) -> int:
        """Last RSS minus RSS once warm (a fifth of the way in): growth under steady load."""
        if len(self.rss) < 4:
            return 0
        warm_at = self.rss[-1][0] / 5
        warm = [value for t, value in self.rss if t >= warm_at]
        return int(np.median(warm[-3:]) - np.median(warm[:3]))

    @property
    def rss_slope_mib_per_min(self) -> float:
        warm_at = self.rss[-1][0] / 5 if self.rss else 0.0
        points = [(t, v / MIB) for t, v in self.rss if t >= warm_at]
        if len(points) < 3:
            return 0.0
        times, values = np.array(points).T
        return float(np.polyfit(times, values, 1)[0] * 60)

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "requests_per_second": round(self.requests / max(self.seconds, 1e-9), 1),
            "checked_against_reference": self.checked,
            "codes": {kind: dict(codes) for kind, codes in self.codes.items()},
            "unexpected": self.unexpected,
            "rss_mib": [(round(t, 1), round(v / MIB, 1)) for t, v in self.rss],
            "rss_growth_mib": round(self.rss_growth_bytes / MIB, 1),
            "rss_slope_mib_per_min": round(self.rss_slope_mib_per_min, 2),
        }


def _code(error: BaseException) -> str:
    if isinstance(error, HingelossError):
        name: str = error.code.name
        return name
    if isinstance(error, grpc.RpcError):
        return str(error.code().name)
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return type(error).__name__


async def _user(
    index: int,
    target: str,
    end: float,
    report: SoakReport,
    channel_args: dict[str, Any],
) -> None:
    """One caller: picks a kind of call by MIX, again and again until `end`."""
    rng = np.random.default_rng(index)
    pick = random.Random(index)
    kinds, weights = list(MIX), list(MIX.values())
    loop = asyncio.get_running_loop()
    async with (
        AsyncLossClient(target, retry=NO_RETRY, timeout=30, **channel_args) as client,
        grpc.aio.insecure_channel(target) as raw_channel,
    ):
        stub = pb_grpc.LossServiceStub(raw_channel)  # type: ignore[no-untyped-call]
        raw = raw_channel.unary_unary("/hingeloss.v1.LossService/Compute")
        while loop.time() < end:
            kind = pick.choices(kinds, weights)[0]
            loss = LOSSES[int(rng.integers(0, len(LOSSES)))]
            try:
                await _one(kind, loss, client, stub, raw, rng, report)
            except Exception as error:  # the soak reports, never stops
                report.record(kind, _code(error), repr(error))


async def _one(
    kind: str,
    loss: str,
    client: AsyncLossClient,
    stub: pb_grpc.LossServiceStub,
    raw: Any,
    rng: np.random.Generator,
    report: SoakReport,
) -> None:
    method = getattr(client, loss)
    if kind == "valid":
        dtype = str(rng.choice(["float64", "float64", "float32", "float16"]))
        inputs, reference = _inputs(loss, rng, dtype)
        try:
            result = await method(*inputs.values())
        except HingelossError as error:
            report.record(kind, error.code.name, str(error))
            return
        tolerance = {"float64": 1e-9, "float32": 1e-5, "float16": 1e-2}[dtype]
        if dtype == "float16" or math.isclose(
            result.loss, reference, rel_tol=tolerance, abs_tol=tolerance
        ):
            report.checked += dtype != "float16"
            report.record(kind, "OK")
        else:
            report.record(kind, "WRONG_LOSS", f"{loss}: {result.loss} != {reference}")
    elif kind == "invalid":
        if rng.integers(0, 3) == 0:
            call = stub.Compute(_raw_invalid(rng), timeout=30)
            await _expect_error(kind, call, report)
            return
        try:
            await method(*_invalid(loss, rng).values())
            report.record(kind, "OK", f"{loss}: an invalid request was accepted")
        except HingelossError as error:
            report.record(kind, error.code.name, str(error))
    elif kind == "garbage":
        data = bytes(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8))
        await _expect_error(kind, raw(b"\xff" + data, timeout=30), report)
    elif kind == "cancel":
        inputs, _ = _inputs(loss, rng, "float64")
        task = asyncio.ensure_future(method(*inputs.values()))
        await asyncio.sleep(float(rng.uniform(0, 0.003)))
        task.cancel()
        try:
            await task
            report.record(kind, "OK")
        except (asyncio.CancelledError, HingelossError) as error:
            report.record(kind, _code(error), str(error))
    elif kind == "tiny_deadline":
        inputs, _ = _inputs(loss, rng, "float64")
        try:
            await method(*inputs.values(), timeout=float(rng.uniform(0.0001, 0.003)))
            report.record(kind, "OK")
        except HingelossError as error:
            report.record(kind, error.code.name, str(error))
    else:  # stream
        requests = [
            build_request(loss, _inputs(loss, rng, "float64")[0], {})[0]
            for _ in range(int(rng.integers(2, 6)))
        ]
        call = stub.ComputeStream(iter(requests), timeout=30)
        try:
            answered = [response async for response in call]
            ok = [r.request_id for r in answered] == [r.request_id for r in requests]
            report.record(kind, "OK" if ok else "WRONG_STREAM", f"{len(answered)} answers")
        except grpc.RpcError as error:
            report.record(kind, _code(error), str(error.details()))


async def _expect_error(kind: str, call: Any, report: SoakReport) -> None:
    try:
        await call
        report.record(kind, "OK", "accepted")
    except grpc.RpcError as error:
        report.record(kind, _code(error), str(error.details()))


def _rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def soak(
    target: str,
    seconds: float,
    *,
    pid: int | None = None,
    users: int = 12,
    sample_every: float = 1.0,
    progress: Callable[[str], None] | None = None,
    channel_args: dict[str, Any] | None = None,
) -> SoakReport:
    """Runs the mixed load for `seconds` against `target`; samples the RSS of `pid`."""
    report = SoakReport()
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + seconds

    async def sample() -> None:
        last_requests = 0
        while True:
            elapsed = loop.time() - start
            if pid is not None:
                report.rss.append((elapsed, _rss_of(pid)))
            if progress is not None:
                rss = f"{report.rss[-1][1] / MIB:7.1f} MiB" if report.rss else "-"
                rate = (report.requests - last_requests) / sample_every
                codes = Counter[str]()
                for counter in report.codes.values():
                    codes.update(counter)
                progress(
                    f"{elapsed:6.1f}s {report.requests:8d} requests {rate:7.0f}/s  RSS {rss}  "
                    + " ".join(f"{code}={n}" for code, n in sorted(codes.items()))
                )
            last_requests = report.requests
            await asyncio.sleep(sample_every)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(
            *(_user(i, target, end, report, channel_args or {}) for i in range(users))
        )
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    if pid is not None:
        report.rss.append((loop.time() - start, _rss_of(pid)))
    report.seconds = loop.time() - start
    return report


# ---- a server to soak ----------------------------------------------------------------------


@contextlib.contextmanager
def server_process(extra_args: list[str] | None = None) -> Iterator[tuple[str, int]]:
    """Runs `python -m hingeloss_server` on a free loopback port; yields (target, pid).

    On exit it sends SIGTERM and expects a graceful, successful shutdown.
    """
    flags = ("--max-queue-rows=8192", "--drain-seconds=5", "--log-level=WARNING")
    with tempfile.TemporaryDirectory(prefix="hingeloss-soak-") as folder:
        server = ServerProcess(server_argv(*flags, *(extra_args or [])), Path(folder)).start()
        try:
            server.wait_ready(120)
            yield server.target, server.pid
        finally:
            code = server.stop()
            if code != 0:
                raise RuntimeError(
                    f"the server exited with {code} after SIGTERM:\n{server.log_tail()}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--target", help="an existing server (default: start one)")
    parser.add_argument("--pid", type=int, help="the existing server's process, for its RSS")
    parser.add_argument("--users", type=int, default=12, help="concurrent callers")
    parser.add_argument(
        "--max-rss-growth-mib", type=float, default=64.0, help="fail beyond this growth"
    )
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)

    def run(target: str, pid: int | None) -> SoakReport:
        print(f"soaking {target} for {args.seconds:.0f}s with {args.users} callers", flush=True)
        every = max(1.0, args.seconds / 30)
        return asyncio.run(
            soak(
                target,
                args.seconds,
                pid=pid,
                users=args.users,
                sample_every=every,
                progress=lambda line: print(line, flush=True),
            )
        )

    if args.target:
        report = run(args.target, args.pid)
    else:
        with server_process() as (target, pid):
            report = run(target, pid)
    summary = report.to_json()
    print("\ncalls by kind and status code:")
    for kind, codes in summary["codes"].items():
        print(f"  {kind:14s} " + "  ".join(f"{c}={n}" for c, n in sorted(codes.items())))
    print(
        f"{report.requests} calls in {report.seconds:.1f}s "
        f"({summary['requests_per_second']}/s), {report.checked} checked against references"
    )
    if report.rss:
        print(
            f"server RSS {report.rss[0][1] / MIB:.1f} -> {report.rss[-1][1] / MIB:.1f} MiB; "
            f"growth once warm {summary['rss_growth_mib']} MiB, "
            f"slope {summary['rss_slope_mib_per_min']} MiB/min"
        )
    for line in report.unexpected:
        print(f"UNEXPECTED {line}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    failed = bool(report.unexpected) or report.rss_growth_bytes > args.max_rss_growth_mib * MIB
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
