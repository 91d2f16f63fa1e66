"""The real command: configuration, start-up health, graceful SIGTERM, generated code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from grpc_tools import protoc
from helpers.servers import spawn_server, wait_for_port
from helpers.throttle import ThrottlingProxy

from hingeloss import NO_RETRY, LossClient, UnavailableError
from hingeloss._health import check
from hingeloss_server.cli import config_from_args

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HINGELOSS_MAX_BATCH_ROWS", "128")
    monkeypatch.setenv("HINGELOSS_DEVICES", "cpu")
    monkeypatch.setenv("HINGELOSS_REFLECTION", "false")
    config = config_from_args(["--port", "0", "--workers-per-device", "3"])
    assert config.batching.max_batch_rows == 128
    assert config.workers.devices == ("cpu",)
    assert config.workers.workers_per_device == 3
    assert config.reflection is False
    assert config.port == 0
    # A flag beats its variable.
    assert config_from_args(["--max-batch-rows", "7"]).batching.max_batch_rows == 7


def test_invalid_configuration_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        config_from_args(["--workers-per-device", "0"])
    assert "workers_per_device must be >= 1, got 0" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepted(metrics_port: int) -> tuple[float, float]:
    """Requests the server has taken in (in flight plus answered), and those answered."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        lines = page.read().decode().splitlines()
    inflight = sum(
        float(x.split()[1]) for x in lines if x.startswith("hingeloss_inflight_requests ")
    )
    answered = sum(
        float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("hingeloss_requests_total{")
    )
    return inflight + answered, answered


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    metrics_port = _free_port()
    flags = (
        *("--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port)),
        # Each batch waits 200 ms for company (and never fills up): requests stay in
        # flight long enough for SIGTERM to land among them, however fast the machine.
        # The requests (8 MB) share batches, or batch by cost would run each one alone,
        # at once, and without the wait.
        *("--max-batch-delay-us", "200000", "--max-batch-bytes", str(1 << 30)),
        *("--max-shared-request-bytes", str(1 << 30), "--max-shared-batch-bytes", str(1 << 30)),
        *("--drain-seconds", "30", "--shutdown-delay-seconds", "0.5"),
    )
    with spawn_server(tmp_path, *flags) as (process, port):
        yield process, port, metrics_port


@pytest.mark.slow
def test_sigterm_answers_every_accepted_request(
    server_process: tuple[subprocess.Popen[bytes], int, int],
) -> None:
    process, port, metrics_port = server_process
    target = f"127.0.0.1:{port}"
    assert check(target) == "SERVING"
    rng = np.random.default_rng()
    scores = rng.normal(size=(2048, 500))
    targets = rng.integers(0, 500, size=2048)
    results: list[object] = []
    started = threading.Barrier(33)

    def caller() -> None:
        with LossClient(target, timeout=60) as client:
            client.health()  # connected before the barrier, so the call below starts at once
            started.wait()
            try:
                results.append(client.multiclass_hinge(scores, targets).loss)
            except Exception as error:  # recorded and asserted on below
                results.append(error)

    threads = [threading.Thread(target=caller) for _ in range(32)]
    for thread in threads:
        thread.start()
    started.wait()
    # SIGTERM once the server is busy with them: some accepted, others still arriving.
    deadline = time.monotonic() + 60
    while (accepted := _accepted(metrics_port))[0] < 8 and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    assert accepted[1] < 32  # callers were still waiting for answers
    time.sleep(0.2)
    assert check(target) == "NOT_SERVING"  # draining: load balancers move away
    for thread in threads:
        thread.join(120)
    assert process.wait(60) == 0
    assert len(results) == 32
    answers = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    # Everything the server had taken in before SIGTERM was answered, and answered right.
    assert len(answers) >= accepted[0]
    assert len({round(float(r), 12) for r in answers}) == 1  # type: ignore[arg-type]
    # Requests that had not reached it were refused as retryable (draining), nothing worse.
    assert all(isinstance(r, UnavailableError) for r in refused), refused[:3]
    assert b"stopped" in process.stderr.read()  # type: ignore[union-attr]


@pytest.mark.slow
def test_make_serve_starts_a_serving_server(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    env = {
        **os.environ,
        "HINGELOSS_HOST": "127.0.0.1",
        "HINGELOSS_PORT": "0",
        "HINGELOSS_PORT_FILE": str(port_file),
        "HINGELOSS_METRICS_PORT": "0",
    }
    process = subprocess.Popen(
        ["make", "--no-print-directory", "serve"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        port = wait_for_port(port_file, process, timeout=240)
        health = subprocess.run(
            [str(BIN / "hingeloss-health"), "--target", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert health.returncode == 0, health.stdout + health.stderr
        assert health.stdout.strip() == "SERVING"
    finally:
        # SIGTERM to the server alone (not to make): make then exits with its status.
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        process.wait(60)
        if not children:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """`make proto` output is committed: regenerating must change nothing."""
    proto = "hingeloss/v1/loss_service.proto"
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto" / proto),
        ]
    )
    assert status == 0
    generated = sorted(p.name for p in (tmp_path / "hingeloss" / "v1").iterdir())
    assert generated == ["loss_service_pb2.py", "loss_service_pb2.pyi", "loss_service_pb2_grpc.py"]
    for name in generated:
        fresh = (tmp_path / "hingeloss" / "v1" / name).read_text()
        committed = (ROOT / "client" / "hingeloss" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_allocator_keeps_freed_memory_on_glibc() -> None:
    from hingeloss_server.engine.allocator import keep_freed_memory

    # Linux with glibc here; elsewhere it reports False and changes nothing.
    assert keep_freed_memory() is sys.platform.startswith("linux")


def _drain_under_sigterm(
    tmp_path: Path,
    *,
    up_bps: float | None,
    down_bps: float | None,
    upload_min_bytes: int | None = 0,
) -> None:
    """Eight callers, each on its own connection through a pacing proxy, 8 MB each way
    (uploaded in parts, or in one message with `upload_min_bytes=None`).

    SIGTERM lands once every transfer in the paced direction is 1 MB in: gRPC has
    accepted every call. Each must be answered OK, and the server must exit 0.
    """
    callers, rows = 8, 2 << 20
    scores = np.random.default_rng(1).normal(size=rows).astype(np.float32)
    labels = np.ones(rows, np.float32)
    expected = float(np.maximum(0.0, 1.0 - scores.astype(np.float64)).mean())
    with (
        spawn_server(tmp_path, "--drain-seconds", "60") as (process, port),
        ThrottlingProxy(("127.0.0.1", port), up_bps=up_bps, down_bps=down_bps) as proxy,
    ):
        results: list[object] = []

        def call() -> None:
            # A private connection each: in-process channels would share one.
            options = [("grpc.use_local_subchannel_pool", 1)]
            with LossClient(
                proxy.target,
                retry=NO_RETRY,
                timeout=120,
                options=options,
                upload_min_bytes=upload_min_bytes,
            ) as c:
                try:
                    results.append(c.binary_hinge(scores, labels).loss)
                except Exception as error:  # recorded and asserted on below
                    results.append(error)

        threads = [threading.Thread(target=call) for _ in range(callers)]
        for thread in threads:
            thread.start()
        paced = "up" if up_bps is not None else "down"
        assert proxy.wait_until(
            lambda ts: sum(getattr(t, paced) >= 1 << 20 for t in ts) >= callers, 120
        )
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        assert process.wait(60) == 0
    assert [r if isinstance(r, Exception) else "OK" for r in results] == ["OK"] * callers
    assert results == pytest.approx([expected] * callers, rel=1e-5)
    assert not any(t.reset for t in proxy.transfers)


@pytest.mark.slow
@pytest.mark.parametrize("upload_min_bytes", [None, 0], ids=["one-message", "upload"])
def test_sigterm_answers_calls_whose_requests_are_still_arriving(
    tmp_path: Path, upload_min_bytes: int | None
) -> None:
    _drain_under_sigterm(tmp_path, up_bps=4 << 20, down_bps=None, upload_min_bytes=upload_min_bytes)


@pytest.mark.slow
def test_sigterm_lets_slow_downloads_finish(tmp_path: Path) -> None:
    _drain_under_sigterm(tmp_path, up_bps=None, down_bps=4 << 20)
