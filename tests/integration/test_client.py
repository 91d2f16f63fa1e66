"""The SDK over real servers: types in and out, asyncio, streams, errors, retries, balancing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures as cf
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from helpers.cases import random_inputs
from helpers.faults import BLOCKER, PATIENCE_S, FaultHook, HeldWorker, wait_until
from helpers.references import reference
from helpers.servers import ServerThread, server_config
from helpers.system import requires_cuda
from prometheus_client import CollectorRegistry

from hingeloss import (
    NO_RETRY,
    AsyncLossClient,
    CancelledError,
    DeadlineExceededError,
    HingelossError,
    InvalidArgumentError,
    LossClient,
    LossResult,
    OverloadedError,
    RetryPolicy,
)
from hingeloss._channel import RECONNECT_BACKOFF_MAX_MS
from hingeloss_server.config import BatchingConfig
from hingeloss_server.engine.jobs import LossJob

ROOT = Path(__file__).resolve().parents[2]


def test_numpy_in_numpy_out(shared_server: ServerThread) -> None:
    inputs = random_inputs("multiclass_hinge", np.random.default_rng(), 16, classes=4)
    scores32 = inputs["scores"].astype(np.float32)
    with LossClient(shared_server.target) as client:
        result = client.multiclass_hinge(scores32, inputs["targets"], return_per_sample=True)
    assert isinstance(result.grad, np.ndarray)
    assert result.grad.dtype == np.float32
    assert result.grad.shape == (16, 4)
    assert result.per_sample[0].dtype == np.float32
    assert not result.grad.flags.writeable  # a view of the response, never copied
    expected = reference("multiclass_hinge", {**inputs, "scores": scores32.astype(np.float64)})
    np.testing.assert_allclose(result.grad, expected.grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_torch_in_torch_out(shared_server: ServerThread, dtype: torch.dtype) -> None:
    scores = torch.randn(12, dtype=torch.float64).to(dtype)
    labels = torch.tensor([1, -1] * 6)
    with LossClient(shared_server.target) as client:
        result = client.binary_hinge(scores, labels, gradient_format="row_sparse")
    assert isinstance(result.grad, torch.Tensor)
    assert result.grad.dtype == dtype
    assert result.grad.device == scores.device
    expected = torch.clamp(1 - labels * scores.double(), min=0).mean()
    assert result.loss == pytest.approx(
        float(expected), rel=1e-2 if dtype != torch.float64 else 1e-12
    )
    result.grad.add_(1)  # torch results are the caller's own memory


@pytest.mark.gpu
@requires_cuda
def test_bfloat16_cuda_tensors(shared_server: ServerThread) -> None:
    logits = torch.randn(32, 10, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 10, (32,), device="cuda")
    with LossClient(shared_server.target) as client:
        result = client.multiclass_hinge(logits, targets)
    assert result.grad.device == logits.device
    assert result.grad.dtype == torch.bfloat16
    expected = reference(
        "multiclass_hinge",
        {"scores": logits.float().cpu().double().numpy(), "targets": targets.cpu().numpy()},
    )
    np.testing.assert_allclose(result.grad.float().cpu().numpy(), expected.grads[0], atol=1e-2)


def test_async_client_matches_sync(shared_server: ServerThread) -> None:
    rng = np.random.default_rng()
    inputs = random_inputs("crammer_singer", rng, 20, classes=6)

    async def run() -> Any:
        async with AsyncLossClient(shared_server.target) as client:
            assert await client.health() == "SERVING"
            info = await client.server_info()
            assert "crammer_singer" in info.losses
            return await client.crammer_singer(inputs["scores"], inputs["targets"], power=2)

    async_result = asyncio.run(run())
    with LossClient(shared_server.target) as client:
        sync_result = client.crammer_singer(inputs["scores"], inputs["targets"], power=2)
    assert async_result.loss == sync_result.loss
    np.testing.assert_array_equal(async_result.grad, sync_result.grad)


def _stream_cases(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng()
    return [random_inputs("binary_hinge", rng, int(rng.integers(1, 30))) for _ in range(count)]


def test_sync_stream_pipelines_in_order(shared_server: ServerThread) -> None:
    cases = _stream_cases(40)
    with LossClient(shared_server.target) as client:
        with client.stream(max_in_flight=8) as stream:
            futures = [
                stream.binary_hinge(c["scores"], c["labels"], request_id=f"r{i}")
                for i, c in enumerate(cases)
            ]
            results = [f.result(timeout=30) for f in futures]
        alone = [client.binary_hinge(c["scores"], c["labels"]) for c in cases]
    assert [r.request_id for r in results] == [f"r{i}" for i in range(40)]
    for streamed, single in zip(results, alone, strict=True):
        assert streamed.loss == single.loss
        np.testing.assert_array_equal(streamed.grad, single.grad)


def test_async_stream_pipelines_in_order(shared_server: ServerThread) -> None:
    cases = _stream_cases(40)

    async def run() -> list[Any]:
        async with (
            AsyncLossClient(shared_server.target) as client,
            client.stream(max_in_flight=4) as stream,
        ):
            pending = [
                stream.binary_hinge(c["scores"], c["labels"], request_id=f"a{i}")
                for i, c in enumerate(cases)
            ]
            return [await p for p in pending]

    results = asyncio.run(run())
    assert [r.request_id for r in results] == [f"a{i}" for i in range(40)]
    for result, case in zip(results, cases, strict=True):
        expected = reference("binary_hinge", case)
        np.testing.assert_allclose(result.loss, expected.loss, rtol=1e-12)


def test_stream_reports_a_bad_request(shared_server: ServerThread) -> None:
    cases = _stream_cases(3)
    cases[1]["labels"] = cases[1]["labels"] * 3
    with LossClient(shared_server.target) as client, client.stream() as stream:
        futures = [stream.binary_hinge(c["scores"], c["labels"]) for c in cases]
        assert futures[0].result(timeout=30).samples == len(cases[0]["scores"])
        with pytest.raises(InvalidArgumentError) as info:
            futures[1].result(timeout=30)
    assert info.value.field_violations[0].field == "binary_hinge.labels[0]"


def _hold_worker(server: ServerThread, hook: FaultHook) -> HeldWorker[LossResult]:
    """Holds the server's only worker on a blocker sent by a client of its own."""

    def blocker() -> LossResult:
        with LossClient(server.target) as client:
            return client.gan_generator(np.ones(2), request_id=BLOCKER)

    return HeldWorker(hook, blocker)


