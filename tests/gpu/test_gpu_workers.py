"""The worker pool on a CUDA device: workers per device, streams, pinned memory, out of memory.

Without CUDA every test here skips. HINGELOSS_GPU_TEST_DEVICE=cpu runs the tests that
make sense on a CPU there (a dry run of their logic); those about CUDA streams, pinned
memory and device memory skip.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from helpers.cases import positional, random_inputs
from helpers.faults import BLOCKER, FaultHook, HeldWorker, wait_until
from helpers.references import reference
from helpers.servers import ServerThread, server_config
from prometheus_client import CollectorRegistry

from hingeloss import NO_RETRY, LossClient, LossResult, OverloadedError
from hingeloss._requests import build_request
from hingeloss_server.config import BatchingConfig, LimitsConfig, ServerConfig, WorkerConfig
from hingeloss_server.engine.device_worker import Worker
from hingeloss_server.engine.jobs import LossJob
from hingeloss_server.engine.staging import DeviceStaging
from hingeloss_server.transport.request_codec import decode_request

DEVICE = str(torch.device(os.environ.get("HINGELOSS_GPU_TEST_DEVICE", "cuda:0")))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA"
    ),
]
cuda_only = pytest.mark.skipif(
    not DEVICE.startswith("cuda"), reason="CUDA streams, pinned memory and device memory"
)

MIB = 1 << 20
Request = tuple[str, dict[str, np.ndarray], dict[str, Any]]


def device_config(batching: BatchingConfig | None = None, **workers: Any) -> ServerConfig:
    return server_config(
        workers=WorkerConfig(devices=workers.pop("devices", (DEVICE,)), **workers),
        batching=batching or BatchingConfig(),
    )


# Room for the out-of-memory tests' requests to form one batch (the default is 32 MiB).
LARGE_BATCHES = BatchingConfig(max_batch_bytes=512 * MIB)


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh randomness every run; HINGELOSS_TEST_SEED replays a failure."""
    seed = int(os.environ.get("HINGELOSS_TEST_SEED", secrets.randbits(32)))
    print(f"HINGELOSS_TEST_SEED={seed}")
    return np.random.default_rng(seed)


# -------------------------------- answers


