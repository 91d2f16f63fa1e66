"""Prometheus collectors against a real server: a known workload, then every metric checked.

Expected values are derived here from the inputs alone (which samples are active,
which margins fall in which bucket, how many payload bytes travel), never from
the server's own arithmetic.
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import torch
from helpers.faults import BLOCKER, FaultHook, HeldWorker, wait_until
from helpers.servers import ServerThread, server_config
from prometheus_client import REGISTRY, CollectorRegistry

from hingeloss import (
    NO_RETRY,
    AsyncLossClient,
    DeadlineExceededError,
    InvalidArgumentError,
    LossClient,
    StreamAbortedError,
    __version__,
)
from hingeloss._errors import from_rpc_error
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import MARGIN_SAMPLE_ROWS, WorkerConfig
from hingeloss_server.metrics import NoMetrics
from hingeloss_server.prometheus import (
    MARGIN_BUCKETS,
    ROW_BUCKETS,
)

LOSS_SERVICE = "hingeloss.v1.LossService"
HEALTH_SERVICE = "grpc.health.v1.Health"
MARGIN = 1.0  # the default margin of every loss used here


# ---------------------------------------------------------------- expectations


@dataclass
class LossTally:
    """What the OK requests of one loss must have added to the metrics."""

    requests: int = 0
    samples: int = 0
    active: int = 0
    fraction_sum: float = 0.0
    margins: list[np.ndarray] = field(default_factory=list)

    def add(self, margins: np.ndarray) -> None:
        # Default kink "zero": a sample is active when its hinge term is strictly positive.
        active = int(np.count_nonzero(margins < MARGIN))
        self.requests += 1
        self.samples += margins.size
        self.active += active
        self.fraction_sum += active / margins.size
        self.margins.append(margins.astype(np.float64))

    @property
    def all_margins(self) -> np.ndarray:
        return np.concatenate(self.margins)


@dataclass
class Expected:
    """Everything the workload implies, computed from the inputs."""

    losses: dict[str, LossTally] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)
    received_bytes: int = 0
    sent_bytes: int = 0
    unary_ok: int = 0
    unary_invalid: int = 0
    health_checks: int = 0

    def tally(self, loss: str) -> LossTally:
        return self.losses.setdefault(loss, LossTally())


def binary_margins(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    margins: np.ndarray = scores * labels
    return margins


def class_margins(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """f_y - max_{j != y} f_j, in the scores' dtype (the server computes float32 in float32)."""
    rows = np.arange(scores.shape[0])
    true = scores[rows, targets]
    others = scores.copy()
    others[rows, targets] = -np.inf
    margins: np.ndarray = true - others.max(axis=1)
    return margins


