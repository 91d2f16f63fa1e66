"""A cell's figures, merged from the raw samples of its load processes."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hingeloss_bench.cells import CellSpec, ShareResult

MB = 1e6


@dataclass
class CellResult:
    """The figures of one cell. Latencies in milliseconds, sizes in bytes, MB = 10**6 bytes.

    Attributes:
        rps, rows_per_s: answered requests (and their samples) per second of the
            measurement window, which runs from its start to the last answer.
        mb_up_per_s, mb_down_per_s: request and response payload (serialized
            messages, without HTTP/2 framing) per second.
        latency_*_ms: from the send (closed loop) or from the scheduled send time
            (open loop) to the answer.
        queue_ms, compute_ms: the server's own Timing, means over the answers:
            waiting in its batch queue, and computing the batch (the whole batch,
            shared by every request in it).
        outside_ms: mean latency minus queue and compute: transport, decoding,
            validation and encoding.
        errors: by gRPC status name; MISMATCH counts verified answers that differ
            from the local float64 reference.
    """

    label: str
    loss: str
    shape: str
    dtype: str
    mode: str
    gradient_format: str
    sparsity: float | None
    concurrency: int | None
    rate: float | None
    arrivals: str | None
    processes: int
    connections: int
    window_s: float
    sent: int
    ok: int
    error_count: int
    rps: float
    rows_per_s: float
    mb_up_per_s: float
    mb_down_per_s: float
    request_bytes: float
    response_bytes: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    latency_mean_ms: float
    queue_ms: float
    compute_ms: float
    outside_ms: float
    batch_requests: float
    batch_rows: float
    send_lag_p99_ms: float | None
    send_lag_max_ms: float | None
    verified: int
    errors: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    tag: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """One CSV row: errors as "CODE:count;...", mismatch texts left out."""
        row = self.to_dict()
        row["errors"] = ";".join(f"{k}:{v}" for k, v in sorted(self.errors.items()))
        row.pop("mismatches")
        return row


def _ms(values: np.ndarray[Any, Any], q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if values.size else float("nan")


def _mean(values: np.ndarray[Any, Any], scale: float = 1.0) -> float:
    return float(values.mean() * scale) if values.size else float("nan")


def merge(spec: CellSpec, shares: list[ShareResult], tag: str = "") -> CellResult:
    """Combines the shares of one cell into its figures."""
    latencies = np.concatenate([s.latencies_s for s in shares])
    queue_us = np.concatenate([s.queue_us for s in shares])
    compute_us = np.concatenate([s.compute_us for s in shares])
    lags = np.concatenate([s.send_lag_s for s in shares])
    errors: Counter[str] = Counter()
    for share in shares:
        errors.update(share.errors)
    ok = sum(s.ok for s in shares)
    sent = sum(s.sent for s in shares)
    window = max((s.window_s for s in shares), default=0.0)
    per_s = 1.0 / window if window > 0 else 0.0
    bytes_up = sum(s.bytes_up for s in shares)
    bytes_down = sum(s.bytes_down for s in shares)
    workload = spec.workload
    mean_latency = _mean(latencies, 1e3)
    queue_ms = _mean(queue_us, 1e-3)
    compute_ms = _mean(compute_us, 1e-3)
    return CellResult(
        label=spec.label,
        loss=workload.loss,
        shape=workload.shape_text,
        dtype=workload.dtype,
        mode=spec.mode,
        gradient_format=workload.gradient_format,
        sparsity=workload.sparsity,
        concurrency=spec.concurrency,
        rate=spec.rate,
        arrivals=spec.arrivals if spec.rate is not None else None,
        processes=len(shares),
        connections=spec.connections,
        window_s=window,
        sent=sent,
        ok=ok,
        error_count=sum(errors.values()),
        rps=ok * per_s,
        rows_per_s=ok * workload.batch * per_s,
        mb_up_per_s=bytes_up / MB * per_s,
        mb_down_per_s=bytes_down / MB * per_s,
        request_bytes=bytes_up / sent if sent else float("nan"),
        response_bytes=bytes_down / ok if ok else float("nan"),
        latency_p50_ms=_ms(latencies, 50),
        latency_p90_ms=_ms(latencies, 90),
        latency_p99_ms=_ms(latencies, 99),
        latency_max_ms=float(latencies.max() * 1e3) if latencies.size else float("nan"),
        latency_mean_ms=mean_latency,
        queue_ms=queue_ms,
        compute_ms=compute_ms,
        outside_ms=mean_latency - queue_ms - compute_ms,
        batch_requests=_mean(np.concatenate([s.batch_requests for s in shares])),
        batch_rows=_mean(np.concatenate([s.batch_rows for s in shares])),
        send_lag_p99_ms=_ms(lags, 99) if spec.rate is not None else None,
        send_lag_max_ms=float(lags.max() * 1e3) if spec.rate is not None and lags.size else None,
        verified=sum(s.verified for s in shares),
        errors=dict(sorted(errors.items())),
        mismatches=[m for s in shares for m in s.mismatches][:5],
        tag=tag,
    )
