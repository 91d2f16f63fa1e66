"""The flag table of docs/configuration.md, made from the fields of `ServerConfig`.

`python -m hingeloss_server.config_table docs/configuration.md` (`make config-docs`)
rewrites the table between its two markers and leaves the rest of the page alone;
a test fails when the committed table is not the one these fields give.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hingeloss_server.config import ServerConfig
from hingeloss_server.settings import settings

BEGIN = "<!-- flag table: made by `make config-docs` from config.py; do not edit by hand -->"
END = "<!-- end of flag table -->"


def flag_table() -> str:
    """One Markdown row per setting, in `--help` order: section, flag, variable, default, help."""
    rows = [
        "| section | flag | environment variable | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for setting in settings(ServerConfig):
        meaning = setting.help.replace("|", "\\|")
        rows.append(
            f"| {setting.section or 'server'} | `{setting.flag}` | `{setting.env}` "
            f"| `{setting.default_text}` | {meaning} |"
        )
    return "\n".join(rows) + "\n"


def table_in(page: str) -> str:
    """The text between the markers of `page`.

    Raises:
        ValueError: the page lacks a marker.
    """
    if BEGIN not in page or END not in page:
        raise ValueError(f"the page needs the markers {BEGIN!r} and {END!r}")
    return page.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def with_table(page: str) -> str:
    """`page` with the text between its markers replaced by the current flag table."""
    table_in(page)  # both markers are there
    head, rest = page.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{flag_table()}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m hingeloss_server.config_table PAGE.md", file=sys.stderr)
        return 2
    page = Path(args[0])
    page.write_text(with_table(page.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
