"""A byte budget for everything the server holds on behalf of requests.

The queue bound (`max_queue_bytes`) covers what waits for a worker; this one
covers each request from decode until its handler returns: queued, computing,
encoding, and up to a stream's window of answers not yet sent. A request's
charge is twice its tensor bytes (the request and an answer of about its size).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ByteBudget:
    """Single-threaded (event loop) accounting; never refuses the only request."""

    limit: int
    used: int = 0

    def try_acquire(self, nbytes: int) -> bool:
        if self.used and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
