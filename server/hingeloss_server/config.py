"""The server's configuration: one frozen dataclass per component, validated on creation.

Each field that can be set from outside is declared once, with `settable`
(settings.py): its flag, its ``HINGELOSS_*`` variable and its help follow from that
declaration, and so do the command line (`cli.py`) and the flag table of
docs/configuration.md. Each component receives only its own section. Tests build
these dataclasses directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hingeloss_server.settings import settable

MIB = 1 << 20
# Rows of each batch whose signed margins feed the hingeloss_margin histogram.
MARGIN_SAMPLE_ROWS = 256

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits, checked before any tensor data is touched."""

    max_request_rows: int = settable(1 << 22, "rows per request at most")
    max_request_elements: int = settable(1 << 28, "elements per tensor at most")
    # Tensor data of one request, all tensors together (checked from shapes, before reading).
    max_request_bytes: int = settable(
        512 * MIB,
        "tensor bytes per request at most, checked from the shapes before any data is read",
    )
    max_message_bytes: int = settable(
        512 * MIB, "gRPC message size limit, both directions (default 512 MiB)"
    )

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


@dataclass(frozen=True)
class BatchingConfig:
    """How requests queue and group into batches."""

    max_batch_rows: int = settable(65536, "rows per batch at most")
    # Large requests gain nothing from sharing a batch and lose to the extra copies and
    # cache misses of one huge concatenation (measured: 15 requests of 16 MB together took
    # 1.1-2.1 s on 2 cores, against 32-60 ms each alone).
    max_batch_bytes: int = settable(32 * MIB, "tensor bytes per batch at most")
    # Batch by cost. Measured on 2 cores, Weston-Watkins, float32, one intra-op thread,
    # 1000 classes (docs/benchmarks.md): requests of 2 MB and more were consistently
    # faster one by one than together (1.1x at 2 MB, 1.4x at 4 MB); at 1 MB it went
    # either way (0.5x to 1.4x), so those still share a batch.
    max_shared_request_bytes: int = settable(
        1 * MIB,
        "tensor bytes of a request above which it is computed alone, never concatenated "
        "with other requests",
    )
    # Measured on 2 cores (AMD EPYC, 2 MiB of L2 per core, 32 MiB of L3), Weston-Watkins,
    # float32, one intra-op thread (docs/benchmarks.md): several requests computed
    # together were 1.3x to 2.7x faster than one by one while the batch held up to
    # about 8 MB, and slower past it (0.7x to 0.9x at 16 to 33 MB), as the
    # concatenated batch and the kernel's temporaries no longer stay in cache.
    max_shared_batch_bytes: int = settable(
        4 * MIB,
        "tensor bytes at most in a batch of several requests (one larger request is "
        "still computed, alone)",
    )
    max_batch_delay_us: int = settable(
        0, "wait this long for more requests when a batch is not full (0: never wait)"
    )
    # Measured on 2 cores, 32x10 requests computed on the event loop, 8 in flight: a
    # wait of 200, 500, 1000 and 2000 us gave 1.27, 1.61, 1.76 and 1.53 times the
    # requests/s of computing each request as it came (docs/benchmarks.md).
    max_gather_wait_us: int = settable(
        1000,
        "when a batch is not full, wait up to this long for more requests, as long as "
        "such waits keep gathering some (0: never wait)",
    )
    # Four times the largest request in rows and bytes (max_request_rows, and
    # max_request_bytes against max_queue_bytes): a request that does not fit beside
    # the queue waits for it to drain, so a largest request still gets in whenever the
    # queue is at most three quarters full, and is not starved by a stream of small ones.
    max_queue_rows: int = settable(1 << 24, "queued rows before shedding load")
    max_queue_bytes: int = settable(2048 * MIB, "queued bytes before shedding load")
    # Everything held for requests (queued, computing, answers not yet sent): each
    # request's message, result and serialized answer (budget.held_bytes, about three
    # times its tensor bytes); beyond it requests are shed like a full queue.
    max_inflight_bytes: int = settable(
        4096 * MIB,
        "bytes held for requests (message, result and answer: about 3x their tensors) "
        "before shedding load",
    )

    def __post_init__(self) -> None:
        _require(self.max_batch_rows >= 1, "max_batch_rows", ">= 1", self.max_batch_rows)
        _require(self.max_batch_bytes >= 1, "max_batch_bytes", ">= 1", self.max_batch_bytes)
        _require(
            self.max_shared_request_bytes >= 0,
            "max_shared_request_bytes",
            ">= 0",
            self.max_shared_request_bytes,
        )
        _require(
            self.max_shared_batch_bytes >= 0,
            "max_shared_batch_bytes",
            ">= 0",
            self.max_shared_batch_bytes,
        )
        _require(
            self.max_gather_wait_us >= 0,
            "max_gather_wait_us",
            ">= 0",
            self.max_gather_wait_us,
        )
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

    devices: tuple[str, ...] = settable(("auto",), "auto, cpu, or cuda:0,cuda:1,...")
    workers_per_device: int = settable(1, "worker threads per device")
    # A worker busy on one batch longer than this is reported stuck (health NOT_SERVING).
    watchdog_seconds: float = settable(
        60.0, "a batch running longer than this marks the server NOT_SERVING"
    )
    # The margins are computed for the metrics only; the server gives workers 0 when
    # metrics are off.
    margin_sample_rows: int = settable(
        MARGIN_SAMPLE_ROWS,
        "rows of each batch whose signed margins feed the hingeloss_margin histogram "
        "(0: none; none either while metrics are off)",
    )

    # A CPU batch of a few MB costs less than the hand-off to a thread and back, where the
    # two threads would trade the GIL at every tensor operation. Measured on 2 cores
    # (docs/benchmarks.md), 4 MiB against 64 KiB: 1.23-1.38x the requests/s at 64x1000
    # with 8 in flight, 1.04-1.31x at 256x1000 with 1, 8 and 32; the event loop is held
    # for at most a few milliseconds, and larger batches still go to the thread.
    inline_batch_bytes: int = settable(
        4 * MIB,
        "CPU batches of at most this many tensor bytes are computed on the event loop "
        "instead of the worker's thread (0: never)",
    )

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
        _require(
            self.margin_sample_rows >= 0, "margin_sample_rows", ">= 0", self.margin_sample_rows
        )
        _require(
            self.inline_batch_bytes >= 0, "inline_batch_bytes", ">= 0", self.inline_batch_bytes
        )


