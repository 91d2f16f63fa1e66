"""Shared fixtures: servers started per test or once per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import ServerThread, server_config

from hingeloss_server.config import ServerConfig


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerThread]]:
    """Starts servers with config overrides; stops them after the test."""
    started: list[ServerThread] = []

    def make(config: ServerConfig | None = None, **server_kwargs: Any) -> ServerThread:
        thread = ServerThread(config or server_config(), **server_kwargs).start()
        started.append(thread)
        return thread

    yield make
    for thread in started:
        thread.stop()


@pytest.fixture(scope="session")
def shared_server() -> Iterator[ServerThread]:
    """One default server for the tests that only need a correct one."""
    thread = ServerThread(server_config()).start()
    yield thread
    thread.stop()
