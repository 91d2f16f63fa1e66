"""SDK streams over real servers: every future resolves, however the stream goes.

Each test drives LossStream (threads) or AsyncLossStream (asyncio), or both, over
a real server on 127.0.0.1. The worker is held with a FaultHook where a test
needs answers to wait.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures as cf
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from helpers.cases import random_inputs
from helpers.faults import BLOCKER, FaultHook, HeldWorker, wait_until
from helpers.references import reference
from helpers.servers import ServerThread
from prometheus_client import CollectorRegistry

from hingeloss import (
    AsyncLossClient,
    CancelledError,
    DeadlineExceededError,
    HingelossError,
    InvalidArgumentError,
    LossClient,
    LossResult,
    StreamAbortedError,
    UnavailableError,
)
from hingeloss import _streams as sdk_streams
from hingeloss._health import check
from hingeloss._results import decode_response
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc

# Bound on every wait: a future that never resolves fails the test instead of hanging it.
PATIENCE_S = 15.0


def _cases(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [random_inputs("binary_hinge", rng, int(rng.integers(1, 20))) for _ in range(count)]


def _bad(case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same case with labels outside {-1, +1}: the server refuses it."""
    return {**case, "labels": case["labels"] * 3}


def _check_answers(results: list[Any], cases: list[dict[str, np.ndarray]]) -> None:
    for result, case in zip(results, cases, strict=True):
        np.testing.assert_allclose(result.loss, reference("binary_hinge", case).loss, rtol=1e-12)


async def _outcomes(pending: list[Any]) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), PATIENCE_S)


def _sync_outcomes(futures: list[cf.Future[Any]]) -> list[Any]:
    outcomes: list[Any] = []
    for future in futures:
        error = future.exception(timeout=PATIENCE_S)
        outcomes.append(error if error is not None else future.result())
    return outcomes


@dataclass
class _Held:
    """A server whose only worker is held by a blocker request until `release()`."""

    server: ServerThread
    hook: FaultHook
    registry: CollectorRegistry
    worker: HeldWorker[LossResult]

    def inflight(self) -> float:
        """Requests the server has received and not answered, the blocker included."""
        return self.registry.get_sample_value("hingeloss_inflight_requests") or 0.0

    def release(self) -> None:
        self.worker.release()


@pytest.fixture
def held(make_server: Callable[..., ServerThread]) -> Iterator[_Held]:
    hook, registry = FaultHook(), CollectorRegistry()
    server = make_server(fault_hook=hook, registry=registry)

    def blocker() -> LossResult:
        with LossClient(server.target, timeout=60) as client:
            return client.gan_generator(np.ones(2), request_id=BLOCKER)

    with HeldWorker(hook, blocker) as worker:
        yield _Held(server, hook, registry, worker)


# -- a stream that fails while callers wait for a slot --------------------------------


async def test_async_calls_waiting_for_a_slot_resolve_when_the_stream_fails(
    shared_server: ServerThread,
) -> None:
    cases = _cases(5)
    cases[0] = _bad(cases[0])
    async with (
        AsyncLossClient(shared_server.target) as client,
        client.stream(max_in_flight=1) as stream,
    ):
        pending = [stream.binary_hinge(c["scores"], c["labels"]) for c in cases]
        outcomes = await _outcomes(pending)
        later = await _outcomes([stream.binary_hinge(cases[1]["scores"], cases[1]["labels"])])
    assert isinstance(outcomes[0], InvalidArgumentError)
    assert all(isinstance(o, StreamAbortedError) for o in outcomes[1:]), outcomes
    # Once the stream is over, a call fails at once and is never sent.
    assert isinstance(later[0], StreamAbortedError)


def test_sync_calls_waiting_for_a_slot_resolve_when_the_stream_fails(
    shared_server: ServerThread,
) -> None:
    cases = _cases(5)
    cases[0] = _bad(cases[0])
    with LossClient(shared_server.target) as client, client.stream(max_in_flight=1) as stream:
        futures = [stream.binary_hinge(c["scores"], c["labels"]) for c in cases]
        outcomes = _sync_outcomes(futures)
    assert isinstance(outcomes[0], InvalidArgumentError)
    assert all(isinstance(o, StreamAbortedError) for o in outcomes[1:]), outcomes


# -- close right after submitting -------------------------------------------------------


