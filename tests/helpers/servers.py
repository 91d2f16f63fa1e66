"""Test support: real servers on 127.0.0.1, port 0, each on its own event-loop thread."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from hingeloss_server.app import HingelossServer
from hingeloss_server.config import ServerConfig, WorkerConfig


def server_config(**overrides: Any) -> ServerConfig:
    """A config for tests: loopback, any free port, metrics endpoint off, CPU."""
    base = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        drain_seconds=5.0,
        workers=WorkerConfig(devices=("cpu",)),
    )
    return replace(base, **overrides)


class ServerThread:
    """Runs a HingelossServer on a private event loop in a background thread.

    Sync and asyncio clients in the test talk to it over a real channel.
    """

    def __init__(self, config: ServerConfig, **server_kwargs: Any) -> None:
        self.config = config
        self.server = HingelossServer(config, **server_kwargs)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hingeloss-test-server", daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as error:  # reported to the starting thread
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_until_complete(self.server.wait_for_termination())
        self._loop.close()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs a coroutine function on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(60)

    def begin_stop(self) -> None:
        """Starts a graceful shutdown without waiting for it."""
        self._loop.call_soon_threadsafe(self.server.stop)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.begin_stop()
            self._thread.join(60)


def wait_for_port(port_file: Path, process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """The port a server process writes to its --port-file once it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if process.poll() is not None:
            raise AssertionError(f"server exited early with {process.returncode}")
        time.sleep(0.05)
    raise AssertionError("server did not start")


@contextlib.contextmanager
def spawn_server(folder: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`python -m hingeloss_server` on 127.0.0.1, any free port, CPU, metrics off.

    Yields the process (stderr piped) and its port; kills it on the way out.
    """
    port_file = folder / "port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hingeloss_server",
            *("--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)),
            *("--metrics-port", "0", "--devices", "cpu"),
            *flags,
        ],
        stderr=subprocess.PIPE,
    )
    try:
        yield process, wait_for_port(port_file, process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
