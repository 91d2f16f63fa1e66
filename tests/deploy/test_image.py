"""The cpu image, built with podman and run for real on a read-only root.

`make image-check` runs this module (HINGELOSS_IMAGE_CHECK=1); `make test` skips it, since the
build takes minutes. The build is offline for Python packages: every one comes from the
wheelhouse (`make wheelhouse`). The base is the official image when podman has it or can pull
it, else the debootstrap stand-in (docker/standin/make-base.sh). The first tests share one
container and run in file order until one stops it; the last plays the Kubernetes Deployment.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers.deploy_files import DOCKERFILE, load_yaml, parse_dockerfile
from helpers.podman import REPO_ROOT, Podman
from helpers.references import reference

from hingeloss import LossClient, UnavailableError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("HINGELOSS_IMAGE_CHECK") != "1",
        reason="builds and runs the image: `make image-check`",
    ),
]

TAG = "localhost/hingeloss:cpu"
WHEELHOUSE = "wheelhouse/cpu"
SERVER_UID = 10001
# Set on `podman run` and expected back from GetServerInfo: not the server's default.
MAX_BATCH_ROWS = 4099
SHUTDOWN_DELAY_SECONDS = 1


@dataclass(frozen=True)
class Container:
    """A running container of the image, and where the host reaches it."""

    podman: Podman
    name: str
    started: float

    @property
    def grpc_target(self) -> str:
        return self.published(50051)

    @property
    def metrics_url(self) -> str:
        return f"http://{self.published(9090)}/metrics"

    def state(self, field: str) -> Any:
        return self.podman.inspect(self.name, f"{{{{json .State.{field}}}}}")

    def logs(self) -> str:
        result = self.podman.run("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def published(self, port: int) -> str:
        """host:port where podman publishes a container port (a random loopback port)."""
        return self.podman.run("port", self.name, f"{port}/tcp").stdout.strip().splitlines()[0]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    found = Podman.find(tmp_path_factory.mktemp("podman") / "containers.conf")
    if found is None:
        pytest.fail("podman is not installed: apt-get install podman runc catatonit debootstrap")
    return found


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """Builds the cpu target from the wheelhouse, reusing podman's layer cache."""
    if not any((REPO_ROOT / WHEELHOUSE).glob("torch-*.whl")):
        pytest.fail(f"no torch wheel in {WHEELHOUSE}: run `make wheelhouse` first")
    dockerfile = parse_dockerfile(DOCKERFILE, "cpu")
    base = podman.python_base(dockerfile.global_args["PYTHON_IMAGE"])
    podman.build("cpu", TAG, {"PYTHON_IMAGE": base, "WHEELHOUSE": WHEELHOUSE})
    return TAG


@pytest.fixture(scope="module")
def image_data(podman: Podman, image: str) -> dict[str, Any]:
    return podman.image_data(image)


@pytest.fixture(scope="module")
def container(podman: Podman, image: str) -> Iterator[Container]:
    """The image run as compose runs it: read-only root, no capabilities, loopback ports."""
    name = f"hingeloss-image-check-{secrets.token_hex(4)}"
    podman.run(
        "run", "--detach", "--name", name,
        "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--publish", "127.0.0.1::50051", "--publish", "127.0.0.1::9090",
        "--env", f"HINGELOSS_MAX_BATCH_ROWS={MAX_BATCH_ROWS}",
        "--env", f"HINGELOSS_SHUTDOWN_DELAY_SECONDS={SHUTDOWN_DELAY_SECONDS}",
        image,
    )  # fmt: skip
    started = time.monotonic()
    try:
        yield Container(podman, name, started)
    finally:
        podman.run("rm", "--force", "--time", "0", name, check=False)


def _seconds(nanoseconds: int) -> float:
    return nanoseconds / 1e9


def test_healthcheck_reports_healthy_within_its_start_period(
    container: Container, image_data: dict[str, Any]
) -> None:
    """The image's own HEALTHCHECK, run by podman (no systemd timer here, so run on demand)."""
    check = image_data["Healthcheck"]
    assert check["Test"][:2] == ["CMD", "hingeloss-health"]
    deadline = container.started + _seconds(check["StartPeriod"])
    while True:
        assert container.state("Running") is True, container.logs()
        if container.podman.run("healthcheck", "run", container.name, check=False).returncode == 0:
            break
        assert time.monotonic() < deadline, f"unhealthy after the start period\n{container.logs()}"
        time.sleep(1)
    assert container.state("Health.Status") == "healthy"


def test_one_compute_from_the_host_matches_the_float64_reference(container: Container) -> None:
    rng = np.random.default_rng(secrets.randbits(32))
    inputs = {"scores": rng.normal(size=(24, 7)), "targets": rng.integers(0, 7, size=24)}
    with LossClient(container.grpc_target) as client:
        result = client.multiclass_hinge(inputs["scores"], inputs["targets"])
    expected = reference("multiclass_hinge", inputs)
    np.testing.assert_allclose(result.loss, expected.loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.grads[0], expected.grads[0], rtol=1e-10, atol=1e-12)