async def test_async_close_right_after_submitting_answers_everything(
    shared_server: ServerThread,
) -> None:
    cases = _cases(24)
    async with AsyncLossClient(shared_server.target) as client:
        async with client.stream(max_in_flight=4) as stream:
            pending = [
                stream.binary_hinge(c["scores"], c["labels"], request_id=f"c{i}")
                for i, c in enumerate(cases)
            ]
        # close() has returned: every call was written, and answered.
        assert all(p.done() for p in pending)  # type: ignore[attr-defined]
        results = await _outcomes(pending)
    assert [r.request_id for r in results] == [f"c{i}" for i in range(24)]
    _check_answers(results, cases)


def test_sync_close_right_after_submitting_answers_everything(
    shared_server: ServerThread,
) -> None:
    cases = _cases(24)
    with LossClient(shared_server.target) as client:
        with client.stream(max_in_flight=4) as stream:
            futures = [stream.binary_hinge(c["scores"], c["labels"]) for c in cases]
        assert all(f.done() for f in futures)
        _check_answers([f.result() for f in futures], cases)
        with pytest.raises(RuntimeError, match="closed"):
            stream.binary_hinge(cases[0]["scores"], cases[0]["labels"]).result(timeout=1)


# -- leaving a stream early ---------------------------------------------------------------


class _LeavingError(Exception):
    """Raised inside a stream block by the test."""


async def test_async_error_leaving_the_block_right_after_a_submit_fails_it(
    shared_server: ServerThread,
) -> None:
    """The stream's call is cancelled before it started: nothing may wait for it to start."""
    case = _cases(1)[0]
    async with AsyncLossClient(shared_server.target) as client:

        async def leave() -> Any:
            async with client.stream() as stream:
                submitted = stream.binary_hinge(case["scores"], case["labels"])
                raise _LeavingError(submitted)

        with pytest.raises(_LeavingError) as left:
            await asyncio.wait_for(leave(), PATIENCE_S)
        submitted = left.value.args[0]
        assert submitted.done()
        with pytest.raises(CancelledError):
            await submitted
        # The client goes on serving.
        result = await client.binary_hinge(case["scores"], case["labels"])
    _check_answers([result], [case])


async def test_async_client_closed_under_an_open_stream_fails_its_calls(
    shared_server: ServerThread,
) -> None:
    case = _cases(1)[0]
    client = AsyncLossClient(shared_server.target)
    stream = client.stream()
    submitted = stream.binary_hinge(case["scores"], case["labels"])
    await asyncio.wait_for(client.close(), PATIENCE_S)
    await asyncio.wait_for(stream.close(), PATIENCE_S)
    outcomes = await _outcomes([submitted])
    assert isinstance(outcomes[0], CancelledError), outcomes


def test_sync_error_leaving_the_block_right_after_a_submit_fails_it(
    shared_server: ServerThread,
) -> None:
    case = _cases(1)[0]
    with LossClient(shared_server.target) as client:

        def leave() -> None:
            with client.stream() as stream:
                submitted = stream.binary_hinge(case["scores"], case["labels"])
                raise _LeavingError(submitted)

        started = time.monotonic()
        with pytest.raises(_LeavingError) as left:
            leave()
        assert time.monotonic() - started < PATIENCE_S
        submitted = left.value.args[0]
        assert submitted.done()
        result = client.binary_hinge(case["scores"], case["labels"])
    _check_answers([result], [case])


# -- a response that fails to decode ----------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_response_that_fails_to_decode_fails_only_its_own_future(
    shared_server: ServerThread, monkeypatch: pytest.MonkeyPatch, flavour: str
) -> None:
    """The caller-side decode of one answer fails (as a corrupt or too-new answer would)."""
    real_decode = decode_response  # what hingeloss._streams calls, patched below

    def decode(response: pb.ComputeResponse, kind: Any) -> Any:
        if response.request_id == "r2":
            raise ValueError("simulated: this answer cannot be decoded")
        return real_decode(response, kind)

    monkeypatch.setattr(sdk_streams, "decode_response", decode)
    cases = _cases(6)

    def sync_run() -> list[Any]:
        with LossClient(shared_server.target) as client, client.stream(max_in_flight=2) as s:
            return _sync_outcomes(
                [
                    s.binary_hinge(c["scores"], c["labels"], request_id=f"r{i}")
                    for i, c in enumerate(cases)
                ]
            )

    async def async_run() -> list[Any]:
        async with (
            AsyncLossClient(shared_server.target) as client,
            client.stream(max_in_flight=2) as s,
        ):
            return await _outcomes(
                [
                    s.binary_hinge(c["scores"], c["labels"], request_id=f"r{i}")
                    for i, c in enumerate(cases)
                ]
            )

    outcomes = sync_run() if flavour == "sync" else asyncio.run(async_run())
    assert isinstance(outcomes[2], ValueError)
    del outcomes[2], cases[2]
    _check_answers(outcomes, cases)


