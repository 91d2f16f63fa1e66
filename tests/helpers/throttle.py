"""A TCP proxy that slows one direction down: uploads and downloads that take a while.

Runs its own event loop on a thread. Each connection is forwarded to the
upstream address; bytes towards the server (`up_bps`) or towards the client
(`down_bps`) are paced, and counted per connection, so that a test knows how
far each call's transfer has got.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 64 << 10


@dataclass
class Transfer:
    """Bytes one connection has forwarded each way."""

    up: int = 0
    down: int = 0
    reset: bool = False


class ThrottlingProxy:
    """Forwards 127.0.0.1:<port> to `upstream`, pacing each direction to a rate (bytes/s)."""

    def __init__(
        self, upstream: tuple[str, int], *, up_bps: float | None, down_bps: float | None
    ) -> None:
        self._upstream = upstream
        self._rates = (up_bps, down_bps)
        self.transfers: list[Transfer] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="throttling-proxy", daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ThrottlingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connect, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def wait_until(self, predicate: Callable[[list[Transfer]], bool], timeout: float) -> bool:
        """Waits (polling lightly) until `predicate(transfers)` holds; returns whether it did."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(list(self.transfers)):
                return True
            time.sleep(0.01)
        return False

    async def _connect(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        transfer = Transfer()
        self.transfers.append(transfer)
        # A small receive buffer towards the server (set before connecting, so that the
        # window is small too): paced downloads then wait in the server, not in this proxy.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHUNK)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self._upstream)
        except OSError:  # the server is gone: so is this connection
            sock.close()
            client_w.transport.abort()
            return
        server_r, server_w = await asyncio.open_connection(sock=sock)
        up, down = self._rates
        await asyncio.gather(
            self._pump(client_r, server_w, up, transfer, "up"),
            self._pump(server_r, client_w, down, transfer, "down"),
            return_exceptions=True,
        )
        for writer in (client_w, server_w):
            writer.close()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rate: float | None,
        transfer: Transfer,
        direction: str,
    ) -> None:
        started = time.monotonic()
        sent = 0
        try:
            while chunk := await reader.read(CHUNK):
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                setattr(transfer, direction, sent)
                if rate is not None:
                    await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
        except ConnectionResetError:
            # Passed on as a reset: the other side loses what it has not read yet.
            transfer.reset = True
            writer.transport.abort()
        else:
            if writer.can_write_eof():
                writer.write_eof()
