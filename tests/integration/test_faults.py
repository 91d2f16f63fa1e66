"""Fault isolation: a failing request fails alone, workers keep serving, stuck ones are seen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.faults import BLOCKER, FaultHook, HeldWorker, wait_until
from helpers.servers import server_config

from hingeloss import (
    NO_RETRY,
    HingelossError,
    InternalError,
    LossClient,
    LossResult,
    OverloadedError,
)
from hingeloss._requests import build_request
from hingeloss._results import decode_response
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc
from hingeloss_server.config import WorkerConfig
from hingeloss_server.engine import device_worker
from hingeloss_server.engine.jobs import LossJob
from hingeloss_server.engine.validation import PreparedJob, prepare, prepare_batch
from hingeloss_server.transport.servicer import SERVICE_NAME

IDS = ("r0", "r1", "bad", "r3", "r4", "r5")


def _inputs(rng: np.random.Generator, rows: int = 16) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=rows), rng.choice([-1.0, 1.0], size=rows)


def _expected(scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Binary hinge, mean reduction, kink zero: the reference answer."""
    argument = 1.0 - labels * scores
    loss = float(np.maximum(0.0, argument).mean())
    grad = np.where(argument > 0, -labels, 0.0) / len(scores)
    return loss, grad


def _batch_behind_blocker(
    server: Any, hook: FaultHook, ids: tuple[str, ...], seed: int = 0
) -> tuple[dict[str, Future[LossResult]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Queues `ids` while the worker is held, then lets them go as one batch."""
    rng = np.random.default_rng(seed)
    inputs = {request_id: _inputs(rng) for request_id in (BLOCKER, *ids)}
    futures: dict[str, Future[LossResult]] = {}
    with LossClient(server.target, retry=NO_RETRY) as client, ThreadPoolExecutor(len(ids)) as pool:
        send = partial(client.binary_hinge, *inputs[BLOCKER], request_id=BLOCKER)
        with HeldWorker(hook, send) as held:
            for request_id in ids:
                futures[request_id] = pool.submit(
                    client.binary_hinge, *inputs[request_id], request_id=request_id
                )
            wait_until(lambda: server.server.batcher.stats.requests == len(ids), what="queued")
        futures[BLOCKER] = held.blocker
        for future in futures.values():
            future.exception(30)
    return futures, inputs


def _check_correct(result: LossResult, inputs: tuple[np.ndarray, np.ndarray]) -> None:
    loss, grad = _expected(*inputs)
    assert result.loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(result.grad, grad, rtol=1e-12)


@pytest.mark.parametrize(
    ("fault", "error_type", "code", "reason"),
    [
        (
            lambda: RuntimeError("injected fault"),
            InternalError,
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
        ),
        (
            lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            OverloadedError,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "DEVICE_OUT_OF_MEMORY",
        ),
    ],
    ids=["exception", "cuda-oom"],
)
def test_failure_in_a_batch_fails_only_the_culprit(
    make_server: Callable[..., Any],
    fault: Callable[[], BaseException],
    error_type: type[HingelossError],
    code: grpc.StatusCode,
    reason: str,
) -> None:
    hook = FaultHook(fail={"bad": fault})
    server = make_server(server_config(), fault_hook=hook)
    futures, inputs = _batch_behind_blocker(server, hook, IDS)

    # All six were in one batch; it failed, was split, and each ran alone.
    first = hook.batches_with("bad")[0]
    assert sorted(first) == sorted(IDS)
    assert all(len(batch) == 1 for batch in hook.batches_with("r0")[1:])

    error = futures["bad"].exception()
    assert isinstance(error, error_type)
    assert error.code == code
    assert error.reason == reason
    assert "injected" not in str(error)
    assert "Tried to allocate" not in str(error)
    for request_id in IDS:
        if request_id != "bad":
            _check_correct(futures[request_id].result(), inputs[request_id])
    _check_correct(futures[BLOCKER].result(), inputs[BLOCKER])

    # The worker keeps serving, batches included.
    after, after_inputs = _batch_behind_blocker_again(server, hook)
    for request_id, future in after.items():
        _check_correct(future.result(), after_inputs[request_id])


def _batch_behind_blocker_again(
    server: Any, hook: FaultHook
) -> tuple[dict[str, Future[LossResult]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(7)
    inputs = {f"after{i}": _inputs(rng) for i in range(4)}
    with LossClient(server.target, retry=NO_RETRY) as client, ThreadPoolExecutor(4) as pool:
        futures = {
            request_id: pool.submit(client.binary_hinge, *value, request_id=request_id)
            for request_id, value in inputs.items()
        }
        for future in futures.values():
            future.exception(30)
    return futures, inputs


def test_batch_too_large_for_the_device_succeeds_split(make_server: Callable[..., Any]) -> None:
    """An OOM of the whole batch, where each request fits alone: nobody fails."""
    hook = FaultHook(
        {"*": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory")}, fail_batches_over=1
    )
    server = make_server(server_config(), fault_hook=hook)
    futures, inputs = _batch_behind_blocker(server, hook, IDS)
    assert sorted(hook.batches_with("r0")[0]) == sorted(IDS)
    for request_id, future in futures.items():
        _check_correct(future.result(), inputs[request_id])


def test_bug_while_checking_values_fails_only_that_request(
    make_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in value checks (before compute) is isolated too."""

    def buggy_prepare(job: LossJob, **options: Any) -> PreparedJob:
        if job.request_id == "bad":
            raise ZeroDivisionError("a bug")
        return prepare(job, **options)

    def buggy_prepare_batch(jobs: Sequence[LossJob], **options: Any) -> list[Any]:
        if any(job.request_id == "bad" for job in jobs):
            raise ZeroDivisionError("a bug")
        return prepare_batch(jobs, **options)

    # The batch's checks hit the bug first; then each job is checked alone.
    monkeypatch.setattr(device_worker, "prepare_batch", buggy_prepare_batch)
    monkeypatch.setattr(device_worker, "prepare", buggy_prepare)
    hook = FaultHook()
    server = make_server(server_config(), fault_hook=hook)
    futures, inputs = _batch_behind_blocker(server, hook, IDS)
    assert isinstance(futures["bad"].exception(), InternalError)
    for request_id in IDS:
        if request_id != "bad":
            _check_correct(futures[request_id].result(), inputs[request_id])
    assert "bad" not in hook.computed


def test_watchdog_reports_a_stuck_worker_and_its_recovery(make_server: Callable[..., Any]) -> None:
    """NOT_SERVING while a batch runs past watchdog_seconds; SERVING once it finishes.

    A plain channel is used: the SDK's channel health-checks its backends and so
    (on purpose) sends nothing to a replica that says NOT_SERVING.
    """
    hook = FaultHook()
    config = server_config(workers=WorkerConfig(devices=("cpu",), watchdog_seconds=0.3))
    server = make_server(config, fault_hook=hook)
    rng = np.random.default_rng(3)
    queued_inputs = _inputs(rng)
    request, kind = build_request(
        "binary_hinge",
        {"scores": queued_inputs[0], "labels": queued_inputs[1]},
        {"request_id": "queued"},
    )

    def status(service: str = "") -> str:
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    with (
        grpc.insecure_channel(server.target) as channel,
        LossClient(server.target, retry=NO_RETRY) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        assert status() == "SERVING"
        send = partial(client.binary_hinge, *_inputs(rng), request_id=BLOCKER)
        with HeldWorker(hook, send) as stuck:
            wait_until(lambda: status() == "NOT_SERVING", timeout=5, what="NOT_SERVING")
            assert status(SERVICE_NAME) == "NOT_SERVING"
            queued = pool.submit(stub.Compute, request, timeout=10)
            wait_until(lambda: server.server.batcher.stats.requests == 1, what="queued")
        wait_until(lambda: status() == "SERVING", timeout=5, what="SERVING again")
        assert status(SERVICE_NAME) == "SERVING"
        stuck.blocker.result(10)
        _check_correct(decode_response(queued.result(10), kind), queued_inputs)
