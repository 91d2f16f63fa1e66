"""Channel set-up shared by the sync and asyncio clients: options, load balancing, retries.

gRPC's own retries buffer at most 256 KiB per call, so score tensors of any real
size would silently not be retried; the SDK therefore retries itself (see
`RetryPolicy`), for every size alike, honouring the server's RetryInfo. The
channel only load-balances (round_robin over every address of the target).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from hingeloss.errors import HingelossError, OverloadedError

DEFAULT_MAX_MESSAGE_BYTES = 512 << 20
DEFAULT_TIMEOUT_S = 30.0

# round_robin over every resolved address; client-side health checking (the server's
# Health.Watch) takes a draining server out of rotation as soon as it says NOT_SERVING.
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "hingeloss.v1.LossService"},
    }
)


# Failures that repeating cannot mend: the server already retried the request alone
# on its device and it still did not fit.
FINAL_REASONS = frozenset({"DEVICE_OUT_OF_MEMORY"})
# gRPC's own RESOURCE_EXHAUSTED for a message over a size limit ("Received message
# larger than max ..."): the same message will never fit.
_TOO_LARGE = "larger than max"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures with exponential backoff and jitter.

    UNAVAILABLE (no server, or one draining), RESOURCE_EXHAUSTED (load shed) and
    CANCELLED: the SDK never cancels a call itself, so a CANCELLED status comes
    from a server that stopped while the request was still arriving. Every call
    is a pure function of its request, so repeating it is always safe. A
    server's RetryInfo delay replaces the computed backoff. No attempt starts
    after the call's deadline.
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

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff(self, attempt: int, error: HingelossError) -> float:
        """Seconds to wait before attempt number `attempt + 1` (attempts count from 1)."""
        if isinstance(error, OverloadedError) and error.retry_delay is not None:
            base = error.retry_delay
        else:
            base = min(
                self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1)
            )
        return base * (1 + random.uniform(-self.jitter, self.jitter))

    def next_delay(
        self, attempt: int, error: HingelossError, remaining_s: float | None
    ) -> float | None:
        """The wait before retrying, or None when the error is final."""
        if attempt >= self.max_attempts or error.code not in self.retryable:
            return None
        if error.reason in FINAL_REASONS or _TOO_LARGE in error.message:
            return None
        delay = self.backoff(attempt, error)
        if remaining_s is not None and delay >= remaining_s:
            return None
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)


def channel_options(
    max_message_bytes: int, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """Explicit size limits, keepalive above the server's minimum, round_robin."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 0),
        *extra,
    ]


def open_channel(
    api: Any,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    compression: grpc.Compression | None,
    max_message_bytes: int,
    options: Sequence[tuple[str, Any]],
) -> Any:
    """A channel from `api` (the `grpc` module or `grpc.aio`), TLS when credentials are given."""
    args = channel_options(max_message_bytes, options)
    if credentials is None:
        return api.insecure_channel(target, args, compression)
    return api.secure_channel(target, credentials, args, compression)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the bearer token, when one is set (works with or without TLS)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
