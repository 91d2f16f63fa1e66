"""The service under memory and size pressure, each figure a ratio to the echo floor's.

    python tests/tools/bench/pressure.py [--stall-rounds 5] [--flood-seconds 10]
        [--output pressure.json]

Two measurements, each run against the service and against the echo floor
(`echo_server.py`: same service, no parsing, no math) in the same run, under the
same load:

- **Small calls beside a maximum-size request.** While one request of about
  512 MiB is sent, computed and answered (from a separate process), another
  client makes small calls one after another; their p99 latency is compared
  (the service runs two workers, so that small calls do not queue behind the
  large one's compute).
  What the echo pays is the transport's own cost (gRPC receiving and sending the
  message on the event loop); anything beyond it is the service's. A p99 of the
  ~500 small calls one large request lasts rests on a handful of calls, so the
  two servers are measured in `--stall-rounds` rotating rounds (fresh servers each)
  and the figure is the median of the rounds' ratios.
- **RSS under a flood.** 64 callers send 4096x256 float32 requests (4 MB) as
  fast as they are answered or refused, for `--flood-seconds`, to a server with
  `--max-queue-rows 16384`; the growth of the server's peak RSS over its RSS
  before the flood is compared.

Exit status 0 when both ratios are within their bounds (1.5 and 1.25).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import ServerProcess, service_argv  # noqa: E402

from hingeloss import NO_RETRY, LossClient  # noqa: E402
from hingeloss._requests import build_request  # noqa: E402

MIB = 1 << 20
COMPUTE = "/hingeloss.v1.LossService/Compute"
# 131072 x 1022 float32 scores and int32 targets: 511.5 MiB of tensors, a message
# just under the default 512 MiB limit.
LARGE_ROWS, LARGE_CLASSES = 131072, 1022
FLOOD_CALLERS, FLOOD_ROWS, FLOOD_CLASSES = 64, 4096, 256
FLOOD_QUEUE_ROWS = 16384
STALL_BOUND, FLOOD_BOUND = 1.5, 1.25
# How long the large request's sender may take, start-up and both requests included.
SENDER_TIMEOUT_S = 600.0
T = TypeVar("T")


@dataclass(frozen=True)
class Stall:
    """Small calls beside one maximum-size request, on one server."""

    server: str
    small_p50_ms: float
    small_p99_ms: float
    small_max_ms: float
    small_calls: int
    large_seconds: float


@dataclass(frozen=True)
class Flood:
    """One server's RSS under the flood."""

    server: str
    rss_growth_mib: float
    answers: dict[str, int]


def _memory_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def _large_request_bytes() -> bytes:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(LARGE_ROWS, LARGE_CLASSES)).astype(np.float32)
    targets = rng.integers(0, LARGE_CLASSES, size=LARGE_ROWS).astype(np.int32)
    request, _ = build_request("multiclass_hinge", {"scores": scores, "targets": targets}, {})
    return request.SerializeToString()


def _send_large(target: str, times: int, out: multiprocessing.Queue[tuple[float, float]]) -> None:
    """In a process of its own: sends the large request `times` times, reports each span."""
    raw = _large_request_bytes()
    options = [
        ("grpc.max_send_message_length", 1 << 30),
        ("grpc.max_receive_message_length", 1 << 30),
    ]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(COMPUTE)
        for _ in range(times):
            started = time.monotonic()
            call(raw, timeout=SENDER_TIMEOUT_S)
            out.put((started, time.monotonic()))


def small_calls_beside_a_large_one(target: str) -> tuple[list[float], float]:
    """Latencies (s) of small calls made while the large request is in flight, and its span."""
    context = multiprocessing.get_context("spawn")
    spans: multiprocessing.Queue[tuple[float, float]] = context.Queue()
    sender = context.Process(target=_send_large, args=(target, 2, spans))
    scores, labels = np.zeros(8, np.float32), np.ones(8, np.float32)
    timed: list[tuple[float, float]] = []
    with LossClient(target, retry=NO_RETRY, timeout=600) as client:
        client.binary_hinge(scores, labels)
        sender.start()
        give_up = time.monotonic() + SENDER_TIMEOUT_S
        while sender.is_alive() and time.monotonic() < give_up:
            started = time.monotonic()
            client.binary_hinge(scores, labels)
            timed.append((started, time.monotonic() - started))
            time.sleep(0.002)
        if sender.is_alive():
            sender.terminate()
            raise RuntimeError(f"the large requests took over {SENDER_TIMEOUT_S:g} s")
        sender.join()
    if sender.exitcode != 0:
        raise RuntimeError(f"the large request's sender failed (exit status {sender.exitcode})")
    # The first large request warms caches up (the echo's answer, the allocator); the
    # second is measured. The sender put both before it exited.
    spans.get()
    begin, end = spans.get()
    return [latency for started, latency in timed if begin <= started <= end], end - begin