# -- a bad request in the middle of a stream ---------------------------------------------


def _check_bad_in_the_middle(outcomes: list[Any], cases: list[dict[str, np.ndarray]]) -> None:
    _check_answers(outcomes[:2], cases[:2])
    culprit = outcomes[2]
    assert isinstance(culprit, InvalidArgumentError)
    assert culprit.field_violations[0].field == "binary_hinge.labels[0]"
    # Servers that name the failing request say it is the third (older ones do not).
    assert culprit.metadata.get("streamIndex", "2") == "2"
    assert culprit.metadata.get("requestId", "m2") == "m2"
    for aborted in outcomes[3:]:
        assert isinstance(aborted, StreamAbortedError)
        assert aborted.culprit is culprit
        assert aborted.__cause__ is culprit
        assert aborted.safe_to_resubmit


async def test_async_bad_request_fails_alone_and_aborts_the_rest(
    shared_server: ServerThread,
) -> None:
    cases = _cases(6)
    cases[2] = _bad(cases[2])
    async with (
        AsyncLossClient(shared_server.target) as client,
        client.stream(max_in_flight=8) as stream,
    ):
        outcomes = await _outcomes(
            [
                stream.binary_hinge(c["scores"], c["labels"], request_id=f"m{i}")
                for i, c in enumerate(cases)
            ]
        )
    _check_bad_in_the_middle(outcomes, cases)


async def test_async_writes_racing_the_abort_report_the_status_the_server_sent(
    shared_server: ServerThread,
) -> None:
    """Requests still being written when the server ends the call fail with its status.

    Such a write fails with a local INTERNAL ("Internal error from Core") that
    gRPC also stores as the call's status; the server's INVALID_ARGUMENT must win.
    """
    cases = _cases(40)
    cases[0] = _bad(cases[0])
    async with AsyncLossClient(shared_server.target) as client:
        for _ in range(30):
            async with client.stream(max_in_flight=64) as stream:
                outcomes = await _outcomes(
                    [stream.binary_hinge(c["scores"], c["labels"]) for c in cases]
                )
            assert isinstance(outcomes[0], InvalidArgumentError), outcomes[0]
            assert all(isinstance(o, StreamAbortedError) for o in outcomes[1:])


def test_sync_bad_request_fails_alone_and_aborts_the_rest(shared_server: ServerThread) -> None:
    cases = _cases(6)
    cases[2] = _bad(cases[2])
    with LossClient(shared_server.target) as client, client.stream(max_in_flight=8) as stream:
        outcomes = _sync_outcomes(
            [
                stream.binary_hinge(c["scores"], c["labels"], request_id=f"m{i}")
                for i, c in enumerate(cases)
            ]
        )
        later = stream.binary_hinge(cases[0]["scores"], cases[0]["labels"])
        assert isinstance(later.exception(timeout=1), StreamAbortedError)
    _check_bad_in_the_middle(outcomes, cases)


def test_aborted_calls_can_be_resubmitted(shared_server: ServerThread) -> None:
    cases = _cases(5)
    cases[1] = _bad(cases[1])
    with LossClient(shared_server.target) as client:
        with client.stream() as stream:
            futures = [stream.binary_hinge(c["scores"], c["labels"]) for c in cases]
            outcomes = _sync_outcomes(futures)
        again = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, StreamAbortedError)]
        assert again == [2, 3, 4]
        with client.stream() as stream:
            retried = [stream.binary_hinge(cases[i]["scores"], cases[i]["labels"]) for i in again]
            _check_answers([f.result(timeout=PATIENCE_S) for f in retried], cases[2:])