@dataclass(frozen=True)
class SecurityConfig:
    """Transport security and caller authentication."""

    tls_cert: Path | None = settable(None, "PEM certificate chain (enables TLS)")
    tls_key: Path | None = settable(None, "PEM private key")
    tls_client_ca: Path | None = settable(
        None, "PEM CA bundle; requires client certificates (mTLS)"
    )
    auth_token_file: Path | None = settable(
        None, "require 'authorization: Bearer <token>' from this file"
    )
    # Health and reflection answer without the token (probes carry none), but each call
    # holds one of --max-concurrent-rpcs while open: those without the token share this
    # many, never more than half of them (transport/tokenless.py).
    max_calls_without_token: int = settable(
        64,
        "with a token: health and reflection calls without it open at once, at most half "
        "of --max-concurrent-rpcs (more: RESOURCE_EXHAUSTED)",
    )

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
        _require(
            self.max_calls_without_token >= 1,
            "max_calls_without_token",
            ">= 1",
            self.max_calls_without_token,
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
    """Where the server listens, its metrics endpoint, shutdown and logs; a section per component.

    Everything `hingeloss-server` needs; one per process.
    """

    host: str = settable("0.0.0.0", "address to listen on")
    port: int = settable(50051, "gRPC port (0: any free port)")
    # Written with the bound port once the server listens (useful with port 0).
    port_file: Path | None = settable(None, "write the bound gRPC port to this file once serving")
    metrics_host: str = settable("0.0.0.0", "address of the /metrics endpoint")
    metrics_port: int = settable(9090, "Prometheus /metrics port (0: off)")
    reflection: bool = settable(True, "enable gRPC server reflection")
    max_concurrent_rpcs: int = settable(4096, "concurrent RPCs before RESOURCE_EXHAUSTED")
    # A Compute request whose message has not arrived in full after this long is
    # refused (DEADLINE_EXCEEDED), so a stalled upload without a deadline is not held forever.
    request_arrival_seconds: float = settable(
        300.0,
        "refuse a Compute request (DEADLINE_EXCEEDED) whose message takes longer to arrive",
    )
    # On SIGTERM: health says NOT_SERVING this long first, so load balancers stop routing here.
    shutdown_delay_seconds: float = settable(
        0.0, "on SIGTERM, report NOT_SERVING this long before refusing new requests"
    )
    # Then in-flight work gets this long to finish.
    drain_seconds: float = settable(10.0, "on SIGTERM, time given to in-flight requests")
    max_connection_age_seconds: float = settable(
        0.0, "close connections after this age so clients re-resolve (0: never)"
    )
    keepalive_time_seconds: float = 60.0
    keepalive_min_ping_interval_seconds: float = 10.0
    # Upper-cased when read, as `logging` wants it.
    log_level: str = settable("INFO", "DEBUG, INFO, WARNING or ERROR", parse=str.upper)
    log_format: str = settable("text", "text or json")
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

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

    @property
    def calls_without_token(self) -> int:
        """security.max_calls_without_token, at most half of max_concurrent_rpcs (rounded
        down): the token's holders keep the rest. At least 1, so that probes are answered;
        with a single concurrent call, that is all of it."""
        half = max(1, self.max_concurrent_rpcs // 2)
        return min(self.security.max_calls_without_token, half)
