"""Settings declared once: flags, HINGELOSS_* variables and the docs table follow the fields."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hingeloss_server.cli import build_parser
from hingeloss_server.config import LimitsConfig, SecurityConfig, ServerConfig
from hingeloss_server.config_table import flag_table, table_in, with_table
from hingeloss_server.settings import Setting, build, sections, settings

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"


def _help_entries() -> dict[str, tuple[str, str, str]]:
    """flag -> (help, variable, default), read from the real `hingeloss-server --help`."""
    env = {**os.environ, "COLUMNS": "100"}
    text = subprocess.run(
        [sys.executable, "-m", "hingeloss_server", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    ).stdout
    flat = re.sub(r"\s+", " ", text)
    return {
        flag: (help_text, variable, default)
        for flag, help_text, variable, default in re.findall(
            r"(--[a-z-]+) [A-Z_]+ ([^\[]*?) \[env (HINGELOSS_\w+); default ([^\]]*)\]", flat
        )
    }


def _table_entries(table: str) -> dict[str, tuple[str, str, str]]:
    """flag -> (meaning, variable, default), read from the Markdown table."""
    entries = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        _section, flag, variable, default, meaning = cells
        entries[flag.strip("`")] = (
            meaning.replace("\\|", "|"),
            variable.strip("`"),
            default.strip("`"),
        )
    return entries


def test_docs_table_is_the_generated_one() -> None:
    assert table_in(PAGE.read_text(encoding="utf-8")) == flag_table(), (
        "docs/configuration.md is out of date: run `make config-docs`"
    )


def test_docs_table_matches_help() -> None:
    table = _table_entries(table_in(PAGE.read_text(encoding="utf-8")))
    assert table == _help_entries()


def test_names_follow_the_fields() -> None:
    found = settings(ServerConfig)
    names = [s.name for s in found]
    assert len(names) == len(set(names)), "two sections declare the same setting"
    for setting in found:
        assert setting.flag == "--" + setting.name.replace("_", "-")
        assert setting.env == "HINGELOSS_" + setting.name.upper()
    holders: dict[str, Any] = {"": ServerConfig, **dict(sections(ServerConfig))}
    for setting in found:
        field = {f.name: f for f in dataclasses.fields(holders[setting.section])}[setting.name]
        assert setting.default == field.default


def test_limits_hold_no_dims_setting() -> None:
    # Every input is a vector or a matrix; ServerInfo reports that as a constant.
    assert "max_dims" not in {f.name for f in dataclasses.fields(LimitsConfig)}


def _other_value(setting: Setting) -> tuple[str, Any]:
    """A text for the setting's variable, and the value it must give: never the default."""
    default = setting.default
    if isinstance(default, bool):
        return ("false", False) if default else ("true", True)
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return str(default + 1.5), default + 1.5
    if isinstance(default, tuple):
        return "cpu, cuda:1", ("cpu", "cuda:1")
    if default is None:
        return "/run/hingeloss/x.pem", Path("/run/hingeloss/x.pem")
    text = {"log_level": "debug", "log_format": "json"}.get(setting.name, "127.0.0.1")
    return text, setting.parse(text)


@pytest.mark.parametrize("setting", settings(ServerConfig), ids=lambda s: s.name)
def test_each_variable_reaches_its_field(setting: Setting, monkeypatch: pytest.MonkeyPatch) -> None:
    text, value = _other_value(setting)
    assert value != setting.default
    monkeypatch.setenv(setting.env, text)
    args = vars(build_parser().parse_args([]))
    assert args[setting.name] == value
    if isinstance(value, Path):
        return  # a certificate alone is refused; the security tests cover these together
    config = build(ServerConfig, {setting.name: args[setting.name]})
    holder = getattr(config, setting.section) if setting.section else config
    assert getattr(holder, setting.name) == value


def test_regenerating_rewrites_only_the_table() -> None:
    page = PAGE.read_text(encoding="utf-8")
    stale = page.replace(flag_table(), "| stale |\n")
    assert stale != page
    assert with_table(stale) == page


@pytest.mark.parametrize(
    ("asked", "concurrent", "granted"),
    [(64, 4096, 64), (64, 100, 50), (5, 11, 5), (64, 3, 1), (64, 1, 1)],
)
def test_calls_without_the_token_get_at_most_half_the_concurrent_calls(
    asked: int, concurrent: int, granted: int
) -> None:
    config = ServerConfig(
        max_concurrent_rpcs=concurrent,
        security=SecurityConfig(max_calls_without_token=asked),
    )
    assert config.calls_without_token == granted
    with pytest.raises(ValueError, match="max_calls_without_token"):
        SecurityConfig(max_calls_without_token=0)
