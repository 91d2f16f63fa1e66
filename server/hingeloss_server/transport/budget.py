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

from hingeloss_server.engine.errors import OverloadedError

# Suggested wait when the in-flight byte budget is spent (answers drain in milliseconds).
INFLIGHT_RETRY_S = 0.05


def held_bytes(message_bytes: int, tensor_bytes: int) -> int:
    """Bytes a request holds at its peak: its message, its result and its answer."""
    return message_bytes + 2 * tensor_bytes


@dataclass
class ByteBudget:
    """Single-threaded (event loop) accounting; never refuses the only request."""

    limit: int
    used: int = 0

    def try_acquire(self, nbytes: int, *, own: int = 0) -> bool:
        """Takes `nbytes` unless others hold bytes and the total would pass the limit.

        `own` is what the caller itself already holds (a request arriving in parts):
        it never counts as someone else's, so one request alone is never refused.
        """
        if self.used > own and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


def inflight_full(budget: ByteBudget) -> OverloadedError:
    """The refusal of a request the budget has no room for: RESOURCE_EXHAUSTED, retry soon."""
    return OverloadedError(
        "inflight_full",
        INFLIGHT_RETRY_S,
        f"the server holds {budget.used} bytes for requests in flight; "
        f"retry in {INFLIGHT_RETRY_S}s",
    )