def test_metrics_endpoint_answers(container: Container) -> None:
    with urllib.request.urlopen(container.metrics_url, timeout=10) as page:
        assert page.status == 200
        text = page.read().decode()
    for family in ("hingeloss_build_info", "hingeloss_workers", "process_resident_memory_bytes"):
        assert f"\n{family}" in text, family


def test_environment_reaches_the_server(container: Container) -> None:
    with LossClient(container.grpc_target) as client:
        info = client.server_info()
    assert info.limits.max_batch_rows == MAX_BATCH_ROWS
    assert list(info.devices) == ["cpu"]  # HINGELOSS_DEVICES from the image's ENV


def _uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uids of a host process."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("Uid:"):
            return [int(uid) for uid in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def test_server_runs_as_uid_10001(container: Container, image_data: dict[str, Any]) -> None:
    assert image_data["Config"]["User"] == f"{SERVER_UID}:{SERVER_UID}"
    init = int(container.state("Pid"))  # tini, on the host's side of the pid namespace
    children = Path(f"/proc/{init}/task/{init}/children").read_text(encoding="ascii").split()
    assert len(children) == 1
    server = int(children[0])
    command = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"/hingeloss-server") for part in command), command
    assert _uids(init) == [SERVER_UID] * 4
    assert _uids(server) == [SERVER_UID] * 4


def test_root_filesystem_is_read_only(container: Container) -> None:
    assert container.podman.inspect(container.name, "{{json .HostConfig.ReadonlyRootfs}}") is True
    written = container.podman.run("exec", container.name, "touch", "/opt/venv/probe", check=False)
    assert written.returncode != 0
    assert "Read-only file system" in written.stderr
    # /tmp is a tmpfs, as the Kubernetes manifests mount an emptyDir there.
    container.podman.run("exec", container.name, "touch", "/tmp/probe")


def test_podman_stop_drains_and_exits_zero(
    container: Container, image_data: dict[str, Any]
) -> None:
    """SIGTERM: health NOT_SERVING, drain, exit 0, well before podman would send SIGKILL."""
    env = dict(item.split("=", 1) for item in image_data["Config"]["Env"])
    drain = float(env["HINGELOSS_DRAIN_SECONDS"])
    assert image_data["Config"]["StopSignal"] == "SIGTERM"
    kill_after = int(3 * (drain + SHUTDOWN_DELAY_SECONDS))
    started = time.monotonic()
    container.podman.run("stop", "--time", str(kill_after), container.name)
    elapsed = time.monotonic() - started
    assert container.state("ExitCode") == 0, container.logs()
    assert elapsed < drain + SHUTDOWN_DELAY_SECONDS, f"{elapsed:.1f} s\n{container.logs()}"
    assert '"message": "stopped"' in container.logs()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def kube_pod(podman: Podman, image: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """docker/k8s/base's Deployment under `podman kube play`, with this image and a unique name.

    podman publishes each containerPort on the host: loopback ports chosen here instead of 50051
    and 9090 on every address. Its emptyDir becomes a named volume, removed afterwards.
    """
    deployment = load_yaml(REPO_ROOT / "docker" / "k8s" / "base" / "deployment.yaml")
    name = f"hingeloss-check-{secrets.token_hex(4)}"
    deployment["metadata"]["name"] = name
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["image"] = image
    for port in container["ports"]:
        port.update(hostIP="127.0.0.1", hostPort=_free_port())
    (volume,) = pod["volumes"]
    (mount,) = container["volumeMounts"]
    volume["name"] = mount["name"] = f"{name}-tmp"
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment), encoding="utf-8")
    podman.run("kube", "play", str(manifest), timeout=300)
    try:
        yield deployment
    finally:
        podman.run("kube", "down", str(manifest), timeout=120, check=False)
        podman.run("volume", "rm", "--force", volume["name"], check=False)


def test_kube_play_runs_the_base_deployment(podman: Podman, kube_pod: dict[str, Any]) -> None:
    """The pod gets ready as the kubelet would judge it, answers, and keeps its security."""
    (container,) = kube_pod["spec"]["template"]["spec"]["containers"]
    grpc_port = next(p["hostPort"] for p in container["ports"] if p["name"] == "grpc")
    startup = container["startupProbe"]
    deadline = time.monotonic() + startup["periodSeconds"] * startup["failureThreshold"]
    readiness_service = container["readinessProbe"]["grpc"]["service"]
    with LossClient(f"127.0.0.1:{grpc_port}") as client:
        # podman has no gRPC probes: ask what the startup and readiness probes ask.
        while True:
            try:
                if client.health() == client.health(readiness_service) == "SERVING":
                    break
            except UnavailableError:
                pass
            assert time.monotonic() < deadline, "the pod never became ready"
            time.sleep(1)
        result = client.binary_hinge(np.array([2.0, 0.5, -1.0]), np.array([1, 1, 1]))
    assert result.loss == pytest.approx((0.0 + 0.5 + 2.0) / 3, rel=1e-12)
    name = f"{kube_pod['metadata']['name']}-pod-0-{container['name']}"
    assert podman.inspect(name, "{{json .HostConfig.ReadonlyRootfs}}") is True
    assert podman.inspect(name, "{{.Config.User}}") == "10001:10001"
