"""yamllint over docker/ with its config (docker/.yamllint.yaml), warnings included."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import deploy_files as deploy


def test_yamllint_passes_on_docker_dir() -> None:
    result = deploy.run_tool(
        [
            sys.executable,
            "-m",
            "yamllint",
            "--strict",
            "-f",
            "parsable",
            "-c",
            "docker/.yamllint.yaml",
            "docker/",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_config_catches_problems(tmp_path: Path) -> None:
    """The config is no blanket pass: a duplicate key and a yes/no boolean are reported."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("key: 1\nkey: 2\nenabled: yes\n", encoding="utf-8")
    result = deploy.run_tool(
        [
            sys.executable,
            "-m",
            "yamllint",
            "--strict",
            "-f",
            "parsable",
            "-c",
            "docker/.yamllint.yaml",
            str(bad),
        ]
    )
    assert result.returncode != 0
    assert "key-duplicates" in result.stdout
    assert "truthy" in result.stdout
