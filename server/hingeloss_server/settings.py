"""Dataclass fields that flags and environment variables set, each declared once.

A field declared with `settable` carries its help; its flag (`--max-batch-rows` for
`max_batch_rows`), its variable (``HINGELOSS_MAX_BATCH_ROWS``) and how its text is
parsed follow from its name and type. `settings` lists them for a config class and
its sections (fields whose type is itself a config dataclass); `build` makes the
config back from values keyed by setting name.
"""

from __future__ import annotations

import dataclasses
import typing
from argparse import ArgumentTypeError
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "HINGELOSS_"

_HELP = "hingeloss.help"
_PARSE = "hingeloss.parse"

_T = TypeVar("_T")


def settable(default: _T, help: str, *, parse: Callable[[str], _T] | None = None) -> _T:
    """A field set by the flag `--<name>` and the variable HINGELOSS_<NAME>, described by `help`.

    `parse` turns the text of a flag or variable into the value; by default it
    follows the field's type (see `_PARSERS`).
    """
    return dataclasses.field(default=default, metadata={_HELP: help, _PARSE: parse})


def parse_bool(text: str) -> bool:
    """`1/true/yes/on` or `0/false/no/off`, in any case."""
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    # argparse shows an ArgumentTypeError's message as it is.
    raise ArgumentTypeError(f"expected a boolean, got {text!r}")


def parse_list(text: str) -> tuple[str, ...]:
    """A comma-separated list; blanks around and between items are dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


# How the text of a flag or variable becomes a value, by the field's type.
_PARSERS: dict[object, Callable[[str], Any]] = {
    bool: parse_bool,
    int: int,
    float: float,
    str: str,
    Path | None: Path,
    tuple[str, ...]: parse_list,
}


@dataclass(frozen=True)
class Setting:
    """One field that a flag and an environment variable set, as `settable` declared it."""

    section: str  # the root config's field holding it; "" for the root's own fields
    name: str
    default: object
    help: str
    parse: Callable[[str], Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def default_text(self) -> str:
        """The default as `--help` and the docs show it (a list joined by commas)."""
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return str(self.default)


def sections(root: type) -> list[tuple[str, type]]:
    """The fields of `root` that are config dataclasses themselves: (name, class), in order."""
    hints = typing.get_type_hints(root)
    return [
        (f.name, hints[f.name])
        for f in dataclasses.fields(root)
        if dataclasses.is_dataclass(hints[f.name])
    ]


def _declared(cls: type, section: str) -> list[Setting]:
    hints = typing.get_type_hints(cls)
    return [
        Setting(
            section=section,
            name=f.name,
            default=f.default,
            help=f.metadata[_HELP],
            parse=f.metadata[_PARSE] or _PARSERS[hints[f.name]],
        )
        for f in dataclasses.fields(cls)
        if _HELP in f.metadata
    ]


def settings(root: type) -> list[Setting]:
    """Every setting of `root`: its own, then each section's, in field order."""
    found = _declared(root, "")
    for name, cls in sections(root):
        found += _declared(cls, name)
    return found


_C = TypeVar("_C")


def build(root: type[_C], values: Mapping[str, Any]) -> _C:
    """A `root` from values keyed by setting name; those not given keep their defaults.

    The sections are built first, in field order, then `root` itself, so the first
    bad value is the one reported.

    Raises:
        ValueError: a value breaks its field's rule (the message names the field).
    """

    def given(cls: type) -> dict[str, Any]:
        return {
            f.name: values[f.name]
            for f in dataclasses.fields(cls)
            if _HELP in f.metadata and f.name in values
        }

    parts = {name: cls(**given(cls)) for name, cls in sections(root)}
    return root(**given(root), **parts)
