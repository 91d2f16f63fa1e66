"""Fixtures of the deployment-file tests, over helpers/deploy_files.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers.deploy_files import (
    DOCKER_DIR,
    DOCKERFILES,
    METRIC_FAMILIES,
    REPO_ROOT,
    Dockerfile,
    base_metric_name,
    env_pairs,
    exec_form,
    find_tool,
    is_known_family,
    load_yaml,
    load_yaml_all,
    metric_names_in,
    parse_dockerfile,
    parse_env,
    recorded_names_in,
    run_tool,
)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def docker_dir() -> Path:
    return DOCKER_DIR


@pytest.fixture(scope="session")
def dockerfiles() -> dict[str, Dockerfile]:
    """The server Dockerfile parsed once per target, keyed by the stage it must build."""
    return {target: parse_dockerfile(path, target) for target, path in DOCKERFILES.items()}


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_yaml(DOCKER_DIR / "compose.yaml")


@pytest.fixture(scope="session")
def metric_names_file() -> list[str]:
    """The lines of docker/prometheus/metric_names.txt."""
    text = (DOCKER_DIR / "prometheus" / "metric_names.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def prometheus_rules() -> dict[str, Any]:
    return load_yaml(DOCKER_DIR / "prometheus" / "rules.yml")


@pytest.fixture(scope="session")
def rule_exprs(prometheus_rules: dict[str, Any]) -> dict[str, str]:
    """Every rule's expression, keyed by its record or alert name."""
    exprs: dict[str, str] = {}
    for group in prometheus_rules["groups"]:
        for rule in group["rules"]:
            exprs[rule.get("record") or rule["alert"]] = rule["expr"]
    return exprs


@pytest.fixture(scope="session")
def promtool() -> str:
    path = find_tool("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


@pytest.fixture(scope="session")
def deploy() -> SimpleNamespace:
    """The deployment-file helpers in one namespace, for the test modules."""
    return SimpleNamespace(
        REPO_ROOT=REPO_ROOT,
        DOCKER_DIR=DOCKER_DIR,
        METRIC_FAMILIES=METRIC_FAMILIES,
        find_tool=find_tool,
        run_tool=run_tool,
        load_yaml=load_yaml,
        load_yaml_all=load_yaml_all,
        base_metric_name=base_metric_name,
        metric_names_in=metric_names_in,
        recorded_names_in=recorded_names_in,
        is_known_family=is_known_family,
        parse_dockerfile=parse_dockerfile,
        parse_env=parse_env,
        env_pairs=env_pairs,
        exec_form=exec_form,
    )
