"""What a load run is given and what one share of it gives back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hingeloss._channel import DEFAULT_MAX_MESSAGE_BYTES
from hingeloss_bench.workload import WorkloadSpec

COMPUTE_METHOD = "/hingeloss.v1.LossService/Compute"
# unary: Compute calls; upload: ComputeUpload calls (each request's scores in parts);
# stream: requests pipelined on ComputeStream calls.
MODES = ("unary", "upload", "stream")
STREAM_METHOD = "/hingeloss.v1.LossService/ComputeStream"
# Responses kept for verification per process and cell, at most.
MAX_VERIFY_SAMPLES = 32
MISMATCH = "MISMATCH"


@dataclass(frozen=True)
class TargetSpec:
    """Where to send and how: address, TLS material (bytes) and bearer token."""

    address: str
    # TLS with the system's roots, unless root_certificates names others.
    use_tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None
    token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Send the token without TLS to a server on this machine (see channel.with_token).
    local_token: bool = False

    @property
    def tls(self) -> bool:
        return (
            self.use_tls or self.root_certificates is not None or self.certificate_chain is not None
        )


@dataclass(frozen=True)
class CellSpec:
    """One measurement: a workload at one concurrency (closed loop) or rate (open loop).

    Exactly one of `concurrency` and `rate` is set. With `requests`, the cell ends
    after that many measured requests; otherwise after `duration_s`. The first
    `warmup_s` seconds run the same load unmeasured.
    """

    target: TargetSpec
    workload: WorkloadSpec
    concurrency: int | None = 1
    rate: float | None = None
    arrivals: str = "poisson"
    mode: str = "unary"
    duration_s: float = 5.0
    requests: int | None = None
    warmup_s: float = 1.0
    connections: int = 1
    verify_fraction: float = 0.02
    timeout_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("set exactly one of concurrency (closed loop) and rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.arrivals not in ("poisson", "constant"):
            raise ValueError(f"arrivals must be poisson or constant, got {self.arrivals!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.requests is None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0, got {self.warmup_s}")
        if self.connections < 1:
            raise ValueError(f"connections must be >= 1, got {self.connections}")
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], got {self.verify_fraction}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def label(self) -> str:
        load = f"c={self.concurrency}" if self.rate is None else f"rate={self.rate:g}/s"
        return f"{self.workload.loss} {self.workload.shape_text} {self.workload.dtype} {load}"


@dataclass
class ShareResult:
    """What one load process measured; merged into a CellResult by the caller."""

    latencies_s: np.ndarray[Any, Any]
    queue_us: np.ndarray[Any, Any]
    compute_us: np.ndarray[Any, Any]
    batch_requests: np.ndarray[Any, Any]
    batch_rows: np.ndarray[Any, Any]
    send_lag_s: np.ndarray[Any, Any]
    sent: int
    ok: int
    errors: dict[str, int]
    bytes_up: int
    bytes_down: int
    window_s: float
    verified: int
    mismatches: list[str]


def code_name(error: BaseException) -> str:
    code = getattr(error, "code", None)
    if callable(code):
        value = code()
        return str(getattr(value, "name", value))
    return type(error).__name__
