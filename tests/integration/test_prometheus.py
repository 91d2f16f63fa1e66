"""The /metrics endpoint end to end: a private Prometheus scrapes a real server.

Needs the `prometheus` binary (Debian's package puts it at /usr/bin/prometheus);
the tests that need it skip with the reason when it is absent.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.servers import ServerThread, server_config
from prometheus_client.parser import text_string_to_metric_families

from hingeloss import InvalidArgumentError, LossClient

ROOT = Path(__file__).resolve().parents[2]
METRIC_NAMES = ROOT / "docker" / "prometheus" / "metric_names.txt"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
POLL_S = 0.2
WAIT_S = 20.0


def free_port() -> int:
    """A port that was free a moment ago (the bind-and-close race is accepted in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Polls `check` until it returns a truthy value; fails with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as error:  # not listening yet
            last = error
        if last:
            return last
        time.sleep(POLL_S)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """A server with its real /metrics endpoint (default registry: process collectors too)."""
    for attempt in range(3):
        config = server_config(metrics_host="127.0.0.1", metrics_port=free_port())
        try:
            thread = ServerThread(config).start()
        except OSError:  # the metrics port was taken in between: pick another
            if attempt == 2:
                raise
            continue
        break
    try:
        yield thread
    finally:
        thread.stop()


def metrics_url(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.server.metrics_port}/metrics"


@dataclass(frozen=True)
class Workload:
    ok_requests: int
    samples: int
    inactive: int


@pytest.fixture(scope="module")
def workload(server: ServerThread) -> Workload:
    """Binary hinge requests with a known share of inactive samples, plus one invalid request."""
    rng = np.random.default_rng(5)
    requests, samples, inactive = 4, 0, 0
    with LossClient(server.target) as client:
        for _ in range(requests):
            labels = rng.choice(np.array([-1, 1], dtype=np.int64), size=10)
            # Margins y*f of 3 (inactive) or 0.5 (active): 3 inactive samples of 10.
            margins = np.array([3.0] * 3 + [0.5] * 7)
            client.binary_hinge(margins * labels, labels)
            samples += 10
            inactive += 3
        with pytest.raises(InvalidArgumentError):
            client.binary_hinge(np.zeros(2), np.ones(3, dtype=np.int64))
    return Workload(ok_requests=requests, samples=samples, inactive=inactive)


def exposition(server: ServerThread) -> str:
    return http_get(metrics_url(server)).decode()


def test_endpoint_serves_the_text_format(server: ServerThread, workload: Workload) -> None:
    families = {f.name: f for f in text_string_to_metric_families(exposition(server))}
    requests = families["hingeloss_requests"]
    ok = sum(s.value for s in requests.samples if s.labels.get("code") == "OK")
    assert ok == workload.ok_requests
    # The standard process collectors are kept (memory and CPU of the server).
    assert "process_resident_memory_bytes" in families
    assert "process_cpu_seconds" in families  # exposed as process_cpu_seconds_total


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason=f"promtool not found ({PROMTOOL})")
def test_exposition_passes_promtool_lint(server: ServerThread, workload: Workload) -> None:
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=exposition(server).encode(),
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


def test_every_dashboard_and_rule_metric_exists(server: ServerThread, workload: Workload) -> None:
    if not METRIC_NAMES.exists():
        pytest.skip(f"{METRIC_NAMES.relative_to(ROOT)} is absent: no names to check")
    wanted = [
        line.strip()
        for line in METRIC_NAMES.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    text = exposition(server)
    # A family counts once declared (# TYPE), even without series yet: the GPU memory
    # gauges only get series on CUDA devices.
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    exposed = set(declared)
    for family in text_string_to_metric_families(text):
        exposed.add(family.name)
        exposed.update(sample.name for sample in family.samples)
    missing = [name for name in wanted if name not in exposed]
    assert not missing, f"in {METRIC_NAMES.name} but not exposed by the server: {missing}"


# ---------------------------------------------------------------- Prometheus


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector result."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        answer = json.loads(http_get(url))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        """The single value of a query, or None while it has no result."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])


def _start_prometheus(tmp: Path, target: str) -> Prometheus:
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: hingeloss\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    for attempt in range(3):
        port = free_port()
        log = (tmp / f"prometheus-{attempt}.log").open("wb")
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / f'data-{attempt}'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if http_get(f"{url}/-/ready", timeout=1.0).strip():
                    return Prometheus(url, process)
            except OSError:
                pass
            time.sleep(POLL_S)
        _stop(process)
        # Exited at once: most likely the port was taken in between; try another.
        if time.monotonic() >= deadline:
            break
    logs = "".join(p.read_text(errors="replace") for p in sorted(tmp.glob("prometheus-*.log")))
    pytest.fail(f"prometheus did not become ready:\n{logs[-4000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def prometheus(
    server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    if not Path(PROMETHEUS).exists():
        pytest.skip(f"the prometheus binary is not installed ({PROMETHEUS})")
    instance = _start_prometheus(
        tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.server.metrics_port}"
    )
    try:
        yield instance
    finally:
        _stop(instance.process)


def test_prometheus_scrapes_the_live_sparsity(prometheus: Prometheus, workload: Workload) -> None:
    wait_for("up == 1", lambda: prometheus.scalar('up{job="hingeloss"}') == 1.0)

    def current() -> tuple[float | None, float | None]:
        return (
            prometheus.scalar('sum(hingeloss_requests_total{code="OK"})'),
            prometheus.scalar(
                'sum(hingeloss_samples_total{state="inactive"}) / sum(hingeloss_samples_total)'
            ),
        )

    expected = (float(workload.ok_requests), workload.inactive / workload.samples)
    wait_for(f"(OK requests, inactive share) == {expected}", lambda: current() == expected)
    assert prometheus.scalar('sum(hingeloss_requests_total{code="INVALID_ARGUMENT"})') == 1.0
    assert (
        prometheus.scalar('sum(hingeloss_requests_rejected_total{reason="invalid_argument"})')
        == 1.0
    )
    assert prometheus.scalar("hingeloss_inflight_requests") == 0.0