# -- cancelling one call ------------------------------------------------------------------


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Polls state owned by the server's thread without blocking this event loop."""
    end = time.monotonic() + PATIENCE_S
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_cancelling_one_awaited_call_leaves_the_stream_working(held: _Held) -> None:
    async with (
        AsyncLossClient(held.server.target) as client,
        client.stream(max_in_flight=1) as stream,
    ):
        # Sent, then given up on: its answer will be dropped; its slot is free at once.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.gan_generator(np.ones(2), request_id="waited"), 0.2)
        sent = stream.gan_generator(np.ones(3), request_id="sent")
        # The blocker, "waited" and "sent" are all on the server: the slot came back.
        await _until(lambda: held.inflight() == 3, "the next call to be sent")
        unsent = stream.gan_generator(np.ones(4), request_id="unsent")  # waits for the slot
        await asyncio.sleep(0.1)
        unsent.cancel()  # type: ignore[attr-defined]
        held.release()
        assert (await asyncio.wait_for(sent, PATIENCE_S)).samples == 3
        after = await asyncio.wait_for(
            stream.gan_generator(np.ones(5), request_id="after"), PATIENCE_S
        )
        assert after.samples == 5
    assert {"waited", "sent", "after"} <= held.hook.computed
    assert "unsent" not in held.hook.computed  # cancelled before it was written


async def test_cancelling_a_call_while_it_is_being_written(held: _Held) -> None:
    """A write that flow control holds up is not the caller's to cancel: the stream lives.

    The server reads at most a window of requests ahead of its answers; with its
    worker held, the request after that window stays in flight on the wire.
    """
    window = 64
    big = np.ones(1 << 21)  # 16 MiB: more than HTTP/2 flow control lets through unread
    async with (
        AsyncLossClient(held.server.target) as client,
        client.stream(max_in_flight=window + 8) as stream,
    ):
        queued = [stream.gan_generator(np.ones(2), request_id=f"q{i}") for i in range(window + 1)]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.gan_generator(big, request_id="big"), 1.0)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.gan_generator(np.ones(2), request_id="behind"), 0.3)
        held.release()
        answers = await _outcomes(queued)
        assert all(a.samples == 2 for a in answers), answers
        after = await asyncio.wait_for(
            stream.gan_generator(np.ones(5), request_id="after"), PATIENCE_S
        )
        assert after.samples == 5
    assert "behind" not in held.hook.computed


# -- per-request deadlines ---------------------------------------------------------------


async def test_async_stream_request_gets_the_client_deadline(held: _Held) -> None:
    async with AsyncLossClient(held.server.target, timeout=0.5) as client:
        stream = client.stream()
        unlimited = client.stream(timeout=None)
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(stream.gan_generator(np.ones(2), request_id="late"), 5)
        assert time.monotonic() - started < 3
        patient = unlimited.gan_generator(np.ones(3), request_id="patient")
        await asyncio.sleep(1.0)
        assert not patient.done()  # type: ignore[attr-defined]
        held.release()
        assert (await asyncio.wait_for(patient, PATIENCE_S)).samples == 3
        # The stream outlived the deadline of one request.
        assert (await asyncio.wait_for(stream.gan_generator(np.ones(4)), 5)).samples == 4
        await stream.close()
        await unlimited.close()


def test_sync_stream_request_gets_the_client_deadline(held: _Held) -> None:
    with (
        LossClient(held.server.target, timeout=0.5) as client,
        client.stream() as stream,
        client.stream(timeout=None) as unlimited,
    ):
        started = time.monotonic()
        late = stream.gan_generator(np.ones(2), request_id="late")
        assert isinstance(late.exception(timeout=5), DeadlineExceededError)
        assert time.monotonic() - started < 3
        patient = unlimited.gan_generator(np.ones(3), request_id="patient")
        time.sleep(1.0)
        assert not patient.done()
        held.release()
        assert patient.result(timeout=PATIENCE_S).samples == 3
        assert stream.gan_generator(np.ones(4)).result(timeout=5).samples == 4


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_close_gives_up_on_a_stuck_server_after_the_deadline(held: _Held, flavour: str) -> None:
    def sync_run() -> BaseException | None:
        with LossClient(held.server.target, timeout=0.5) as client:
            with client.stream() as stream:
                stuck = stream.gan_generator(np.ones(2))
            return stuck.exception(timeout=0)

    async def async_run() -> BaseException | None:
        async with AsyncLossClient(held.server.target, timeout=0.5) as client:
            async with client.stream() as stream:
                stuck = stream.gan_generator(np.ones(2))
            return stuck.exception()  # type: ignore[attr-defined, no-any-return]

    started = time.monotonic()
    error = sync_run() if flavour == "sync" else asyncio.run(async_run())
    assert isinstance(error, DeadlineExceededError)
    assert time.monotonic() - started < 5


# -- a server that shuts down under an open stream -------------------------------------


