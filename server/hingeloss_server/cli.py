"""`hingeloss-server`: flags and HINGELOSS_* variables -> one ServerConfig -> serve."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from hingeloss import __version__
from hingeloss_server.config import ServerConfig, read_token
from hingeloss_server.settings import Setting, build, sections, settings


def _value_from_env(parser: argparse.ArgumentParser, setting: Setting) -> Any:
    """The setting's HINGELOSS_* variable, parsed, or its default when the variable is unset."""
    text = os.environ.get(setting.env)
    if text is None:
        return setting.default
    try:
        return setting.parse(text)
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(f"{setting.env}: {error}")


def build_parser() -> argparse.ArgumentParser:
    """One flag per setting of ServerConfig, grouped by section; HINGELOSS_* set defaults."""
    parser = argparse.ArgumentParser(
        prog="hingeloss-server",
        description="Serve hinge-family losses and gradients over gRPC. Every flag can "
        "also be set as an environment variable: --max-batch-rows is "
        "HINGELOSS_MAX_BATCH_ROWS.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    groups = {"": parser.add_argument_group("server", _summary(ServerConfig))}
    for name, cls in sections(ServerConfig):
        groups[name] = parser.add_argument_group(name, _summary(cls))
    for setting in settings(ServerConfig):
        groups[setting.section].add_argument(
            setting.flag,
            type=setting.parse,
            default=_value_from_env(parser, setting),
            help=f"{setting.help} [env {setting.env}; default {setting.default_text}]",
        )
    return parser


def _summary(cls: type) -> str:
    """The first line of a config class's docstring: what its section is about."""
    return (cls.__doc__ or "").strip().splitlines()[0]


def config_from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parses flags (and HINGELOSS_* variables) into a validated ServerConfig."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = build(ServerConfig, vars(args))
        if config.security.auth_token_file is not None:
            read_token(config.security.auth_token_file)  # refuse to start on an empty token
        return config
    except (ValueError, OSError) as error:
        parser.error(str(error))
        raise  # unreachable: error() exits


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_level, config.log_format)
    from hingeloss_server.app import serve  # torch loads here, after the flags are checked
    from hingeloss_server.engine.allocator import keep_freed_memory

    keep_freed_memory()
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
