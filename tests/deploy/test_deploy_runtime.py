"""What the containers run, run outside a container: entrypoint, health check, drain, scale-out.

The image's ENTRYPOINT (less tini), ENV and HEALTHCHECK come from the Dockerfile itself, so
the test follows the file. Ports are swapped for free loopback ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.deploy_files import DOCKERFILES, exec_form, parse_dockerfile, parse_env

from hingeloss import LossClient, RetryPolicy

BIN = Path(sys.executable).parent
IMAGE_PORT = "50051"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Container:
    """The CPU image's command line and environment, as a local process."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        dockerfile = parse_dockerfile(DOCKERFILES["cpu"], "cpu")
        final = dockerfile.final
        entrypoint = exec_form(final.all("ENTRYPOINT")[-1].args)
        assert entrypoint is not None
        if entrypoint[:2] == ["tini", "--"]:
            entrypoint = entrypoint[2:]  # PID 1 duties only; the server is what follows
        healthcheck = final.all("HEALTHCHECK")[-1].args
        check = exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip())
        assert check is not None
        self.port = _free_port()
        self.metrics_port = _free_port()
        self.env = {
            **os.environ,
            # The image's own paths (its virtual environment on PATH) are not this machine's.
            **{k: v for k, v in parse_env(final).items() if k not in {"PATH", "VIRTUAL_ENV"}},
            "HINGELOSS_HOST": "127.0.0.1",
            "HINGELOSS_PORT": str(self.port),
            "HINGELOSS_METRICS_HOST": "127.0.0.1",
            "HINGELOSS_METRICS_PORT": str(self.metrics_port),
            **(extra_env or {}),
        }
        self.command = [str(BIN / entrypoint[0]), *entrypoint[1:]]
        self.health_command = [
            str(BIN / check[0]),
            *(
                arg.replace(f"127.0.0.1:{IMAGE_PORT}", f"127.0.0.1:{self.port}")
                for arg in check[1:]
            ),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Container:
        self.process = subprocess.Popen(self.command, env=self.env, stderr=subprocess.DEVNULL)
        return self

    def health(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.health_command, capture_output=True, text=True, timeout=30, check=False
        )

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            assert self.process.poll() is None, "the server exited during start-up"
            if self.health().returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("never healthy")

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            lines = page.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for container in started:
        container.stop()


@pytest.mark.slow
def test_entrypoint_and_healthcheck_through_a_drain(containers: list[Container]) -> None:
    container = Container({"HINGELOSS_SHUTDOWN_DELAY_SECONDS": "2"}).start()
    containers.append(container)
    container.wait_healthy()
    serving = container.health()
    assert serving.returncode == 0
    assert serving.stdout.strip() == "SERVING"

    assert container.process is not None
    container.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    draining = container.health()
    assert draining.returncode == 1  # Docker's HEALTHCHECK: 1 is unhealthy
    assert draining.stdout.strip() == "NOT_SERVING"
    assert container.process.wait(60) == 0
    gone = container.health()
    assert gone.returncode == 1
    assert gone.stdout.strip() == "UNAVAILABLE"


@pytest.mark.slow
def test_scale_out_round_robin_survives_a_sigterm(containers: list[Container]) -> None:
    """Three servers, one round_robin client; SIGTERM one mid-run; no request is lost."""
    env = {"HINGELOSS_SHUTDOWN_DELAY_SECONDS": "0.5", "HINGELOSS_DRAIN_SECONDS": "5"}
    servers = [Container(env).start() for _ in range(3)]
    containers.extend(servers)
    for server in servers:
        server.wait_healthy()
    target = "ipv4:" + ",".join(s.target for s in servers)
    rng = np.random.default_rng()
    answered = 0
    served_before_stop: list[float] = []
    with LossClient(target, retry=RetryPolicy(max_attempts=5)) as client:
        for i in range(240):
            if i == 120:
                served_before_stop = [s.metric("hingeloss_requests_total{") for s in servers]
                assert servers[1].process is not None
                servers[1].process.send_signal(signal.SIGTERM)
            scores = rng.normal(size=(16, 8))
            targets = rng.integers(0, 8, size=16)
            result = client.multiclass_hinge(scores, targets)
            true = scores[np.arange(16), targets]
            margins = np.maximum(0.0, 1.0 - true[:, None] + scores)
            margins[np.arange(16), targets] = 0.0
            assert result.loss == pytest.approx(margins.sum(axis=1).mean(), rel=1e-12)
            answered += 1
    assert answered == 240
    assert all(count > 0 for count in served_before_stop), served_before_stop
    assert servers[1].process is not None
    assert servers[1].process.wait(60) == 0
    after = [
        servers[0].metric("hingeloss_requests_total{"),
        servers[2].metric("hingeloss_requests_total{"),
    ]
    # The survivors took the traffic on.
    assert after[0] > served_before_stop[0]
    assert after[1] > served_before_stop[2]