async def _flood(target: str, seconds: float) -> dict[str, int]:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(FLOOD_ROWS, FLOOD_CLASSES)).astype(np.float32)
    targets = rng.integers(0, FLOOD_CLASSES, size=FLOOD_ROWS).astype(np.int32)
    request, _ = build_request("multiclass_hinge", {"scores": scores, "targets": targets}, {})
    raw = request.SerializeToString()
    answers: dict[str, int] = {}
    end = time.monotonic() + seconds
    options = [("grpc.max_receive_message_length", 64 * MIB)]

    async def caller() -> None:
        # A connection each, as separate trainers would have.
        async with grpc.aio.insecure_channel(
            target, options=[*options, ("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            call = channel.unary_unary(COMPUTE)
            while time.monotonic() < end:
                try:
                    await call(raw, timeout=60)
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                answers[code] = answers.get(code, 0) + 1

    await asyncio.gather(*(caller() for _ in range(FLOOD_CALLERS)))
    return answers


def flood_rss_growth(pid: int, target: str, seconds: float) -> tuple[float, dict[str, int]]:
    """MiB the server's peak RSS grew above its RSS before the flood, and the answers."""
    before = _memory_kib(pid, "VmRSS")
    answers = asyncio.run(_flood(target, seconds))
    return (_memory_kib(pid, "VmHWM") - before) / 1024, answers


def stall(server: ServerProcess) -> Stall:
    print(f"{server.name}: small calls beside a large one", file=sys.stderr)
    latencies, large_seconds = small_calls_beside_a_large_one(server.target)
    ms = np.array(latencies) * 1000
    return Stall(
        server=server.name,
        small_p50_ms=float(np.percentile(ms, 50)),
        small_p99_ms=float(np.percentile(ms, 99)),
        small_max_ms=float(ms.max()),
        small_calls=len(latencies),
        large_seconds=large_seconds,
    )


def flood(server: ServerProcess, seconds: float) -> Flood:
    print(f"{server.name}: flood of {FLOOD_CALLERS} callers for {seconds:g} s", file=sys.stderr)
    growth, answers = flood_rss_growth(server.pid, server.target, seconds)
    return Flood(server=server.name, rss_growth_mib=growth, answers=answers)


def _run(server: ServerProcess, measure: Callable[[ServerProcess], T]) -> T:
    """Starts a fresh server, measures it, stops it."""
    server.start()
    try:
        server.wait_ready()
        return measure(server)
    finally:
        server.stop()


def stall_rounds(workdir: Path, rounds: int) -> list[tuple[Stall, Stall]]:
    """(service, echo) per round, fresh servers each, the order rotating between rounds."""
    # Two workers: on a CPU, the small calls' batches would otherwise wait for the
    # large one's compute (seconds), which is the device's time, not the event loop's.
    two_workers = service_argv("--workers-per-device", "2")
    measured = []
    for round_ in range(rounds):
        service = ServerProcess(two_workers, workdir, name=f"service-stall-{round_}")
        echo = _echo(workdir, f"echo-stall-{round_}")
        first, second = (service, echo) if round_ % 2 == 0 else (echo, service)
        by_name = {server.name: _run(server, stall) for server in (first, second)}
        measured.append((by_name[service.name], by_name[echo.name]))
    return measured


def _echo(workdir: Path, name: str) -> ServerProcess:
    return ServerProcess([sys.executable, str(HERE / "echo_server.py")], workdir, name=name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stall-rounds", type=int, default=5)
    parser.add_argument("--flood-seconds", type=float, default=10.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.stall_rounds < 1:
        parser.error("--stall-rounds must be at least 1")
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        stalls = stall_rounds(workdir, args.stall_rounds)
        queue_rows = service_argv("--max-queue-rows", str(FLOOD_QUEUE_ROWS))
        floods = [
            _run(
                ServerProcess(queue_rows, workdir, name="service-flood"),
                lambda s: flood(s, args.flood_seconds),
            ),
            _run(_echo(workdir, "echo-flood"), lambda s: flood(s, args.flood_seconds)),
        ]
    stall_ratios = [service.small_p99_ms / echo.small_p99_ms for service, echo in stalls]
    stall_ratio = float(np.median(stall_ratios))
    flood_ratio = floods[0].rss_growth_mib / floods[1].rss_growth_mib
    report = {
        "small_calls_beside_a_large_one": [
            {"service": asdict(service), "echo": asdict(echo)} for service, echo in stalls
        ],
        "flood": [asdict(f) for f in floods],
        "small_call_p99_ratios": stall_ratios,
        "small_call_p99_ratio": stall_ratio,
        "flood_rss_growth_ratio": flood_ratio,
        "bounds": {"small_call_p99_ratio": STALL_BOUND, "flood_rss_growth_ratio": FLOOD_BOUND},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0 if stall_ratio <= STALL_BOUND and flood_ratio <= FLOOD_BOUND else 1


if __name__ == "__main__":
    raise SystemExit(main())