def test_deadline_exceeded(make_server: Any) -> None:
    hook = FaultHook()
    server = make_server(fault_hook=hook)
    with _hold_worker(server, hook), LossClient(server.target, timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as info:
            client.gan_generator(np.ones(3), request_id="late")
        assert time.monotonic() - started < 5
        assert isinstance(info.value.__cause__, grpc.RpcError)


@contextlib.contextmanager
def _full_queue(make_server: Any) -> Iterator[tuple[ServerThread, CollectorRegistry]]:
    """A server whose only worker is held and whose queue is full: it sheds every call."""
    hook = FaultHook()
    registry = CollectorRegistry()
    config = server_config(batching=BatchingConfig(max_queue_rows=3))
    server = make_server(config, fault_hook=hook, registry=registry)
    with _hold_worker(server, hook), LossClient(server.target) as filler:
        queued = threading.Thread(target=lambda: filler.gan_generator(np.ones(3)))
        queued.start()
        try:
            while server.server.batcher.stats.rows < 3:
                time.sleep(0.01)
            yield server, registry
        finally:
            hook.release()
            queued.join()


def test_overloaded_is_retried_honouring_retry_info(make_server: Any) -> None:
    with _full_queue(make_server) as (server, registry):
        policy = RetryPolicy(max_attempts=3, jitter=0.0)
        with LossClient(server.target, retry=policy) as client:
            started = time.monotonic()
            with pytest.raises(OverloadedError) as info:
                client.gan_generator(np.ones(2))
            elapsed = time.monotonic() - started
        assert info.value.retry_delay is not None
        assert info.value.retry_delay > 0
        # Three attempts, each refused at once; the waits between them follow RetryInfo.
        assert (
            registry.get_sample_value("hingeloss_requests_rejected_total", {"reason": "queue_full"})
            == 3
        )
        assert elapsed >= 2 * info.value.retry_delay * 0.9


def test_async_client_retries_on_the_shared_core(make_server: Any) -> None:
    """The asyncio client retries as the sync one does, reading each status from its call."""

    async def refused(target: str) -> OverloadedError:
        policy = RetryPolicy(max_attempts=3, jitter=0.0)
        async with AsyncLossClient(target, retry=policy) as client:
            with pytest.raises(OverloadedError) as info:
                await client.gan_generator(np.ones(2))
        return info.value

    with _full_queue(make_server) as (server, registry):
        error = asyncio.run(refused(server.target))
        assert error.reason == "QUEUE_FULL"
        assert error.retry_delay is not None
        assert error.retry_delay > 0
        assert isinstance(error.__cause__, grpc.RpcError)
        rejected = {"reason": "queue_full"}
        assert registry.get_sample_value("hingeloss_requests_rejected_total", rejected) == 3


def test_round_robin_failover_across_three_servers(make_server: Any) -> None:
    """One client over three servers; one stops mid-run; nothing is lost."""
    registries = [CollectorRegistry() for _ in range(3)]
    servers = [
        make_server(server_config(drain_seconds=5.0, shutdown_delay_seconds=0.3), registry=r)
        for r in registries
    ]
    target = "ipv4:" + ",".join(s.target for s in servers)
    rng = np.random.default_rng()
    results: list[float] = []
    expected: list[float] = []
    with LossClient(target, retry=RetryPolicy(max_attempts=5)) as client:
        for i in range(150):
            if i == 60:
                servers[1].begin_stop()
            inputs = random_inputs("binary_hinge", rng, 5)
            results.append(client.binary_hinge(inputs["scores"], inputs["labels"]).loss)
            expected.append(reference("binary_hinge", inputs).loss)
    np.testing.assert_allclose(results, expected, rtol=1e-12)
    served = [
        r.get_sample_value("hingeloss_requests_total", {"loss": "binary_hinge", "code": "OK"}) or 0
        for r in registries
    ]
    assert all(count > 0 for count in served), served
    assert sum(served) == 150
    assert served[1] < served[0]  # the stopped one took no traffic after the stop


def test_numpy_users_need_no_torch(shared_server: ServerThread) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "import numpy as np, hingeloss\n"
        f"c = hingeloss.LossClient({shared_server.target!r})\n"
        "r = c.binary_hinge(np.array([0.5, -2.0]), np.array([1, 1]))\n"
        "assert abs(r.loss - 1.75) < 1e-12, r.loss\n"
        "print(type(r.grad).__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "numpy"


def test_device_out_of_memory_is_not_retried(make_server: Any) -> None:
    attempts: list[str] = []

    def out_of_memory(jobs: Sequence[LossJob]) -> None:
        if any(job.request_id == "huge" for job in jobs):
            attempts.extend(job.request_id for job in jobs)
            raise torch.cuda.OutOfMemoryError("simulated: the request does not fit")

    server = make_server(fault_hook=out_of_memory)
    with LossClient(server.target) as client, pytest.raises(OverloadedError) as info:
        client.gan_generator(np.ones(4), request_id="huge")
    assert info.value.reason == "DEVICE_OUT_OF_MEMORY"
    assert attempts == ["huge"]


# -- retries: only real load shedding, throttled per client --------------------------------


def test_throttle_stops_retries_against_a_shedding_server(make_server: Any) -> None:
    with _full_queue(make_server) as (server, registry):

        def shed() -> float:
            labels = {"reason": "queue_full"}
            return registry.get_sample_value("hingeloss_requests_rejected_total", labels) or 0.0

        policy = RetryPolicy(max_attempts=5, jitter=0.0)
        with LossClient(server.target, retry=policy) as client:
            for _ in range(3):
                with pytest.raises(OverloadedError):
                    client.gan_generator(np.ones(2))
        # 5 attempts (tokens 10 -> 5), then the bucket allows first attempts only.
        assert shed() == 5 + 1 + 1
        unthrottled = RetryPolicy(max_attempts=5, jitter=0.0, throttle_max_tokens=None)
        with LossClient(server.target, retry=unthrottled) as client:
            for _ in range(2):
                with pytest.raises(OverloadedError):
                    client.gan_generator(np.ones(2))
        assert shed() == 7 + 5 + 5


def test_unary_errors_name_their_request(shared_server: ServerThread) -> None:
    with LossClient(shared_server.target) as client, pytest.raises(InvalidArgumentError) as info:
        client.binary_hinge(np.ones(2), np.array([3, 1]), request_id="bad-1")
    # Servers that name the failing request in ErrorInfo say which (older ones do not).
    assert info.value.metadata.get("requestId", "bad-1") == "bad-1"


def test_sdk_guide_asyncio_example_runs_as_written(shared_server: ServerThread) -> None:
    """docs/sdk.md's asyncio and streaming example, pasted into a file, gives right answers."""
    guide = (ROOT / "docs" / "sdk.md").read_text()
    section = guide.split("## asyncio and streaming", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "localhost:50051" in code
    names: dict[str, Any] = {}
    runnable = compile(code.replace("localhost:50051", shared_server.target), "sdk.md", "exec")
    exec(runnable, names)  # noqa: S102 - our own guide
    expected = reference("binary_hinge", {"scores": names["scores"], "labels": names["labels"]})
    assert names["result"].loss == pytest.approx(expected.loss, rel=1e-12)
    assert len(names["results"]) == len(names["batches"])
    for (scores, targets), answer in zip(names["batches"], names["results"], strict=True):
        local = reference("crammer_singer", {"scores": scores, "targets": targets})
        assert answer.loss == pytest.approx(local.loss, rel=1e-12)
        np.testing.assert_allclose(answer.grad, local.grads[0], rtol=1e-12, atol=1e-15)


def test_grad_says_why_a_result_has_not_exactly_one_gradient(shared_server: ServerThread) -> None:
    rng = np.random.default_rng()
    with LossClient(shared_server.target) as client:
        scores, targets = rng.normal(size=(4, 3)), rng.integers(0, 3, size=4)
        none = client.multiclass_hinge(scores, targets, gradient_format="none")
        pair = client.gan_discriminator(rng.normal(size=5), rng.normal(size=6))
    assert none.grads == ()
    with pytest.raises(AttributeError, match="gradient_format='none'"):
        _ = none.grad
    assert len(pair.grads) == 2
    with pytest.raises(AttributeError, match="each of its 2 inputs: use .grads"):
        _ = pair.grad


def _in_flight(server: ServerThread, count: int) -> None:
    """Waits until the server holds `count` requests besides the held blocker."""
    wait_until(lambda: server.server.batcher.stats.requests >= count, what=f"{count} queued")


def test_closing_the_client_fails_its_calls_in_flight_and_later_ones(make_server: Any) -> None:
    """In flight: CancelledError, not retried; afterwards: RuntimeError, as for a stream."""
    hook = FaultHook()
    server = make_server(fault_hook=hook)
    with _hold_worker(server, hook):
        client = LossClient(server.target, timeout=PATIENCE_S)
        with cf.ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(client.gan_generator, np.ones(2)) for _ in range(2)]
            _in_flight(server, 2)
            client.close()
            for call in calls:
                assert isinstance(call.exception(PATIENCE_S), CancelledError)
        with pytest.raises(RuntimeError, match="closed"):
            client.gan_generator(np.ones(2))
        with pytest.raises(RuntimeError, match="closed"):
            client.health()
        with pytest.raises(RuntimeError, match="closed"):
            client.stream()


async def test_closing_the_async_client_fails_its_calls_in_flight_and_later_ones(
    make_server: Any,
) -> None:
    hook = FaultHook()
    server = make_server(fault_hook=hook)
    with _hold_worker(server, hook):
        client = AsyncLossClient(server.target, timeout=PATIENCE_S)
        calls = [asyncio.ensure_future(client.gan_generator(np.ones(2))) for _ in range(2)]
        await asyncio.to_thread(_in_flight, server, 2)
        await asyncio.wait_for(client.close(), PATIENCE_S)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*calls, return_exceptions=True), PATIENCE_S
        )
        assert all(isinstance(o, CancelledError) for o in outcomes), outcomes
        with pytest.raises(RuntimeError, match="closed"):
            await client.gan_generator(np.ones(2))
        with pytest.raises(RuntimeError, match="closed"):
            await client.server_info()


