"""Retries of failed unary calls: the policy, the per-client throttle, and one call's attempts.

gRPC's own retries buffer at most 256 KiB per call, so score tensors of any real
size would silently not be retried; the SDK therefore retries itself, for every
size alike, honouring the server's RetryInfo. Everything here is bookkeeping
without I/O: `CallAttempts` says how long an attempt may take and how long to
wait after a failure, and each client waits its own way (`time.sleep` or
`asyncio.sleep`).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from hingeloss._errors import HingelossError, OverloadedError

# RESOURCE_EXHAUSTED is retried only when the server says it is shedding load: its
# queue is full (ErrorInfo reason), it names a wait (RetryInfo), or gRPC's own
# maximum_concurrent_rpcs guard refused the call. Any other RESOURCE_EXHAUSTED (a
# message over a size limit, a request that does not fit on the device) would
# fail again the same way.
LOAD_SHEDDING_REASONS = frozenset({"QUEUE_FULL"})
_CONCURRENCY_LIMIT = "Concurrent RPC limit exceeded"


def is_load_shedding(error: HingelossError) -> bool:
    """Whether a RESOURCE_EXHAUSTED error says "busy, come back later"."""
    return (
        error.reason in LOAD_SHEDDING_REASONS
        or (isinstance(error, OverloadedError) and error.retry_delay is not None)
        or _CONCURRENCY_LIMIT in error.message
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures with exponential backoff and jitter.

    UNAVAILABLE (no server, or one draining), RESOURCE_EXHAUSTED when the server is
    shedding load (see `is_load_shedding`), and CANCELLED: the SDK cancels a call
    itself only when a server ended an upload without a status, so a CANCELLED
    status comes from a server that stopped while the request was still arriving.
    Every call is a pure function of its request, so repeating it is always safe.
    A server's RetryInfo delay replaces the computed backoff (a negative one is
    taken as 0). No attempt starts after the call's deadline, nor after a wait of
    more than `max_retry_delay_s`: a server that asks for longer ends the call,
    its OverloadedError carrying the delay.

    Retries are throttled per client like gRPC's `retryThrottling`: the client
    holds `throttle_max_tokens` tokens; each failed attempt that could be retried
    costs one, each success gives back `throttle_token_ratio`, and retries are
    allowed only while more than half the tokens are left. A server shedding
    load thus sees first attempts only, not three times the traffic.
    `throttle_max_tokens=None` turns throttling off.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retryable: frozenset[grpc.StatusCode] = field(
        default=frozenset(
            {
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.CANCELLED,
            }
        )
    )
    throttle_max_tokens: float | None = 10.0
    throttle_token_ratio: float = 0.1
    max_retry_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.max_retry_delay_s <= 0:
            raise ValueError(f"max_retry_delay_s must be > 0, got {self.max_retry_delay_s}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.throttle_max_tokens is not None and self.throttle_max_tokens <= 0:
            raise ValueError(
                f"throttle_max_tokens must be > 0 or None, got {self.throttle_max_tokens}"
            )
        if self.throttle_token_ratio <= 0:
            raise ValueError(f"throttle_token_ratio must be > 0, got {self.throttle_token_ratio}")

    def is_retryable(self, error: HingelossError) -> bool:
        """Whether the error is transient: a later attempt may succeed."""
        if error.code not in self.retryable:
            return False
        if error.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return is_load_shedding(error)
        return True

    def backoff(self, attempt: int, error: HingelossError) -> float:
        """Seconds to wait before attempt number `attempt + 1` (attempts count from 1)."""
        asked = _asked_delay(error)
        if asked is not None:
            base = max(0.0, asked)
        else:
            base = min(
                self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1)
            )
        return base * (1 + random.uniform(-self.jitter, self.jitter))

    def next_delay(
        self, attempt: int, error: HingelossError, remaining_s: float | None
    ) -> float | None:
        """The wait before retrying, or None when the error is final (throttling aside)."""
        if attempt >= self.max_attempts or not self.is_retryable(error):
            return None
        asked = _asked_delay(error)
        if asked is not None and asked > self.max_retry_delay_s:
            return None
        delay = self.backoff(attempt, error)
        if asked is not None:
            delay = min(delay, self.max_retry_delay_s)  # jitter takes it no further
        if remaining_s is not None and delay >= remaining_s:
            return None
        return delay


def _asked_delay(error: HingelossError) -> float | None:
    """The server's RetryInfo delay, where it sent one."""
    return error.retry_delay if isinstance(error, OverloadedError) else None


class RetryThrottle:
    """gRPC's retry throttling: a token bucket shared by every call of one client.

    Counted in thousandths of a token, as gRPC does, so that ratios like 0.1 add
    up exactly. Thread-safe: the sync client's calls may come from many threads.
    """

    def __init__(self, max_tokens: float, token_ratio: float) -> None:
        self._max = round(max_tokens * 1000)
        self._ratio = max(1, round(token_ratio * 1000))
        self._milli_tokens = self._max
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        with self._lock:
            return self._milli_tokens / 1000

    def succeeded(self) -> None:
        with self._lock:
            self._milli_tokens = min(self._max, self._milli_tokens + self._ratio)

    def failed(self) -> bool:
        """Counts a failed attempt; returns whether a retry is still allowed."""
        with self._lock:
            self._milli_tokens = max(0, self._milli_tokens - 1000)
            return self._milli_tokens * 2 > self._max


class Retrier:
    """One client's retry state: its policy and its throttle, shared by all its calls."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.throttle = (
            None
            if policy.throttle_max_tokens is None
            else RetryThrottle(policy.throttle_max_tokens, policy.throttle_token_ratio)
        )

    def succeeded(self) -> None:
        if self.throttle is not None:
            self.throttle.succeeded()

    def failed(
        self, attempt: int, error: HingelossError, remaining_s: float | None
    ) -> float | None:
        """Counts a failed attempt; returns the wait before retrying, or None to give up."""
        if not self.policy.is_retryable(error):
            return None
        if self.throttle is not None and not self.throttle.failed():
            return None
        return self.policy.next_delay(attempt, error, remaining_s)


NO_RETRY = RetryPolicy(max_attempts=1)


class CallAttempts:
    """The attempts of one unary call: the timeout of each, and what follows a failure.

    Args:
        retrier: the client's retry state (policy and throttle).
        timeout: seconds the whole call may take, retries and waits included; None: no limit.
        clock: monotonic seconds (`time.monotonic` or the event loop's clock).
    """

    def __init__(self, retrier: Retrier, timeout: float | None, clock: Callable[[], float]) -> None:
        self._retrier = retrier
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        self._attempt = 0

    def _remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - self._clock()

    def start(self) -> float | None:
        """Counts a new attempt; returns its gRPC timeout: what is left of the call's."""
        self._attempt += 1
        remaining = self._remaining()
        return None if remaining is None else max(0.0, remaining)

    def succeeded(self) -> None:
        """The attempt answered: the throttle gets a share of a token back."""
        self._retrier.succeeded()

    def retry_after(self, error: HingelossError) -> float:
        """Seconds to wait before the next attempt; raises `error` when the call gives up."""
        delay = self._retrier.failed(self._attempt, error, self._remaining())
        if delay is None:
            raise error
        return delay
