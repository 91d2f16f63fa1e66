"""What the server records about its work: the `Metrics` protocol, and `NoMetrics`.

Callers report events (a request done, a batch computed, a rejection) and never
see a collector, so the server runs the same code with metrics on or off:
`PrometheusMetrics` (prometheus.py) when there is an endpoint or a registry to
record on, `NoMetrics` otherwise (`--metrics-port 0`), which builds nothing and
keeps nothing. Every method is called on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import grpc
    import numpy as np


class Metrics(Protocol):
    """The events the server reports; metric names and labels are the implementation's."""

    def describe_build(self, devices: Iterable[str]) -> None:
        """Versions of this server and the devices it computes on (once, at start-up)."""

    def describe_workers(self, device: str, workers: int, pinned_bytes: int) -> None:
        """The workers of one device and the pinned host memory they keep (after warm-up)."""

    def watch_queue(self, requests: Callable[[], float], rows: Callable[[], float]) -> None:
        """Functions giving the queue's depth, read when the metrics are collected."""

    def rpc_done(self, service: str, method: str, code: str, seconds: float) -> None:
        """One RPC ended with the status `code` (a name, e.g. "OK") after `seconds`."""

    def request_started(self) -> None:
        """A loss computation was accepted (in flight until `request_ended`)."""

    def request_ended(self) -> None:
        """An accepted computation was answered or failed."""

    def bytes_received(self, nbytes: int) -> None:
        """Tensor bytes of a request that passed the structural checks."""

    def bytes_sent(self, nbytes: int) -> None:
        """Tensor bytes of an answer."""

    def request_rejected(self, reason: str) -> None:
        """A request refused or dropped without a result, for `reason` (a small fixed set)."""

    def request_done(self, loss: str, code: grpc.StatusCode, seconds: float | None) -> None:
        """A loss computation ended with `code`; `seconds` is its server time when it is OK."""

    def request_sparsity(self, loss: str, samples: int, active: int, queue_s: float) -> None:
        """An answered request's samples, how many had a non-zero loss, and its queue wait."""

    def batch_done(
        self, device: str, rows: int, requests: int, seconds: float, loss: str, margins: np.ndarray
    ) -> None:
        """A batch computed on `device`, with the margins sampled from its first rows."""


class NoMetrics:
    """Records nothing and holds nothing: the server with `--metrics-port 0`."""

    def describe_build(self, devices: Iterable[str]) -> None:
        pass

    def describe_workers(self, device: str, workers: int, pinned_bytes: int) -> None:
        pass

    def watch_queue(self, requests: Callable[[], float], rows: Callable[[], float]) -> None:
        pass

    def rpc_done(self, service: str, method: str, code: str, seconds: float) -> None:
        pass

    def request_started(self) -> None:
        pass

    def request_ended(self) -> None:
        pass

    def bytes_received(self, nbytes: int) -> None:
        pass

    def bytes_sent(self, nbytes: int) -> None:
        pass

    def request_rejected(self, reason: str) -> None:
        pass

    def request_done(self, loss: str, code: grpc.StatusCode, seconds: float | None) -> None:
        pass

    def request_sparsity(self, loss: str, samples: int, active: int, queue_s: float) -> None:
        pass

    def batch_done(
        self, device: str, rows: int, requests: int, seconds: float, loss: str, margins: np.ndarray
    ) -> None:
        pass