@pytest.mark.slow
def test_a_client_retries_a_dead_server_at_least_every_two_seconds() -> None:
    """Reconnection attempts stay at most RECONNECT_BACKOFF_MAX_MS apart (plus jitter).

    gRPC's own backoff grows 1, 1.6, 2.6, 4.1 s...: its fourth gap is above 3.2 s
    whatever the jitter (measured: 3.7 s). A listener that takes every connection and closes it at
    once stands in for a server that is down; calls keep the client wanting one.
    """
    attempts: list[float] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.1)
        port = listener.getsockname()[1]
        with LossClient(f"127.0.0.1:{port}", timeout=0.5, retry=NO_RETRY) as client:
            calling = threading.Event()
            calling.set()

            def call_until_stopped() -> None:
                while calling.is_set():
                    with contextlib.suppress(HingelossError):
                        client.health()
                    time.sleep(0.05)

            caller = threading.Thread(target=call_until_stopped)
            caller.start()
            try:
                started = time.monotonic()
                while time.monotonic() - started < 11.0:
                    with contextlib.suppress(TimeoutError):
                        connection, _ = listener.accept()
                        attempts.append(time.monotonic())
                        connection.close()
            finally:
                calling.clear()
                caller.join()
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert len(attempts) >= 5, attempts
    # The cap plus its 20% jitter, plus this test's polling and a loaded machine's slack.
    assert max(gaps) < RECONNECT_BACKOFF_MAX_MS / 1000 * 1.2 + 0.8, gaps


def test_closing_the_client_while_a_call_waits_to_retry_fails_it_as_cancelled() -> None:
    """Not with the RuntimeError a call made after close() gets: this one was in flight."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    slow_retries = RetryPolicy(max_attempts=3, initial_backoff_s=2.0, max_backoff_s=2.0, jitter=0)
    client = LossClient(f"127.0.0.1:{port}", timeout=PATIENCE_S, retry=slow_retries)
    with cf.ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.gan_generator, np.ones(2))
        time.sleep(0.5)  # the first attempt failed at once (nothing listens): it waits 2 s
        client.close()
        assert isinstance(call.exception(PATIENCE_S), CancelledError)