def test_a_draining_server_fails_every_unread_request_with_its_own_status(held: _Held) -> None:
    """The stream's end on shutdown (UNAVAILABLE, DRAINING) is no single request's error.

    What the server had read is answered; each request written after the drain began
    (never read) gets the server's UNAVAILABLE, retryable elsewhere, and none is told
    that another request ended the stream.
    """
    with LossClient(held.server.target, timeout=PATIENCE_S) as client, client.stream() as stream:
        read = [stream.gan_generator(np.full(2, float(i))) for i in range(3)]
        wait_until(lambda: held.inflight() >= 4, what="the blocker and these three read")
        held.server.begin_stop()
        wait_until(lambda: check(held.server.target) == "NOT_SERVING", what="draining")
        time.sleep(0.2)  # the stream's reader, cancelled by the drain, has stopped
        unread = [stream.gan_generator(np.full(2, float(i))) for i in range(3)]
        held.release()
        outcomes = _sync_outcomes(read + unread)
    assert [r.loss for r in outcomes[:3]] == [-0.0, -1.0, -2.0]
    for error in outcomes[3:]:
        assert isinstance(error, UnavailableError), outcomes
        assert error.reason == "DRAINING"


# -- a server that ends the stream early ---------------------------------------------------


class _AnswersOnce(pb_grpc.LossServiceServicer):
    """A LossService that answers the first request of a stream, then ends it (status OK)."""

    def ComputeStream(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.ComputeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ComputeResponse]:
        first = next(request_iterator)
        scores = first.gan_generator.fake_scores  # a gradient that fits them, all zeros
        gradient = pb.Gradient(input="fake_scores", dense=pb.Tensor(dtype=scores.dtype))
        gradient.dense.shape.extend(scores.shape)
        gradient.dense.data = bytes(len(scores.data))
        yield pb.ComputeResponse(request_id=first.request_id, loss=1.0, gradients=[gradient])


@pytest.fixture
def answers_once() -> Iterator[str]:
    server = grpc.server(cf.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_LossServiceServicer_to_server(_AnswersOnce(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_sync_stream_ended_early_fails_later_calls(answers_once: str) -> None:
    with LossClient(answers_once) as client, client.stream() as stream:
        first = stream.gan_generator(np.ones(2), request_id="first")
        assert first.result(timeout=PATIENCE_S).loss == 1.0
        rest = [stream.gan_generator(np.ones(2)) for _ in range(2)]
        for future in rest:
            assert isinstance(future.exception(timeout=PATIENCE_S), HingelossError)
        later = stream.gan_generator(np.ones(2))
        assert isinstance(later.exception(timeout=PATIENCE_S), HingelossError)


async def test_async_stream_ended_early_fails_later_calls(answers_once: str) -> None:
    async with AsyncLossClient(answers_once) as client, client.stream() as stream:
        first = await asyncio.wait_for(stream.gan_generator(np.ones(2)), PATIENCE_S)
        assert first.loss == 1.0
        outcomes = await _outcomes([stream.gan_generator(np.ones(2)) for _ in range(3)])
        assert all(isinstance(o, HingelossError) for o in outcomes), outcomes


# -- a stream dropped without being closed ---------------------------------------------


def test_a_sync_stream_dropped_unclosed_ends_its_call_and_threads(
    shared_server: ServerThread,
) -> None:
    """Its threads hold only its core: the stream object is collected and half-closes."""
    with LossClient(shared_server.target) as client:
        client.health()
        baseline = threading.active_count()
        for _ in range(5):
            stream = client.stream()
            assert stream.gan_generator(np.ones(2)).result(timeout=PATIENCE_S).loss == -1.0
            del stream
            gc.collect()
        wait_until(lambda: threading.active_count() <= baseline, what="the streams' threads ended")


async def test_an_async_stream_dropped_unclosed_ends_its_call_and_tasks(
    shared_server: ServerThread,
) -> None:
    async with AsyncLossClient(shared_server.target) as client:
        await client.health()
        baseline = len(asyncio.all_tasks())
        for _ in range(5):
            stream = client.stream()
            answer = await asyncio.wait_for(stream.gan_generator(np.ones(2)), PATIENCE_S)
            assert answer.loss == -1.0
            del stream
            gc.collect()
        deadline = time.monotonic() + PATIENCE_S
        while len(asyncio.all_tasks()) > baseline and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) <= baseline, asyncio.all_tasks()