def weston_watkins_mean(scores: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Vectorised float64 Weston-Watkins (defaults: margin 1, mean, kink zero), for big inputs."""
    scores = scores.astype(np.float64)
    rows = np.arange(len(targets))
    z = 1.0 - scores[rows, targets][:, None] + scores
    z[rows, targets] = 0.0
    loss = float(np.maximum(z, 0.0).sum(axis=1).mean())
    grad = (z > 0).astype(np.float64)
    grad[rows, targets] = -grad.sum(axis=1)
    return loss, grad / len(targets)


def check_reference(result: LossResult, request: Request, rtol: float) -> None:
    loss, inputs, options = request
    expected = reference(loss, inputs, options)
    np.testing.assert_allclose(result.loss, expected.loss, rtol=rtol, atol=1e-12)
    for got, want in zip(result.grads, expected.grads, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=1e-12)
    assert result.active_samples == sum(int(a.sum()) for a in expected.active)
    assert result.timing.device == DEVICE


def check_big(result: LossResult, inputs: dict[str, np.ndarray]) -> None:
    loss, grad = weston_watkins_mean(inputs["scores"], inputs["targets"])
    assert result.loss == pytest.approx(loss, rel=1e-6)
    # Integer scores: every hinge argument is exact in float32, so is the gradient.
    np.testing.assert_allclose(result.grad, grad, rtol=1e-6, atol=0)
    assert result.timing.device == DEVICE


def integer_multiclass(rng: np.random.Generator, rows: int, classes: int) -> dict[str, np.ndarray]:
    return {
        "scores": rng.integers(-2, 3, size=(rows, classes)).astype(np.float32),
        "targets": rng.integers(0, classes, size=rows),
    }


def mixed_requests(rng: np.random.Generator, count: int) -> list[Request]:
    """Small requests of several losses, dtypes and options (several batch keys)."""
    requests: list[Request] = []
    for index in range(count):
        loss = ("multiclass_hinge", "binary_hinge", "crammer_singer")[index % 3]
        inputs = random_inputs(loss, rng, int(rng.integers(1, 40)), classes=7)
        options: dict[str, Any] = {"reduction": ("mean", "sum")[index % 2]}
        if index % 4 == 0:
            options["power"] = 2
        requests.append((loss, inputs, options))
    return requests


# -------------------------------- recording which worker, stream and time took each batch


@dataclass(frozen=True)
class BatchRecord:
    worker: str
    stream: int | None
    started: float
    ended: float
    request_ids: tuple[str, ...]


class Recorder:
    """A fault_hook that records the worker thread and CUDA stream of each batch.

    Batches of requests whose id starts with `prefix` (not the warm-up) are recorded
    and held `delay_s` on the worker, so that concurrent batches overlap.
    """

    def __init__(self, prefix: str, delay_s: float) -> None:
        self.prefix = prefix
        self.delay_s = delay_s
        self.batches: list[BatchRecord] = []
        self._lock = threading.Lock()

    def __call__(self, jobs: Any) -> None:
        ids = tuple(job.request_id for job in jobs)
        if not any(i.startswith(self.prefix) for i in ids):
            return
        started = time.monotonic()
        stream = None
        if DEVICE.startswith("cuda"):
            stream = int(torch.cuda.current_stream().cuda_stream)
        time.sleep(self.delay_s)
        # Executor threads are named "<worker name>_<n>".
        worker = threading.current_thread().name.rsplit("_", 1)[0]
        with self._lock:
            self.batches.append(BatchRecord(worker, stream, started, time.monotonic(), ids))

    def overlapping_workers(self) -> bool:
        """Whether two workers ever computed at the same time."""
        with self._lock:
            batches = list(self.batches)
        return any(
            a.worker != b.worker and a.started < b.ended and b.started < a.ended
            for a in batches
            for b in batches
        )


def call_concurrently(
    target: str, requests: list[Request], prefix: str, threads: int = 16
) -> list[LossResult]:
    with LossClient(target, retry=NO_RETRY) as client, ThreadPoolExecutor(threads) as pool:
        futures = [
            pool.submit(
                client.compute,
                loss,
                *positional(loss, inputs),
                request_id=f"{prefix}{index}",
                **options,
            )
            for index, (loss, inputs, options) in enumerate(requests)
        ]
        return [future.result(60) for future in futures]


# -------------------------------- workers per device


def test_one_worker_per_visible_device(
    make_server: Callable[..., ServerThread], rng: np.random.Generator
) -> None:
    """`--devices auto`: every visible GPU gets a worker, and every one of them computes."""
    if torch.cuda.is_available():
        expected = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        expected = ["cpu"]  # the dry run on a machine without CUDA
    recorder = Recorder("auto-", delay_s=0.02)
    registry = CollectorRegistry()
    server = make_server(device_config(devices=("auto",)), registry=registry, fault_hook=recorder)
    pool = server.server.pool
    assert pool.device_names == expected
    assert [str(w.device) for w in pool.workers] == expected

    requests = mixed_requests(rng, 24 * len(expected))
    results = call_concurrently(server.target, requests, "auto-")
    for request, result in zip(requests, results, strict=True):
        expected_result = reference(request[0], request[1], request[2])
        np.testing.assert_allclose(result.loss, expected_result.loss, rtol=1e-10, atol=1e-12)
        assert result.timing.device in expected
    assert {b.worker for b in recorder.batches} == {f"hingeloss-{d}-0" for d in expected}

    with LossClient(server.target) as client:
        info = client.server_info()
    assert list(info.devices) == expected
    assert info.workers == len(expected)
    for device in expected:
        assert registry.get_sample_value("hingeloss_workers", {"device": device}) == 1


def test_two_workers_per_device_serve_concurrent_callers(
    make_server: Callable[..., ServerThread], rng: np.random.Generator
) -> None:
    """`--workers-per-device 2`: both workers compute, at the same time, each on its own stream."""
    recorder = Recorder("two-", delay_s=0.02)
    registry = CollectorRegistry()
    server = make_server(
        device_config(workers_per_device=2), registry=registry, fault_hook=recorder
    )
    requests = mixed_requests(rng, 96)
    results = call_concurrently(server.target, requests, "two-", threads=24)
    for request, result in zip(requests, results, strict=True):
        check_reference(result, request, rtol=1e-10)

    workers = {b.worker for b in recorder.batches}
    assert workers == {f"hingeloss-{DEVICE}-0", f"hingeloss-{DEVICE}-1"}
    assert recorder.overlapping_workers(), "the two workers never computed at the same time"
    if DEVICE.startswith("cuda"):
        streams = {b.stream for b in recorder.batches}
        by_worker = {b.worker: b.stream for b in recorder.batches}
        assert len(streams) == 2, f"expected one stream per worker, saw {streams}"
        assert len(set(by_worker.values())) == 2
        default = int(torch.cuda.default_stream(torch.device(DEVICE)).cuda_stream)
        assert default not in streams, "a worker computed on the default stream"

    labels = {"device": DEVICE}
    assert registry.get_sample_value("hingeloss_workers", labels) == 2
    assert (registry.get_sample_value("hingeloss_worker_busy_seconds_total", labels) or 0) > 0
    answered = sum(
        registry.get_sample_value("hingeloss_requests_total", {"loss": loss, "code": "OK"}) or 0
        for loss in ("multiclass_hinge", "binary_hinge", "crammer_singer")
    )
    assert answered == len(requests)
    if DEVICE.startswith("cuda"):
        reserved = registry.get_sample_value("hingeloss_gpu_memory_reserved_bytes", labels)
        assert reserved is not None
        assert reserved > 0


# -------------------------------- pinned memory and asynchronous copies


@cuda_only
def test_staging_copies_from_pinned_memory_without_blocking_the_host() -> None:
    """The host-to-device copy is queued behind device work instead of waiting for it.

    A copy from pageable memory makes the host wait for the stream first; one from
    pinned memory with non_blocking=True returns at once. So with ~0.3 s of device
    sleep queued ahead of it, the stream must still be busy when the copy returns.
    """
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        pytest.skip("torch.cuda._sleep is not available in this torch")
    device = torch.device(DEVICE)
    staging = DeviceStaging(device, 32 * MIB)
    parts = [torch.randn(1 << 21), torch.randn(1 << 21)]  # 16 MiB together
    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    with torch.cuda.stream(stream):
        staging.begin()
        staging.upload(parts)  # warms the device cache: no allocation below
        stream.synchronize()  # type: ignore[no-untyped-call]
        staging.begin()
        sleep(1 << 29)
        moved = staging.upload(parts)
        still_busy = not stream.query()  # type: ignore[no-untyped-call]
    stream.synchronize()  # type: ignore[no-untyped-call]
    assert still_busy, "the host waited for the device: the copy was not asynchronous"
    assert moved.device == device
    assert torch.equal(moved.cpu(), torch.cat(parts))


@dataclass(frozen=True)
class Copy:
    nbytes: int
    pinned: bool
    non_blocking: bool


@cuda_only
def test_engine_moves_inputs_from_pinned_memory(
    monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    """Every large host-to-device copy of a batch starts from pinned memory, non-blocking."""
    copies: list[Copy] = []
    original = torch.Tensor.to

    def spy(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        moved = original(self, *args, **kwargs)
        if self.device.type == "cpu" and moved.device.type == "cuda":
            copies.append(Copy(self.nbytes, self.is_pinned(), bool(kwargs.get("non_blocking"))))
        return moved

    rows, classes = 4096, 1000
    requests = [integer_multiclass(rng, rows, classes) for _ in range(2)]
    jobs: list[LossJob] = [
        decode_request(build_request("multiclass_hinge", inputs, {})[0], LimitsConfig())
        for inputs in requests
    ]
    worker = Worker("hingeloss-gpu-test", torch.device(DEVICE), None)
    try:
        monkeypatch.setattr(torch.Tensor, "to", spy)
        outcomes, _ = worker.run(jobs)
        monkeypatch.undo()
    finally:
        worker.close()
    assert all(outcome.error is None for outcome in outcomes)
    pinned = sum(c.nbytes for c in copies if c.pinned and c.non_blocking)
    pageable = [c for c in copies if not (c.pinned and c.non_blocking)]
    scores_bytes = 2 * rows * classes * 4
    assert pinned >= scores_bytes, f"only {pinned} of {scores_bytes} score bytes went pinned"
    assert sum(c.nbytes for c in pageable) <= pinned // 50, f"pageable copies: {pageable}"


# -------------------------------- out of memory: split, retry, only the culprit fails


def behind_blocker(
    server: ServerThread, hook: FaultHook, requests: dict[str, Request]
) -> dict[str, Future[LossResult]]:
    """Queues `requests` while the worker is held, so that they go as one batch."""
    blocker_inputs = random_inputs("binary_hinge", np.random.default_rng(0), 8)
    futures: dict[str, Future[LossResult]] = {}
    with (
        LossClient(server.target, retry=NO_RETRY, timeout=120) as client,
        ThreadPoolExecutor(len(requests)) as pool,
    ):
        blocker = positional("binary_hinge", blocker_inputs)
        with HeldWorker(hook, partial(client.binary_hinge, *blocker, request_id=BLOCKER)) as held:
            for request_id, (loss, inputs, options) in requests.items():
                call = partial(client.compute, loss, request_id=request_id, **options)
                futures[request_id] = pool.submit(call, *positional(loss, inputs))
            wait_until(
                lambda: server.server.batcher.stats.requests == len(requests), 60, what="queued"
            )
        futures[BLOCKER] = held.blocker
        for future in futures.values():
            future.exception(120)
    return futures


def test_injected_out_of_memory_fails_only_the_culprit(
    make_server: Callable[..., ServerThread], rng: np.random.Generator
) -> None:
    hook = FaultHook(
        fail={
            "culprit": lambda: torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB"
            )
        }
    )
    server = make_server(device_config(), fault_hook=hook)
    requests: dict[str, Request] = {
        request_id: ("multiclass_hinge", random_inputs("multiclass_hinge", rng, 16, 7), {})
        for request_id in ("r0", "r1", "culprit", "r3", "r4")
    }
    futures = behind_blocker(server, hook, requests)

    assert sorted(hook.batches_with("culprit")[0]) == sorted(requests)
    assert all(len(batch) == 1 for batch in hook.batches_with("r0")[1:])
    error = futures["culprit"].exception()
    assert isinstance(error, OverloadedError)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "DEVICE_OUT_OF_MEMORY"
    for request_id, request in requests.items():
        if request_id != "culprit":
            check_reference(futures[request_id].result(), request, rtol=1e-10)


@contextmanager
def device_memory_limit(extra_bytes: int) -> Iterator[None]:
    """Caps this process's CUDA memory at what it holds now plus `extra_bytes`."""
    device = torch.device(DEVICE)
    index = device.index or 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(index).total_memory
    limit = torch.cuda.memory_reserved(index) + extra_bytes
    torch.cuda.set_per_process_memory_fraction(limit / total, index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()


@cuda_only
def test_real_out_of_memory_batch_succeeds_when_split(
    make_server: Callable[..., ServerThread], rng: np.random.Generator
) -> None:
    """Four 64 MiB requests fit one at a time, not together: all four succeed.

    A request needs about 2.5x its scores on the device (scores, hinge terms, a
    finiteness mask); the batch of four runs out while allocating its hinge terms
    after its 256 MiB of scores. The retries fit only once the failed batch's
    tensors are freed (the exception's traceback must not keep them).
    """
    size = 64 * MIB
    rows, classes = size // (4 * 1024), 1024
    hook = FaultHook()
    server = make_server(device_config(LARGE_BATCHES), fault_hook=hook)
    requests: dict[str, Request] = {
        f"part{i}": ("multiclass_hinge", integer_multiclass(rng, rows, classes), {})
        for i in range(4)
    }
    with device_memory_limit(int(5.25 * size)):
        futures = behind_blocker(server, hook, requests)

    assert sorted(hook.batches_with("part0")[0]) == sorted(requests)
    assert len(hook.batches_with("part0")) == 2, "the batch of four did not run out of memory"
    for request_id, (_, inputs, _) in requests.items():
        check_big(futures[request_id].result(), inputs)


@cuda_only
def test_real_out_of_memory_fails_only_the_request_too_large(
    make_server: Callable[..., ServerThread], rng: np.random.Generator
) -> None:
    """A 256 MiB request beside three small ones, under a 320 MiB cap: only it fails.

    Once the cap is lifted, the same request succeeds on the same worker.
    """
    classes = 4096
    hook = FaultHook()
    server = make_server(device_config(LARGE_BATCHES), fault_hook=hook)
    requests: dict[str, Request] = {
        "big": ("multiclass_hinge", integer_multiclass(rng, 16384, classes), {}),
        **{
            f"small{i}": ("multiclass_hinge", integer_multiclass(rng, 64, classes), {})
            for i in range(3)
        },
    }
    with device_memory_limit(320 * MIB):
        futures = behind_blocker(server, hook, requests)

    assert sorted(hook.batches_with("big")[0]) == sorted(requests)
    error = futures["big"].exception()
    assert isinstance(error, OverloadedError), error
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "DEVICE_OUT_OF_MEMORY"
    assert "Tried to allocate" not in str(error)
    for i in range(3):
        check_big(futures[f"small{i}"].result(), requests[f"small{i}"][1])

    big = requests["big"][1]
    with LossClient(server.target, retry=NO_RETRY, timeout=120) as client:
        check_big(client.multiclass_hinge(big["scores"], big["targets"]), big)


@cuda_only
def test_bare_cuda_device_is_named_with_its_index(
    make_server: Callable[..., ServerThread], rng: np.random.Generator
) -> None:
    """`--devices cuda` serves on the current device and reports it as cuda:N everywhere."""
    registry = CollectorRegistry()
    server = make_server(device_config(devices=("cuda",)), registry=registry)
    current = f"cuda:{torch.cuda.current_device()}"
    assert server.server.pool.device_names == [current]
    request = mixed_requests(rng, 1)[0]
    with LossClient(server.target, retry=NO_RETRY) as client:
        result = client.compute(request[0], *positional(request[0], request[1]), **request[2])
        assert list(client.server_info().devices) == [current]
    assert result.timing.device == current
    assert registry.get_sample_value("hingeloss_workers", {"device": current}) == 1
