"""Markers by folder (unit, integration, gpu, deploy) and the shared server fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.servers import InProcessServer, ServerThread, server_config

from hingeloss_server.config import ServerConfig

TESTS = Path(__file__).resolve().parent
KINDS = ("unit", "integration", "gpu", "deploy")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks each test with the kind its folder names, so that `pytest -m unit` picks the fast ones.

    A test outside those folders is an error: it would escape every selection by kind.
    """
    for item in items:
        kind = item.path.resolve().relative_to(TESTS).parts[0]
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{{','.join(KINDS)}}}/")
        item.add_marker(kind)


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


@pytest.fixture
def serve_in_process() -> Iterator[Callable[[InProcessServer], str]]:
    """Takes in-process test servers (proxies, stand-ins) and gives their targets; closes
    them after the test."""
    started: list[InProcessServer] = []

    def serve(server: InProcessServer) -> str:
        started.append(server)
        return f"127.0.0.1:{server.port}"

    yield serve
    for server in started:
        server.close()


@pytest.fixture(scope="session")
def shared_server() -> Iterator[ServerThread]:
    """One default server for the tests that only need a correct one."""
    thread = ServerThread(server_config()).start()
    yield thread
    thread.stop()
