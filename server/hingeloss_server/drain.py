"""What a graceful shutdown waits for: the calls in progress, then their answers' delivery.

gRPC's own `server.stop(grace)` ends every connection as soon as its calls are
complete, and a call is complete once its answer is in the kernel's send
buffer, not when the caller has it: megabytes may still be on their way, and a
connection closed then (with the caller's window updates arriving unread) is
reset, losing them. So shutdown first lets every accepted call finish, then
waits until the kernel has delivered what the server's connections hold, and
only then stops the gRPC server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# How often the kernel's send queues are looked at while answers drain (there is
# no event for "the peer acknowledged everything").
SEND_QUEUE_POLL_S = 0.05
_TCP_TABLES = (Path("/proc/self/net/tcp"), Path("/proc/self/net/tcp6"))


class CallTracker:
    """Counts the calls in progress; `wait_idle` returns once there are none."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every call finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    return inodes


def unsent_bytes(port: int) -> int | None:
    """Bytes this process's connections on `port` hold that the peers have not acknowledged.

    None where the kernel does not say (no /proc, as on macOS): then nothing is waited for.
    """
    if not _TCP_TABLES[0].exists():
        return None
    ours = _socket_inodes()
    total = 0
    for table in _TCP_TABLES:
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[9] in ours:
                    total += int(fields[4].split(":")[0], 16)  # tx_queue
    return total


async def wait_until_delivered(port: int, timeout: float) -> bool:
    """Waits until the connections on `port` have delivered all they hold; False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Twice empty in a row: an answer whose handler just returned may not have
    # reached the kernel at the first look.
    empty_looks = 0
    while empty_looks < 2:
        empty_looks = empty_looks + 1 if not unsent_bytes(port) else 0
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(SEND_QUEUE_POLL_S)
    return True
