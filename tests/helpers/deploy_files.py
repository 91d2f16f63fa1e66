"""The deployment files read for tests: paths, tools, a Dockerfile parser and the metric catalogue.

Everything here is static and offline: no Docker engine, no cluster, no network.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"

# Every metric family the server exposes (the server's contract with these files), with its
# type. Histograms also expose <name>_bucket, _sum and _count; counters are named with _total.
METRIC_FAMILIES: dict[str, str] = {
    "hingeloss_grpc_server_handled_total": "counter",
    "hingeloss_grpc_server_handling_seconds": "histogram",
    "hingeloss_requests_total": "counter",
    "hingeloss_request_duration_seconds": "histogram",
    "hingeloss_queue_wait_seconds": "histogram",
    "hingeloss_compute_seconds": "histogram",
    "hingeloss_batch_rows": "histogram",
    "hingeloss_batch_requests": "histogram",
    "hingeloss_queue_depth_requests": "gauge",
    "hingeloss_queue_depth_rows": "gauge",
    "hingeloss_inflight_requests": "gauge",
    "hingeloss_requests_rejected_total": "counter",
    "hingeloss_received_bytes_total": "counter",
    "hingeloss_sent_bytes_total": "counter",
    "hingeloss_samples_total": "counter",
    "hingeloss_active_fraction": "histogram",
    "hingeloss_margin": "histogram",
    "hingeloss_worker_busy_seconds_total": "counter",
    "hingeloss_workers": "gauge",
    "hingeloss_gpu_memory_allocated_bytes": "gauge",
    "hingeloss_gpu_memory_reserved_bytes": "gauge",
    "hingeloss_build_info": "info",
}
# prometheus_client's default collectors, kept by the server.
DEFAULT_COLLECTOR_PREFIXES = ("process_", "python_")

# A metric name in PromQL that is not part of a recording-rule name (those contain colons).
_METRIC_TOKEN = re.compile(r"(?<![\w:])((?:hingeloss|process|python)_[a-z0-9_]+)(?![\w:])")
_RECORDED_TOKEN = re.compile(r"(?<![\w:])([a-z_]*:[a-z0-9_]+:[a-z0-9_]+)(?![\w:])")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def find_tool(name: str) -> str | None:
    """Returns the path of a command-line tool: the running venv's bin first, then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    return shutil.which(name)


def run_tool(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs a tool from the repository root and captures its output as text."""
    return subprocess.run(
        args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def base_metric_name(name: str) -> str:
    """Maps a series name used in PromQL to the family name it belongs to.

    `hingeloss_margin_bucket` -> `hingeloss_margin`; counters keep `_total` as the catalogue
    names them. A name that belongs to no known family is returned as it is.
    """
    if name in METRIC_FAMILIES:
        return name
    for suffix in _HISTOGRAM_SUFFIXES:
        stem = name.removesuffix(suffix)
        if stem != name and METRIC_FAMILIES.get(stem) == "histogram":
            return stem
    return name


def metric_names_in(expr: str) -> set[str]:
    """Family names of the metrics a PromQL expression reads (recorded series excluded)."""
    return {base_metric_name(token) for token in _METRIC_TOKEN.findall(expr)}


def recorded_names_in(expr: str) -> set[str]:
    """Names of the recording-rule series (level:metric:operations) a PromQL expression reads."""
    return set(_RECORDED_TOKEN.findall(expr))


def is_known_family(name: str) -> bool:
    return name in METRIC_FAMILIES or name.startswith(DEFAULT_COLLECTOR_PREFIXES)


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    """A build stage: its FROM image, its name and its instructions (FROM excluded)."""

    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    """A parsed Dockerfile; with a target, `final` is the stage `--target` builds."""

    path: Path
    lines: list[str]
    instructions: list[Instruction]
    stages: list[Stage]
    global_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None

    @property
    def final(self) -> Stage:
        if self.target is None:
            return self.stages[-1]
        return self.stage(self.target)

    def stage(self, name: str) -> Stage:
        matches = [s for s in self.stages if s.name == name]
        assert matches, f"{self.path.name}: no stage named {name}"
        return matches[0]


_ARG_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def parse_dockerfile(path: Path, target: str | None = None) -> Dockerfile:
    """A small Dockerfile parser: comments, blank lines and backslash continuations.

    A FROM image given as `${ARG}` is resolved with the default of the ARG declared before the
    first FROM, as `docker build` does without --build-arg.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        text = " ".join(part for part in buffer if part)
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = []
    assert not buffer, f"{path}: the last instruction ends with a line continuation"

    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and not stages:
            key, _, value = instruction.args.partition("=")
            global_args[key.strip()] = value.strip().strip('"')
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            image = _ARG_REFERENCE.sub(
                lambda m: global_args.get(m.group(1) or m.group(2), m.group(0)), words[0]
            )
            stages.append(Stage(image=image, name=name))
        else:
            assert stages or instruction.keyword in {"ARG"}, (
                f"{path}:{instruction.line}: {instruction.keyword} before the first FROM"
            )
            if stages:
                stages[-1].instructions.append(instruction)
    return Dockerfile(path, lines, instructions, stages, global_args, target)


def env_pairs(instruction: Instruction) -> dict[str, str]:
    """The key=value pairs of one ENV instruction (the form these Dockerfiles use)."""
    env: dict[str, str] = {}
    for pair in instruction.args.split():
        key, sep, value = pair.partition("=")
        assert sep, f"line {instruction.line}: use ENV key=value, not `{instruction.args}`"
        env[key] = value.strip('"')
    return env


def parse_env(stage: Stage) -> dict[str, str]:
    """ENV key=value pairs of a stage, later ones winning."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        env.update(env_pairs(instruction))
    return env


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


# One Dockerfile builds both server images, one target each.
DOCKERFILE = DOCKER_DIR / "Dockerfile"
TARGETS = ("cpu", "gpu")
DOCKERFILES = dict.fromkeys(TARGETS, DOCKERFILE)