def quarters(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Scores on a grid of 0.25, so that every margin is exact in float32 and float64."""
    return (rng.integers(-12, 13, size=shape) / 4).astype(dtype)


def signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(np.array([-1, 1], dtype=np.int64), size=n)


# ---------------------------------------------------------------- the workload


def run_workload(target: str) -> Expected:
    """Sends a known mix of requests over a real channel; returns what they imply."""
    rng = np.random.default_rng(20240611)
    expected = Expected()
    binary = expected.tally("binary_hinge")
    multiclass = expected.tally("multiclass_hinge")
    with LossClient(target) as client:
        # Binary hinge, float64, dense gradients. Margins sit on bucket bounds on
        # purpose (-1, 0.5, 1, 2: `le` is inclusive) and on the hinge's kink (1).
        scores = np.array([2.0, 0.5, -1.0, 3.0, 1.0, 0.0])
        labels = np.array([1, 1, 1, -1, 1, -1], dtype=np.int64)
        batches = [(scores, labels)]
        batches.append((quarters(rng, (9,), "float64"), signs(rng, 9)))
        # Every margin holds: a request with no active sample.
        batches.append((np.array([5.0, -5.0, 2.0]), np.array([1, -1, 1], dtype=np.int64)))
        for s, y in batches:
            result = client.binary_hinge(s, y)
            binary.add(binary_margins(s, y))
            assert result.samples == s.size
            expected.received_bytes += s.nbytes + y.nbytes
            expected.sent_bytes += s.nbytes
            expected.unary_ok += 1

        # Row-sparse gradient plus per-sample losses: indices (int64) and values of
        # the active rows, and one loss per sample.
        s, y = quarters(rng, (11,), "float64"), signs(rng, 11)
        client.binary_hinge(s, y, gradient_format="row_sparse", return_per_sample=True)
        binary.add(binary_margins(s, y))
        active_rows = int(np.count_nonzero(binary_margins(s, y) < MARGIN))
        expected.received_bytes += s.nbytes + y.nbytes
        expected.sent_bytes += active_rows * (8 + 8) + s.nbytes
        expected.unary_ok += 1

        # Multiclass hinge, float32 (the gradient comes back in float32).
        for _ in range(2):
            s = quarters(rng, (6, 4), "float32")
            t = rng.integers(0, 4, size=6).astype(np.int64)
            client.multiclass_hinge(s, t)
            multiclass.add(class_margins(s, t))
            expected.received_bytes += s.nbytes + t.nbytes
            expected.sent_bytes += s.nbytes
            expected.unary_ok += 1

        # Factored: the packed mask (ceil(C / 8) bytes a row) and one float32 value a row.
        s = quarters(rng, (6, 12), "float32")
        t = rng.integers(0, 12, size=6).astype(np.int64)
        client.multiclass_hinge(s, t, gradient_format="factored")
        multiclass.add(class_margins(s, t))
        expected.received_bytes += s.nbytes + t.nbytes
        expected.sent_bytes += 6 * 2 + 6 * 4
        expected.unary_ok += 1

        # Three requests pipelined on one ComputeStream call.
        stream_inputs = [(quarters(rng, (4,), "float64"), signs(rng, 4)) for _ in range(3)]
        with client.stream(max_in_flight=8) as stream:
            futures = [stream.binary_hinge(s, y) for s, y in stream_inputs]
            for future in futures:
                future.result(timeout=30)
        for s, y in stream_inputs:
            binary.add(binary_margins(s, y))
            expected.received_bytes += s.nbytes + y.nbytes
            expected.sent_bytes += s.nbytes

        # Invalid requests. Structure (rows disagree): refused while decoding, before
        # any byte is counted as received.
        with pytest.raises(InvalidArgumentError):
            client.binary_hinge(np.zeros(2), np.ones(3, dtype=np.int64))
        # Values (NaN score, class out of range): refused on the worker, after decoding.
        nan_scores, nan_labels = np.array([np.nan, 1.0]), np.ones(2, dtype=np.int64)
        with pytest.raises(InvalidArgumentError):
            client.binary_hinge(nan_scores, nan_labels)
        expected.received_bytes += nan_scores.nbytes + nan_labels.nbytes
        bad_scores = np.zeros((3, 4), dtype=np.float32)
        bad_targets = np.array([0, 7, 1], dtype=np.int64)
        with pytest.raises(InvalidArgumentError):
            client.multiclass_hinge(bad_scores, bad_targets)
        expected.received_bytes += bad_scores.nbytes + bad_targets.nbytes
        expected.invalid = {"binary_hinge": 2, "multiclass_hinge": 1}
        expected.unary_invalid = 3

        assert client.server_info().version == __version__
        for _ in range(2):
            assert client.health() == "SERVING"
        expected.health_checks = 2
    return expected


@dataclass
class Served:
    server: ServerThread
    registry: CollectorRegistry
    expected: Expected

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; fails (rather than returning None) when it is absent."""
        value = self.registry.get_sample_value(name, labels)
        assert value is not None, f"no sample {name}{labels}"
        return value


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """One server with an injected registry, after the workload (metrics endpoint off)."""
    registry = CollectorRegistry()
    server = ServerThread(server_config(metrics_port=0), registry=registry).start()
    try:
        expected = run_workload(server.target)
        yield Served(server, registry, expected)
    finally:
        server.stop()


# ---------------------------------------------------------------- per request


def test_requests_counted_by_loss_and_code(served: Served) -> None:
    expected = served.expected
    for loss, tally in expected.losses.items():
        assert served.value("hingeloss_requests_total", loss=loss, code="OK") == tally.requests
        assert (
            served.value("hingeloss_requests_total", loss=loss, code="INVALID_ARGUMENT")
            == expected.invalid[loss]
        )
        # Only answered requests are timed; failed ones are counted, not timed.
        assert served.value("hingeloss_request_duration_seconds_count", loss=loss) == tally.requests
        assert served.value("hingeloss_request_duration_seconds_sum", loss=loss) > 0
        assert served.value("hingeloss_queue_wait_seconds_count", loss=loss) == tally.requests


def test_samples_active_and_inactive_exact(served: Served) -> None:
    for loss, tally in served.expected.losses.items():
        assert served.value("hingeloss_samples_total", loss=loss, state="active") == tally.active
        assert (
            served.value("hingeloss_samples_total", loss=loss, state="inactive")
            == tally.samples - tally.active
        )


def test_active_fraction_histogram(served: Served) -> None:
    for loss, tally in served.expected.losses.items():
        assert served.value("hingeloss_active_fraction_count", loss=loss) == tally.requests
        assert served.value("hingeloss_active_fraction_sum", loss=loss) == pytest.approx(
            tally.fraction_sum, abs=1e-12
        )
    # The request whose margins all hold lands in the lowest bucket (le="0.0").
    assert served.value("hingeloss_active_fraction_bucket", loss="binary_hinge", le="0.0") >= 1


def test_margin_histogram_counts_and_buckets(served: Served) -> None:
    for loss, tally in served.expected.losses.items():
        margins = tally.all_margins
        # The workload's batches are far below the sampling limit, so every row counts.
        assert max(m.size for m in tally.margins) <= MARGIN_SAMPLE_ROWS
        assert served.value("hingeloss_margin_count", loss=loss) == margins.size
        for bound in MARGIN_BUCKETS:
            assert served.value(
                "hingeloss_margin_bucket", loss=loss, le=str(bound)
            ) == np.count_nonzero(margins <= bound), f"{loss} le={bound}"
        assert served.value("hingeloss_margin_bucket", loss=loss, le="+Inf") == margins.size
        # Signed observations: like client_python's Histogram, no _sum is exposed.
        assert served.registry.get_sample_value("hingeloss_margin_sum", {"loss": loss}) is None


def test_payload_bytes(served: Served) -> None:
    assert served.value("hingeloss_received_bytes_total") == served.expected.received_bytes
    assert served.value("hingeloss_sent_bytes_total") == served.expected.sent_bytes


def test_rejections_by_reason(served: Served) -> None:
    invalid = sum(served.expected.invalid.values())
    assert served.value("hingeloss_requests_rejected_total", reason="invalid_argument") == invalid
    for reason in ("queue_full", "draining", "deadline_exceeded", "cancelled"):
        assert (
            served.registry.get_sample_value(
                "hingeloss_requests_rejected_total", {"reason": reason}
            )
            is None
        )


# ---------------------------------------------------------------- per batch


def test_batch_metrics(served: Served) -> None:
    tallies = served.expected.losses.values()
    computed = sum(t.requests for t in tallies)
    rows = sum(t.samples for t in tallies)
    batches = served.value("hingeloss_batch_requests_count")
    # Unary calls are sequential (one batch each); stream items may share a batch.
    assert computed - 2 <= batches <= computed
    assert served.value("hingeloss_batch_rows_count") == batches
    assert served.value("hingeloss_batch_requests_sum") == computed
    assert served.value("hingeloss_batch_rows_sum") == rows
    smallest = min(ROW_BUCKETS)
    assert served.value("hingeloss_batch_rows_bucket", le=str(smallest)) == 0
    assert served.value("hingeloss_batch_requests_bucket", le="1.0") >= computed - 3


def test_compute_time_and_worker_busy(served: Served) -> None:
    batches = served.value("hingeloss_batch_requests_count")
    assert served.value("hingeloss_compute_seconds_count", device="cpu") == batches
    compute = served.value("hingeloss_compute_seconds_sum", device="cpu")
    busy = served.value("hingeloss_worker_busy_seconds_total", device="cpu")
    assert compute > 0
    assert busy == pytest.approx(compute)
    assert served.value("hingeloss_workers", device="cpu") == 1


def test_live_gauges_idle_after_the_workload(served: Served) -> None:
    assert served.value("hingeloss_queue_depth_requests") == 0
    assert served.value("hingeloss_queue_depth_rows") == 0
    assert served.value("hingeloss_inflight_requests") == 0


# ---------------------------------------------------------------- per RPC and build


def test_grpc_handled_for_every_method(served: Served) -> None:
    expected = served.expected

    def handled(service: str, method: str, code: str) -> float:
        return served.value(
            "hingeloss_grpc_server_handled_total",
            grpc_service=service,
            grpc_method=method,
            grpc_code=code,
        )

    def timed(service: str, method: str) -> float:
        return served.value(
            "hingeloss_grpc_server_handling_seconds_count",
            grpc_service=service,
            grpc_method=method,
        )

    assert handled(LOSS_SERVICE, "Compute", "OK") == expected.unary_ok
    assert handled(LOSS_SERVICE, "Compute", "INVALID_ARGUMENT") == expected.unary_invalid
    assert timed(LOSS_SERVICE, "Compute") == expected.unary_ok + expected.unary_invalid
    assert handled(LOSS_SERVICE, "ComputeStream", "OK") == 1
    assert timed(LOSS_SERVICE, "ComputeStream") == 1
    assert handled(LOSS_SERVICE, "GetServerInfo", "OK") == 1
    assert handled(HEALTH_SERVICE, "Check", "OK") == expected.health_checks
    assert timed(HEALTH_SERVICE, "Check") == expected.health_checks


def test_build_info(served: Served) -> None:
    assert (
        served.value(
            "hingeloss_build_info",
            version=__version__,
            torch=torch.__version__,
            grpcio=grpc.__version__,
            python=platform.python_version(),
            devices="cpu",
        )
        == 1
    )


# ---------------------------------------------------------------- off switch


def test_no_metrics_records_nothing(make_server: Callable[..., ServerThread]) -> None:
    before = {m.name for m in REGISTRY.collect()}
    # Margin sampling is asked for, but with metrics off nothing would record the margins.
    workers = WorkerConfig(devices=("cpu",), margin_sample_rows=64)
    server = make_server(server_config(metrics_port=0, workers=workers))
    metrics = server.server.metrics
    assert isinstance(metrics, NoMetrics)
    assert server.server.metrics_port == 0
    with LossClient(server.target) as client:
        client.binary_hinge(np.array([0.5, 2.0]), np.array([1, 1], dtype=np.int64))
        with pytest.raises(InvalidArgumentError):
            client.binary_hinge(np.zeros(2), np.ones(3, dtype=np.int64))
        client.health()
    # The null recorder built nothing and kept nothing: no collector, registry or series.
    assert vars(metrics) == {}
    # The workers skip the margins, which only the histogram would use.
    assert [worker.margin_rows for worker in server.server.pool.workers] == [0]
    # Nothing leaked into the process-wide default registry either.
    assert {m.name for m in REGISTRY.collect()} == before


@pytest.mark.parametrize("rows", [0, 3])
def test_margin_sampling_follows_its_setting(
    make_server: Callable[..., ServerThread], rows: int
) -> None:
    registry = CollectorRegistry()
    workers = WorkerConfig(devices=("cpu",), margin_sample_rows=rows)
    server = make_server(server_config(workers=workers), registry=registry)
    with LossClient(server.target) as client:
        client.binary_hinge(np.arange(8.0), np.ones(8, dtype=np.int64))  # one batch of 8 rows
    ok = registry.get_sample_value(
        "hingeloss_requests_total", {"loss": "binary_hinge", "code": "OK"}
    )
    assert ok == 1
    sampled = registry.get_sample_value("hingeloss_margin_count", {"loss": "binary_hinge"})
    assert (sampled or 0) == rows


# ---------------------------------------------------------------- calls that end unanswered


async def test_an_expired_deadline_and_a_cancel_are_told_apart(
    make_server: Callable[..., ServerThread],
) -> None:
    """gRPC reports both to the handler as a cancellation; the labels must not."""
    hook, registry = FaultHook(), CollectorRegistry()
    server = make_server(fault_hook=hook, registry=registry)

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    def handled(code: str) -> float:
        return value(
            "hingeloss_grpc_server_handled_total",
            grpc_service=LOSS_SERVICE,
            grpc_method="Compute",
            grpc_code=code,
        )

    def blocker() -> None:
        with LossClient(server.target) as client:
            client.gan_generator(np.ones(2), request_id=BLOCKER)

    with HeldWorker(hook, blocker):
        async with AsyncLossClient(server.target, retry=NO_RETRY) as client:
            with pytest.raises(DeadlineExceededError):
                await client.gan_generator(np.ones(2), timeout=0.3)
            queue = server.server.batcher.stats
            await asyncio.to_thread(
                wait_until,
                lambda: handled("DEADLINE_EXCEEDED") == 1 and queue.requests == 0,
                what="the expiry recorded and its job dropped",
            )
            waiting = asyncio.ensure_future(client.gan_generator(np.ones(2), timeout=60))
            await asyncio.to_thread(wait_until, lambda: queue.requests == 1, what="queued")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await asyncio.to_thread(
                wait_until, lambda: handled("CANCELLED") == 1, what="the cancel recorded"
            )
    requests = "hingeloss_requests_total"
    assert value(requests, loss="gan_generator", code="DEADLINE_EXCEEDED") == 1
    assert value(requests, loss="gan_generator", code="CANCELLED") == 1
    assert handled("DEADLINE_EXCEEDED") == 1
    assert handled("CANCELLED") == 1
    rejected = "hingeloss_requests_rejected_total"
    assert value(rejected, reason="deadline_exceeded") == 1
    assert value(rejected, reason="cancelled") == 1


def test_requests_that_do_not_parse_or_never_come_are_counted_as_refused(
    make_server: Callable[..., ServerThread],
) -> None:
    """Counted as invalid requests of no loss, as one with no loss set is."""
    registry = CollectorRegistry()
    server = make_server(registry=registry)
    garbage = b"\xff\xff\xff\x07"
    good = pb.ComputeRequest(
        gan_generator=pb.GanGenerator(
            fake_scores=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[1], data=bytes(8))
        )
    ).SerializeToString()
    with grpc.insecure_channel(server.target) as channel:
        compute = channel.unary_unary(f"/{LOSS_SERVICE}/Compute")
        with pytest.raises(grpc.RpcError) as unparsable:
            compute(garbage, timeout=30)
        no_message = channel.stream_unary(f"/{LOSS_SERVICE}/Compute")
        with pytest.raises(grpc.RpcError) as empty:
            no_message(iter(()), timeout=30)
        stream = channel.stream_stream(f"/{LOSS_SERVICE}/ComputeStream")
        answers = stream(iter([good, good, garbage, good]), timeout=30)
        answered: list[bytes] = []
        with pytest.raises(grpc.RpcError) as ended:
            answered.extend(answers)
    for error in (unparsable.value, empty.value, ended.value):
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert len(answered) == 2
    assert from_rpc_error(ended.value).metadata["streamIndex"] == "2"
    refused = {"loss": "none", "code": "INVALID_ARGUMENT"}
    assert registry.get_sample_value("hingeloss_requests_total", refused) == 3
    rejected = {"reason": "invalid_argument"}
    assert registry.get_sample_value("hingeloss_requests_rejected_total", rejected) == 3
    assert registry.get_sample_value("hingeloss_inflight_requests") == 0


