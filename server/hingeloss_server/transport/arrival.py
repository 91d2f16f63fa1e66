"""The arrival limit: how long a call's messages may take to come, once it has begun.

A call is accepted on its headers; a message that never comes would hold it (and one
of the server's concurrent calls) for ever. Shared by Compute, ComputeUpload and the
open services' calls without the token (tokenless.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from hingeloss_server.engine.errors import ArrivalTimeoutError


@contextlib.asynccontextmanager
async def arrival_limit(seconds: float) -> AsyncIterator[None]:
    """What is read inside must have come within `seconds`; else ArrivalTimeoutError."""
    try:
        # asyncio.timeout, not wait_for: wait_for runs the read in a task of its own,
        # a task per request on the event loop that every caller shares.
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise ArrivalTimeoutError(f"the request did not arrive within {seconds:g} s") from None
