"""The server's configuration: one frozen dataclass per component, validated on creation.

Flags and ``HINGELOSS_*`` variables (see `cli.py`) become one `ServerConfig`; each
component receives only its own section. Tests build these dataclasses directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits, checked before any tensor data is touched."""

    max_message_bytes: int = 512 * MIB
    max_request_rows: int = 1 << 22
    max_request_elements: int = 1 << 28
    # Tensor data of one request, all tensors together (checked from shapes, before reading).
    max_request_bytes: int = 512 * MIB
    max_dims: int = 2

    def __post_init__(self) -> None:
        _require(
            self.max_message_bytes >= 1024, "max_message_bytes", ">= 1024", self.max_message_bytes
        )
        _require(self.max_request_rows >= 1, "max_request_rows", ">= 1", self.max_request_rows)
        _require(
            self.max_request_elements >= 1,
            "max_request_elements",
            ">= 1",
            self.max_request_elements,
        )
        _require(self.max_request_bytes >= 1, "max_request_bytes", ">= 1", self.max_request_bytes)
        _require(self.max_dims >= 2, "max_dims", ">= 2", self.max_dims)


@dataclass(frozen=True)
class BatchingConfig:
    """How requests queue and group into batches."""

    max_batch_rows: int = 65536
    # Large requests gain nothing from sharing a batch and lose to the extra copies and
    # cache misses of one huge concatenation (measured: 15 requests of 16 MB together took
    # 1.1-2.1 s on 2 cores, against 32-60 ms each alone).
    max_batch_bytes: int = 32 * MIB
    max_batch_delay_us: int = 0
    # Four times the largest request in rows and bytes (max_request_rows, and
    # max_request_bytes against max_queue_bytes): a request that does not fit beside
    # the queue waits for it to drain, so a largest request still gets in whenever the
    # queue is at most three quarters full, and is not starved by a stream of small ones.
    max_queue_rows: int = 1 << 24
    max_queue_bytes: int = 2048 * MIB
    # Everything held for requests (queued, computing, answers not yet sent): each
    # request's message, result and serialized answer (budget.held_bytes, about three
    # times its tensor bytes); beyond it requests are shed like a full queue.
    max_inflight_bytes: int = 4096 * MIB

    def __post_init__(self) -> None:
        _require(self.max_batch_rows >= 1, "max_batch_rows", ">= 1", self.max_batch_rows)
        _require(self.max_batch_bytes >= 1, "max_batch_bytes", ">= 1", self.max_batch_bytes)
        _require(
            self.max_batch_delay_us >= 0, "max_batch_delay_us", ">= 0", self.max_batch_delay_us
        )
        _require(self.max_queue_rows >= 1, "max_queue_rows", ">= 1", self.max_queue_rows)
        _require(self.max_queue_bytes >= 1, "max_queue_bytes", ">= 1", self.max_queue_bytes)
        _require(
            self.max_inflight_bytes >= 1, "max_inflight_bytes", ">= 1", self.max_inflight_bytes
        )


@dataclass(frozen=True)
class WorkerConfig:
    """The device worker pool: which devices, how many threads on each."""

    devices: tuple[str, ...] = ("auto",)
    workers_per_device: int = 1
    # A worker busy on one batch longer than this is reported stuck (health NOT_SERVING).
    watchdog_seconds: float = 60.0

    def __post_init__(self) -> None:
        _require(len(self.devices) >= 1, "devices", "non-empty", self.devices)
        for device in self.devices:
            _require(
                device == "auto" or bool(_DEVICE.match(device)),
                "devices",
                "'auto' or a list of 'cpu', 'cuda' or 'cuda:N'",
                device,
            )
        _require(
            self.devices == ("auto",) or "auto" not in self.devices,
            "devices",
            "'auto' alone",
            self.devices,
        )
        _require(
            self.workers_per_device >= 1, "workers_per_device", ">= 1", self.workers_per_device
        )
        _require(self.watchdog_seconds > 0, "watchdog_seconds", "> 0", self.watchdog_seconds)


@dataclass(frozen=True)
class SecurityConfig:
    """Transport security and caller authentication."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None

    def __post_init__(self) -> None:
        _require(
            (self.tls_cert is None) == (self.tls_key is None),
            "tls_cert and tls_key",
            "given together",
            (self.tls_cert, self.tls_key),
        )
        _require(
            self.tls_client_ca is None or self.tls_cert is not None,
            "tls_client_ca",
            "used with tls_cert and tls_key",
            self.tls_client_ca,
        )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def read_token(path: Path) -> str:
    """The bearer token in `path`, without surrounding whitespace.

    Raises:
        ValueError: the file holds only whitespace, which would make the empty
            token (`authorization: Bearer `) valid.
    """
    token = path.read_text().strip()
    _require(
        bool(token), "auth_token_file", "a file holding a token, not only whitespace", str(path)
    )
    return token


@dataclass(frozen=True)
class ServerConfig:
    """Everything `hingeloss-server` needs; one per process."""

    host: str = "0.0.0.0"
    port: int = 50051
    # Written with the bound port once the server listens (useful with port 0).
    port_file: Path | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    reflection: bool = True
    max_concurrent_rpcs: int = 4096
    # On SIGTERM: health says NOT_SERVING this long first, so load balancers stop routing here.
    shutdown_delay_seconds: float = 0.0
    # Then in-flight work gets this long to finish.
    drain_seconds: float = 10.0
    keepalive_time_seconds: float = 60.0
    keepalive_min_ping_interval_seconds: float = 10.0
    max_connection_age_seconds: float = 0.0
    log_level: str = "INFO"
    log_format: str = "text"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    # A Compute request whose message has not arrived in full after this long is
    # refused (DEADLINE_EXCEEDED), so a stalled upload without a deadline is not held forever.
    request_arrival_seconds: float = 300.0

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port", "in [0, 65535]", self.port)
        _require(
            self.request_arrival_seconds > 0,
            "request_arrival_seconds",
            "> 0",
            self.request_arrival_seconds,
        )
        _require(
            0 <= self.metrics_port <= 65535, "metrics_port", "in [0, 65535]", self.metrics_port
        )
        _require(
            self.max_concurrent_rpcs >= 1, "max_concurrent_rpcs", ">= 1", self.max_concurrent_rpcs
        )
        _require(
            self.shutdown_delay_seconds >= 0,
            "shutdown_delay_seconds",
            ">= 0",
            self.shutdown_delay_seconds,
        )
        _require(self.drain_seconds >= 0, "drain_seconds", ">= 0", self.drain_seconds)
        _require(
            self.keepalive_min_ping_interval_seconds > 0,
            "keepalive_min_ping_interval_seconds",
            "> 0",
            self.keepalive_min_ping_interval_seconds,
        )
        _require(
            self.max_connection_age_seconds >= 0,
            "max_connection_age_seconds",
            ">= 0",
            self.max_connection_age_seconds,
        )
        _require(
            self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
            "log_level",
            "one of DEBUG, INFO, WARNING, ERROR",
            self.log_level,
        )
        _require(
            self.log_format in {"text", "json"}, "log_format", "'text' or 'json'", self.log_format
        )