def test_a_stream_ended_by_a_bad_request_counts_only_what_it_sent(
    make_server: Callable[..., ServerThread],
) -> None:
    """Requests after the failing one are computed but never answered: ABORTED, not OK.

    All of them wait behind a held worker and are computed in one batch, so every
    later request has its answer ready when the stream ends at the bad one.
    """
    hook, registry = FaultHook(), CollectorRegistry()
    server = make_server(fault_hook=hook, registry=registry)
    scores, labels = np.array([0.5, 2.0, -1.0, 0.0]), np.ones(4, dtype=np.int64)

    def blocker() -> None:
        with LossClient(server.target) as client:
            client.gan_generator(np.ones(2), request_id=BLOCKER)

    with (
        HeldWorker(hook, blocker) as held,
        LossClient(server.target) as client,
        client.stream(max_in_flight=8) as stream,
    ):
        first = stream.binary_hinge(scores, labels)
        bad = stream.binary_hinge(scores, np.full(4, 0.5))
        after = [stream.binary_hinge(scores, labels) for _ in range(4)]
        queue = server.server.batcher.stats
        wait_until(lambda: queue.requests == 6, what="the stream's six requests queued")
        held.release()
        assert first.result(timeout=30).samples == 4
        assert isinstance(bad.exception(timeout=30), InvalidArgumentError)
        for future in after:
            assert isinstance(future.exception(timeout=30), StreamAbortedError)

    def count(code: str) -> float:
        labels = {"loss": "binary_hinge", "code": code}
        return registry.get_sample_value("hingeloss_requests_total", labels) or 0.0

    # Counted before the stream's status went out: final once the caller has heard it.
    assert (count("OK"), count("INVALID_ARGUMENT"), count("ABORTED")) == (1, 1, len(after))
    assert registry.get_sample_value("hingeloss_inflight_requests") == 0
    blocker_answer = np.ones(2).nbytes
    assert registry.get_sample_value("hingeloss_sent_bytes_total") == scores.nbytes + blocker_answer
    active = {"loss": "binary_hinge", "state": "active"}
    expected_active = np.count_nonzero(1.0 - labels * scores > 0)
    assert registry.get_sample_value("hingeloss_samples_total", active) == expected_active
