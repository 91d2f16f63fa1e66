"""Fixtures of the deployment-file tests, over helpers/deploy_files.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers.deploy_files import (
    DOCKER_DIR,
    DOCKERFILES,
    REPO_ROOT,
    Dockerfile,
    find_tool,
    load_yaml,
    parse_dockerfile,
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
    document: dict[str, Any] = load_yaml(DOCKER_DIR / "compose.yaml")
    return document


@pytest.fixture(scope="session")
def metric_names_file() -> list[str]:
    """The lines of docker/prometheus/metric_names.txt."""
    text = (DOCKER_DIR / "prometheus" / "metric_names.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def prometheus_rules() -> dict[str, Any]:
    rules: dict[str, Any] = load_yaml(DOCKER_DIR / "prometheus" / "rules.yml")
    return rules


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
