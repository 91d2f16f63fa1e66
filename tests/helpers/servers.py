"""Real servers on 127.0.0.1, port 0: on an event-loop thread of the test, or in a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

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


def server_argv(*flags: str, device: str = "cpu") -> list[str]:
    """`python -m hingeloss_server` on 127.0.0.1, any free port, metrics off; `flags` win."""
    return [
        *(sys.executable, "-m", "hingeloss_server", "--host", "127.0.0.1", "--port", "0"),
        *("--metrics-port", "0", "--devices", device, *flags),
    ]


class ServerProcess:
    """A server in its own process, serving on the port it writes to its --port-file.

    The one way tests and tools start a server process (a Popen of `argv`, which gets
    `--port-file`; `server_argv()` for hingeloss itself). Its output goes to
    `<workdir>/<name>.log`, or with `log=False` stderr is a pipe the test reads.
    Stopping sends SIGTERM and waits for the graceful exit; `kill()` does not wait.
    """

    def __init__(
        self,
        argv: Sequence[str],
        workdir: Path,
        *,
        name: str = "server",
        env: Mapping[str, str] | None = None,
        log: bool = True,
    ) -> None:
        self.name = name
        self._argv = list(argv)
        self._env = None if env is None else {**os.environ, **env}
        self._port_file = workdir / f"{name}.port"
        self._log = workdir / f"{name}.log" if log else None
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._process is not None, f"{self.name} was not started"
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        argv = [*self._argv, "--port-file", str(self._port_file)]
        if self._log is None:
            self._process = subprocess.Popen(argv, env=self._env, stderr=subprocess.PIPE)
        else:
            with self._log.open("wb") as out:
                self._process = subprocess.Popen(
                    argv, env=self._env, stdout=out, stderr=subprocess.STDOUT
                )
        return self

    def wait_ready(self, timeout_s: float = 180) -> int:
        """Waits for the port file (written once every worker is warm); returns the port."""
        try:
            self.port = wait_for_port(self._port_file, self.process, timeout_s)
        except AssertionError as error:
            self.kill()
            raise RuntimeError(f"{self.name} did not start ({error}):\n{self.log_tail()}") from None
        return self.port

    def log_tail(self, chars: int = 3000) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return self._log.read_text(errors="replace")[-chars:]

    def stop(self, grace_s: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s`; the exit status (None if never started)."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> ServerProcess:
        self.start().wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def spawn_server(folder: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`server_argv(*flags)` in a process of its own (stderr piped), killed on the way out.

    Yields the process and its port.
    """
    server = ServerProcess(server_argv(*flags), folder, log=False).start()
    try:
        yield server.process, wait_for_port(folder / "server.port", server.process)
    finally:
        server.kill()


class InProcessServer:
    """A real gRPC server in this process, serving `handler()`; `upstream`, a channel to
    a real server behind it, where one is given."""

    def __init__(self, upstream: str | None = None, options: Sequence[Any] = ()) -> None:
        self.upstream = grpc.insecure_channel(upstream, options=options) if upstream else None
        self._server = grpc.server(futures.ThreadPoolExecutor(4), options=options)
        self._server.add_generic_rpc_handlers((self.handler(),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def handler(self) -> grpc.GenericRpcHandler:
        raise NotImplementedError

    def close(self) -> None:
        self._server.stop(None)
        if self.upstream is not None:
            self.upstream.close()


class RefusesUnread(InProcessServer):
    """A gRPC server whose ComputeUpload and ComputeStream calls end with `code` a moment
    after they start, without reading what is sent (as a server refusing a request on
    its first part may, or an older one refusing the method, while megabytes more are
    on their way). Its Compute refuses alike or, given `upstream`, forwards to a real
    server. It records each method asked."""

    def __init__(self, code: grpc.StatusCode, upstream: str | None = None) -> None:
        self.asked: list[str] = []
        self._code = code
        super().__init__(upstream, options=[("grpc.max_receive_message_length", 1 << 30)])

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "hingeloss.v1.LossService",
            {
                "ComputeUpload": grpc.stream_unary_rpc_method_handler(
                    self._refuse("ComputeUpload")
                ),
                "ComputeStream": grpc.stream_stream_rpc_method_handler(
                    self._refuse("ComputeStream")
                ),
                "Compute": grpc.unary_unary_rpc_method_handler(self._compute()),
            },
        )

    def _refuse(self, method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handle(requests: Any, context: grpc.ServicerContext) -> Any:
            self.asked.append(method)
            time.sleep(0.05)  # what is sent piles up in flight, unread
            context.abort(self._code, "scores: refused unread")

        return handle

    def _compute(self) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        forward = (
            self.upstream.unary_unary("/hingeloss.v1.LossService/Compute")
            if self.upstream
            else None
        )

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.asked.append("Compute")
            if forward is None:
                context.abort(self._code, "scores: refused unread")
                raise AssertionError("abort raises")  # which untyped grpc does not tell mypy
            answer: bytes = forward(request)
            return answer

        return handle
