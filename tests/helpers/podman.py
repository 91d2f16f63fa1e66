"""podman for the image check: a private containers.conf, image builds, containers, inspection.

Every call runs with CONTAINERS_CONF naming a file written here, never /etc: podman's default
ulimits (nofile=1048576) exceed the hard limits a CI process may have, and podman lowers its own
process limit to the kernel's pid_max, so a container asking for more than either fails to start.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
STANDIN_SCRIPT = REPO_ROOT / "docker" / "standin" / "make-base.sh"
STANDIN_IMAGE = "localhost/hingeloss-base:python3.11-bookworm"
# podman's own default when a limit is unlimited here.
_PODMAN_DEFAULT_NOFILE = 1048576


class PodmanError(RuntimeError):
    """A podman command failed; the message carries its command line and output."""


def container_limits() -> tuple[int, int]:
    """(nofile, nproc) for every container: this process's hard limits, nproc at most pid_max."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text(encoding="ascii"))
    if nofile == resource.RLIM_INFINITY:
        nofile = _PODMAN_DEFAULT_NOFILE
    if nproc == resource.RLIM_INFINITY:
        nproc = pid_max
    return nofile, min(nproc, pid_max)


def write_containers_conf(path: Path) -> Path:
    """Writes the containers.conf the check runs podman with: limits, runc, no systemd."""
    nofile, nproc = container_limits()
    path.write_text(
        "# Written by tests/helpers/podman.py for `make image-check`.\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "\n"
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n',
        encoding="utf-8",
    )
    return path


def qualified(image: str) -> str:
    """`python:3.11` -> `docker.io/library/python:3.11`: podman resolves no short names here."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


@dataclass(frozen=True)
class Podman:
    executable: str
    conf: Path

    @classmethod
    def find(cls, conf: Path) -> Podman | None:
        executable = shutil.which("podman")
        return None if executable is None else cls(executable, write_containers_conf(conf))

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.executable, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args)} exited {result.returncode}\n"
                f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
            )
        return result

    def image_exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def inspect(self, name: str, template: str = "{{json .}}") -> Any:
        """`podman inspect` of a container or image, decoded when the template gives JSON."""
        text = self.run("inspect", "--format", template, name).stdout.strip()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def image_data(self, image: str) -> dict[str, Any]:
        """`podman image inspect`: Config (OCI: User, Env, StopSignal...) and Healthcheck."""
        data: list[dict[str, Any]] = json.loads(self.run("image", "inspect", image).stdout)
        return data[0]

    def python_base(self, official: str) -> str:
        """The official base if podman has it or can pull it; else the stand-in, made once."""
        override = os.environ.get("HINGELOSS_IMAGE_BASE")
        if override:
            return override
        image = qualified(official)
        if self.image_exists(image) or self.run("pull", "-q", image, check=False).returncode == 0:
            return image
        subprocess.run([str(STANDIN_SCRIPT), STANDIN_IMAGE], env=self.env, check=True, timeout=1800)
        return STANDIN_IMAGE

    def build(self, target: str, tag: str, build_args: dict[str, str]) -> float:
        """Builds one target of docker/Dockerfile; returns the seconds it took.

        `--format docker`: the OCI image format has no HEALTHCHECK or SHELL (podman drops them
        with a warning). `--isolation chroot` and the host network are what runs on a machine
        with no container engine set up; layers are cached in podman's store between runs.
        """
        args = ["build", "--format", "docker", "--isolation", "chroot", "--network", "host"]
        args += ["--layers", "-f", str(DOCKERFILE), "--target", target, "-t", tag]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        started = time.monotonic()
        self.run(*args, str(REPO_ROOT), timeout=3600)
        return time.monotonic() - started
