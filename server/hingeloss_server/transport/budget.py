"""A byte budget for everything the server holds on behalf of requests.

The queue bound (`max_queue_bytes`) covers what waits for a worker; this one
covers each request from decode until its handler returns: queued, computing,
encoding, and up to a stream's window of answers not yet sent.

What one request really holds at its peak (`held_bytes`): its message as
received (the decoded tensors view it, so it lives until the answer is sent),
the computed result, and the serialized answer, each of the latter about the
size of the request's tensors. Three times the tensor bytes, give or take the
message's few hundred bytes of framing; gRPC's own transient copies of the
message (while it arrives) and of the answer (while it is sent) come on top.
"""

from __future__ import annotations

from dataclasses import dataclass


def held_bytes(message_bytes: int, tensor_bytes: int) -> int:
    """Bytes a request holds at its peak: its message, its result and its answer."""
    return message_bytes + 2 * tensor_bytes


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
