"""ComputeUpload over a real server: the same answers as Compute, bit for bit, and its refusals.

The SDK uploads requests whose scores hold its client's default or more; `upload_min_bytes=0`
makes it upload every request, None never. Raw calls cut the parts where the SDK never
would (inside a row, across two tensors) and break the protocol on purpose.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from helpers.servers import InProcessServer, RefusesUnread, ServerThread, server_config
from prometheus_client import CollectorRegistry

from hingeloss import (
    NO_RETRY,
    AsyncLossClient,
    InvalidArgumentError,
    LossClient,
    LossResult,
    OverloadedError,
)
from hingeloss._errors import HingelossError, from_rpc_error
from hingeloss._requests import build_request
from hingeloss._upload import (
    ASYNC_UPLOAD_MIN_BYTES,
    COMPUTE_UPLOAD,
    SYNC_UPLOAD_MIN_BYTES,
    Upload,
    make_upload,
    split_request,
)
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import BatchingConfig, LimitsConfig

RNG = np.random.default_rng(20261206)


def _inputs(loss: str, rows: int = 33, classes: int = 7) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fresh inputs of one loss, on a grid of small integers (ties and kinks included)."""
    scores = RNG.integers(-3, 4, size=(rows, classes)).astype(np.float32) / 2
    vector = RNG.integers(-3, 4, size=rows).astype(np.float32) / 2
    signs = RNG.choice([-1, 1], size=rows)
    targets = RNG.integers(0, classes, size=rows)
    weights = RNG.random(rows)
    cases: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
        "multiclass_hinge": ((scores, targets), {"sample_weights": weights}),
        "crammer_singer": ((scores, targets), {"tie_break": "split_evenly"}),
        "binary_hinge": ((vector, signs), {}),
        "gan_discriminator": ((vector, vector[::-1].copy()), {}),
        "gan_generator": ((vector,), {}),
        "margin_ranking": ((vector, vector[::-1].copy(), signs), {}),
    }
    return cases[loss]


def _same(a: LossResult, b: LossResult) -> None:
    assert a.loss == b.loss
    assert len(a.grads) == len(b.grads)
    for x, y in zip(a.grads, b.grads, strict=True):
        assert x.dtype == y.dtype
        assert x.tobytes() == y.tobytes()
    for x, y in zip(a.per_sample or (), b.per_sample or (), strict=True):
        assert x.tobytes() == y.tobytes()


LOSSES = (
    "multiclass_hinge",
    "crammer_singer",
    "binary_hinge",
    "gan_discriminator",
    "gan_generator",
    "margin_ranking",
)


@pytest.mark.parametrize("loss", LOSSES)
def test_an_upload_answers_as_compute_does_bit_for_bit(shared_server: Any, loss: str) -> None:
    inputs, options = _inputs(loss)
    options |= {"reduction": "none"}
    with (
        LossClient(shared_server.target, upload_min_bytes=0) as uploading,
        LossClient(shared_server.target, upload_min_bytes=None) as whole,
    ):
        _same(uploading.compute(loss, *inputs, **options), whole.compute(loss, *inputs, **options))


@pytest.mark.parametrize("gradient_format", ["dense", "factored", "row_sparse"])
async def test_a_large_request_goes_up_in_parts_by_default(
    make_server: Callable[..., ServerThread], gradient_format: str
) -> None:
    """A 4096x1000 request (16 MB of scores) is uploaded by both clients, answers unchanged."""
    registry = CollectorRegistry()
    server = make_server(registry=registry)
    scores = RNG.standard_normal((4096, 1000)).astype(np.float32)
    targets = RNG.integers(0, 1000, size=4096)
    assert scores.nbytes >= max(SYNC_UPLOAD_MIN_BYTES, ASYNC_UPLOAD_MIN_BYTES)
    with LossClient(server.target, upload_min_bytes=None) as whole:
        expected = whole.multiclass_hinge(scores, targets, gradient_format=gradient_format)
    with LossClient(server.target) as client:
        _same(client.multiclass_hinge(scores, targets, gradient_format=gradient_format), expected)
    async with AsyncLossClient(server.target) as aio:
        answer = await aio.multiclass_hinge(scores, targets, gradient_format=gradient_format)
    _same(answer, expected)
    assert _calls(registry, "ComputeUpload") == 2
    assert _calls(registry, "Compute") == 1


async def test_each_client_uploads_from_its_own_default(
    make_server: Callable[..., ServerThread],
) -> None:
    """1 MB of scores: past the sync client's 0.5 MB, short of the asyncio client's 8 MB."""
    registry = CollectorRegistry()
    server = make_server(registry=registry)
    scores = RNG.standard_normal((256, 1000)).astype(np.float32)
    targets = RNG.integers(0, 1000, size=256)
    assert SYNC_UPLOAD_MIN_BYTES <= scores.nbytes < ASYNC_UPLOAD_MIN_BYTES
    with LossClient(server.target) as client:
        client.multiclass_hinge(scores, targets)
    assert (_calls(registry, "ComputeUpload"), _calls(registry, "Compute")) == (1, 0)
    async with AsyncLossClient(server.target) as aio:
        await aio.multiclass_hinge(scores, targets)
    assert (_calls(registry, "ComputeUpload"), _calls(registry, "Compute")) == (1, 1)


def _calls(registry: CollectorRegistry, method: str) -> float:
    value = registry.get_sample_value(
        "hingeloss_grpc_server_handled_total",
        {"grpc_service": "hingeloss.v1.LossService", "grpc_method": method, "grpc_code": "OK"},
    )
    return value or 0.0


def _raw_parts(request: pb.ComputeRequest, apart: list[tuple[str, memoryview]]) -> list[bytes]:
    return list(make_upload(request, apart).parts)


def _upload(target: str, parts: Iterable[bytes], timeout: float = 30) -> bytes:
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_unary(COMPUTE_UPLOAD)
        answer: bytes = call(iter(parts), timeout=timeout)
        return answer


def test_parts_may_be_cut_anywhere(shared_server: Any) -> None:
    """Parts of 1 to 13 bytes: inside rows and elements, and across the two score tensors."""
    real = RNG.standard_normal(50).astype(np.float32)
    fake = RNG.standard_normal(30).astype(np.float32)
    options: dict[str, Any] = {"reduction": "sum", "return_per_sample": True}
    inputs = {"real_scores": real, "fake_scores": fake}
    with LossClient(shared_server.target, upload_min_bytes=None) as whole:
        expected = whole.gan_discriminator(real, fake, **options)
    for part_bytes in (1, 3, 13):
        apart: list[tuple[str, memoryview]] = []
        request, _ = build_request("gan_discriminator", inputs, options, scores_apart=apart)
        upload = make_upload(request, apart, part_bytes=part_bytes)
        answer = pb.ComputeResponse.FromString(_upload(shared_server.target, upload.parts))
        assert answer.loss == expected.loss
        grads = {g.input: g.dense.data for g in answer.gradients}
        assert grads["real_scores"] == expected.grads[0].tobytes()
        assert grads["fake_scores"] == expected.grads[1].tobytes()


def _request_and_data() -> tuple[pb.ComputeRequest, list[tuple[str, memoryview]]]:
    (scores, targets), _ = _inputs("multiclass_hinge", rows=4, classes=3)
    apart: list[tuple[str, memoryview]] = []
    request, _ = build_request(
        "multiclass_hinge", {"scores": scores, "targets": targets}, {}, scores_apart=apart
    )
    return request, apart


def _refusal(target: str, parts: list[bytes]) -> InvalidArgumentError:
    with pytest.raises(grpc.RpcError) as caught:
        _upload(target, parts)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgumentError)
    return error


def _head(request: pb.ComputeRequest) -> bytes:
    return pb.UploadPart(request=request).SerializeToString()


def _data(chunk: bytes) -> bytes:
    return pb.UploadPart(data=chunk).SerializeToString()


def test_broken_uploads_are_refused_naming_the_part_or_the_tensor(shared_server: Any) -> None:
    request, apart = _request_and_data()
    head, body = _raw_parts(request, apart)
    data = bytes(apart[0][1])  # 48 bytes
    dtype_unknown = pb.ComputeRequest()
    dtype_unknown.CopyFrom(request)
    dtype_unknown.multiclass_hinge.scores.dtype = 99  # type: ignore[assignment]
    cases = [
        ("upload[0]", [_data(data)]),  # no request first
        ("multiclass_hinge.scores.data", [head, _data(data[:20])]),  # ends short
        ("upload[2].data", [head, _data(data), _data(b"x")]),  # one byte too many
        ("upload[1]", [head, head]),  # a second request
        ("upload[1]", [head, _data(data[:8]) + _data(data[8:])]),  # one part, two fields
        ("upload[2]", [head, _data(data[:8]), b"\xff\xff"]),  # not an UploadPart
        ("upload[1]", [head, b"\x1a\x00" * 2000 + _data(data)]),  # 2,000 empty fields
        ("upload", []),  # no part at all
        (
            "multiclass_hinge.scores.dtype",
            [pb.UploadPart(request=dtype_unknown).SerializeToString()],
        ),
    ]
    for field, parts in cases:
        error = _refusal(shared_server.target, parts)
        assert [v.field for v in error.field_violations] == [field], (field, error)
    short = _refusal(shared_server.target, [head, _data(data[:20])])
    assert "ended after 20 of its 48 bytes" in short.field_violations[0].description
    # Nothing was lost: the same server answers the whole upload.
    assert pb.ComputeResponse.FromString(_upload(shared_server.target, [head, body])).loss > 0


def _stalled_after(target: str, head: bytes) -> grpc.RpcError:
    """The error of an upload whose first part is sent and whose next never comes."""
    stalled = threading.Event()

    def parts() -> Iterator[bytes]:
        yield head
        stalled.wait(30)  # the call must end without the rest

    try:
        with pytest.raises(grpc.RpcError) as caught:
            _upload(target, parts(), timeout=20)
    finally:
        stalled.set()
    return caught.value


@pytest.mark.parametrize("method", ["Compute", "ComputeUpload"])
def test_a_caller_that_leaves_mid_arrival_is_counted_as_cancelled(
    make_server: Callable[..., ServerThread], method: str
) -> None:
    """Once, and not as a request that ended short (INVALID_ARGUMENT): its caller
    cancelled it."""
    registry = CollectorRegistry()
    server = make_server(registry=registry)
    request, apart = _request_and_data()
    head, _ = _raw_parts(request, apart)
    sent, stop = threading.Event(), threading.Event()

    def parts() -> Iterator[bytes]:
        if method == "ComputeUpload":
            yield head
        sent.set()
        stop.wait(30)
        yield b""  # pragma: no cover - the call has ended by then

    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_unary(f"/hingeloss.v1.LossService/{method}").future(
            parts(), timeout=30
        )
        assert sent.wait(10)
        time.sleep(0.2)  # the server has read what was sent
        call.cancel()
        stop.set()

    def counted(code: str) -> float:
        labels = {"loss": "none", "code": code}
        return registry.get_sample_value("hingeloss_requests_total", labels) or 0.0

    deadline = time.monotonic() + 10
    while counted("CANCELLED") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # room for a second count, which must not come
    assert counted("CANCELLED") == 1
    assert counted("INVALID_ARGUMENT") == 0


def test_a_declared_size_past_the_limit_is_refused_before_any_part_is_read(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server(server_config(limits=LimitsConfig(max_request_bytes=1 << 20)))
    request = pb.ComputeRequest()
    request.gan_generator.fake_scores.dtype = pb.DTYPE_FLOAT32
    request.gan_generator.fake_scores.shape.append(1 << 30)  # 4 GiB declared, none sent
    error = _stalled_after(server.target, pb.UploadPart(request=request).SerializeToString())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "gan_generator.fake_scores.data" in (error.details() or "")


def test_an_upload_that_stops_arriving_is_refused_after_the_arrival_limit(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server(server_config(request_arrival_seconds=0.5))
    request, apart = _request_and_data()
    head, _ = _raw_parts(request, apart)
    error = _stalled_after(server.target, head)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive within 0.5 s" in (error.details() or "")


def test_the_parts_arrived_count_against_the_inflight_budget(
    make_server: Callable[..., ServerThread],
) -> None:
    """An upload holds its parts against the budget as they arrive, and only those:
    one that declares 64 MB and sends none of it holds a few bytes; one that has
    sent 1 MiB and stalls holds that, and a request that would pass the budget beside
    it is shed (INFLIGHT_FULL); the stalled one is answered once the rest comes."""
    # A 2 MB request holds about 6.2 MB (held_bytes): it fits alone, not beside 1 MiB.
    limit = 6_800_000
    server = make_server(server_config(batching=BatchingConfig(max_inflight_bytes=limit)))
    scores = RNG.standard_normal((512, 1000)).astype(np.float32)
    targets = RNG.integers(0, 1000, size=512)
    apart: list[tuple[str, memoryview]] = []
    request, _ = build_request(
        "multiclass_hinge", {"scores": scores, "targets": targets}, {}, scores_apart=apart
    )
    head, first, *rest = _raw_parts(request, apart)
    declared = pb.ComputeRequest()
    declared.gan_generator.fake_scores.dtype = pb.DTYPE_FLOAT32
    declared.gan_generator.fake_scores.shape.append(16 << 20)  # 64 MB, never sent
    with (
        LossClient(server.target, retry=NO_RETRY, upload_min_bytes=0) as client,
        futures.ThreadPoolExecutor(2) as pool,
    ):
        stalled_after_head = threading.Event()

        def head_only() -> Iterator[bytes]:
            yield _head(declared)
            stalled_after_head.wait(30)

        never_sent = pool.submit(_upload, server.target, head_only())
        try:
            time.sleep(0.2)
            assert client.multiclass_hinge(scores, targets).loss > 0
        finally:
            stalled_after_head.set()
        with pytest.raises(grpc.RpcError):
            never_sent.result(30)  # it ended short

        sent_one, release = threading.Event(), threading.Event()

        def slow_parts() -> Iterator[bytes]:
            yield head
            yield first
            sent_one.set()
            release.wait(30)
            yield from rest

        slow = pool.submit(_upload, server.target, slow_parts())
        assert sent_one.wait(10)
        shed = None
        try:
            for _ in range(100):  # until the server has read the slow upload's part
                try:
                    client.multiclass_hinge(scores, targets)
                except OverloadedError as error:
                    shed = error
                    break
                time.sleep(0.02)
        finally:
            release.set()
        assert shed is not None
        assert shed.reason == "INFLIGHT_FULL"
        assert pb.ComputeResponse.FromString(slow.result(30)).loss > 0


def test_one_upload_larger_than_the_budget_gets_in_alone(
    make_server: Callable[..., ServerThread],
) -> None:
    """As one Compute request does: the call's own parts never count against it."""
    server = make_server(server_config(batching=BatchingConfig(max_inflight_bytes=2 << 20)))
    scores = RNG.standard_normal((2048, 1000)).astype(np.float32)  # 8 MB
    targets = RNG.integers(0, 1000, size=2048)
    with LossClient(server.target, retry=NO_RETRY, upload_min_bytes=0) as client:
        assert client.multiclass_hinge(scores, targets).loss > 0


def test_an_upload_reads_the_arrays_when_the_call_is_made(shared_server: Any) -> None:
    """Coroutines made one after the other over one reused buffer each send the batch the
    buffer held when theirs was made, as one message would."""
    buffer = np.empty((1024, 1000), dtype=np.float32)
    targets = RNG.integers(0, 1000, size=1024)
    batches = [RNG.standard_normal(buffer.shape).astype(np.float32) for _ in range(3)]

    async def losses(upload_min_bytes: int | None) -> list[float]:
        async with AsyncLossClient(shared_server.target, upload_min_bytes=upload_min_bytes) as c:
            calls = []
            for batch in batches:
                buffer[...] = batch
                calls.append(c.multiclass_hinge(buffer, targets))
            return [r.loss for r in await asyncio.gather(*calls)]

    expected = asyncio.run(losses(None))
    assert len(set(expected)) == 3
    assert asyncio.run(losses(0)) == expected


class _FailsFirstUpload(InProcessServer):
    """A proxy whose first ComputeUpload reads every part, then fails UNAVAILABLE; later
    ones go to a real server. It records the parts of each call it received."""

    def __init__(self, upstream: str) -> None:
        self.calls: list[list[bytes]] = []
        super().__init__(upstream)

    def handler(self) -> grpc.GenericRpcHandler:
        assert self.upstream is not None  # __init__ takes one
        forward = self.upstream.stream_unary(COMPUTE_UPLOAD)

        def handle(parts: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            received = list(parts)
            self.calls.append(received)
            if len(self.calls) == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the first attempt fails")
            answer: bytes = forward(iter(received))
            return answer

        return grpc.method_handlers_generic_handler(
            "hingeloss.v1.LossService",
            {"ComputeUpload": grpc.stream_unary_rpc_method_handler(handle)},
        )


def test_a_retried_upload_sends_every_part_again(shared_server: Any) -> None:
    proxy = _FailsFirstUpload(shared_server.target)
    (scores, targets), _ = _inputs("multiclass_hinge", rows=300, classes=1000)  # 1.2 MB
    try:
        with LossClient(f"127.0.0.1:{proxy.port}", upload_min_bytes=0) as client:
            answer = client.multiclass_hinge(scores, targets)
    finally:
        proxy.close()
    with LossClient(shared_server.target, upload_min_bytes=None) as whole:
        _same(answer, whole.multiclass_hinge(scores, targets))
    assert len(proxy.calls) == 2
    assert proxy.calls[0] == proxy.calls[1]
    assert len(proxy.calls[1]) == 3  # the request, then 1 MiB and the rest


class _ComputeOnlyProxy(InProcessServer):
    """A server of an older release: Compute only, forwarded to a real server.

    It records each method callers asked for, so the test sees which ones the SDK used.
    """

    def __init__(self, upstream: str) -> None:
        self.asked: list[str] = []
        super().__init__(upstream)

    def handler(self) -> grpc.GenericRpcHandler:
        assert self.upstream is not None  # __init__ takes one
        forward = self.upstream.unary_unary("/hingeloss.v1.LossService/Compute")
        asked = self.asked

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> Any:
                service, _, method = details.method.rpartition("/")
                if service == "/hingeloss.v1.LossService":  # not the SDK's health checks
                    asked.append(method)
                if details.method != "/hingeloss.v1.LossService/Compute":
                    return None  # UNIMPLEMENTED, as an older server answers
                return grpc.unary_unary_rpc_method_handler(lambda raw, _: forward(raw))

        return Handler()


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_against_a_server_without_compute_upload_the_sdk_sends_one_message(
    shared_server: Any, flavour: str
) -> None:
    proxy = _ComputeOnlyProxy(shared_server.target)
    (scores, targets), _ = _inputs("multiclass_hinge")
    try:
        with LossClient(shared_server.target, upload_min_bytes=None) as whole:
            expected = whole.multiclass_hinge(scores, targets)
        target = f"127.0.0.1:{proxy.port}"
        if flavour == "sync":
            with LossClient(target, retry=NO_RETRY, upload_min_bytes=0) as client:
                answers = [client.multiclass_hinge(scores, targets) for _ in range(2)]
        else:

            async def twice() -> list[LossResult]:
                async with AsyncLossClient(target, retry=NO_RETRY, upload_min_bytes=0) as client:
                    return [await client.multiclass_hinge(scores, targets) for _ in range(2)]

            answers = asyncio.run(twice())
    finally:
        proxy.close()
    for answer in answers:
        _same(answer, expected)
    # One upload refused, then one message each time, the refusal remembered.
    assert proxy.asked == ["ComputeUpload", "Compute", "Compute"]


def test_after_a_refusal_the_sdk_tries_an_upload_again_later(
    shared_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a load balancer a rolling upgrade may replace the old server."""
    monkeypatch.setattr("hingeloss._channel.UPLOAD_REPROBE_S", 0.5)
    proxy = _ComputeOnlyProxy(shared_server.target)
    (scores, targets), _ = _inputs("multiclass_hinge")
    try:
        with LossClient(f"127.0.0.1:{proxy.port}", upload_min_bytes=0) as client:
            client.multiclass_hinge(scores, targets)
            client.multiclass_hinge(scores, targets)
            time.sleep(0.6)
            client.multiclass_hinge(scores, targets)
    finally:
        proxy.close()
    assert proxy.asked == ["ComputeUpload", "Compute", "Compute", "ComputeUpload", "Compute"]


def _sixteen_megabytes() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(5)
    return rng.normal(size=(1024, 4000)).astype(np.float32), rng.integers(0, 4000, 1024)


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_refused_upload_reports_the_servers_status(flavour: str) -> None:
    """grpc.aio's own writes report INTERNAL when a part is written as the server ends
    the call (grpc/grpc#36066; with this server, in a third to two thirds of the calls):
    the asyncio client writes its parts itself, and the caller gets the server's
    status, as the sync client's caller does."""
    server = RefusesUnread(grpc.StatusCode.INVALID_ARGUMENT)
    scores, targets = _sixteen_megabytes()
    target, calls = f"127.0.0.1:{server.port}", 15
    refusals: list[HingelossError] = []
    try:
        if flavour == "sync":
            with LossClient(target, retry=NO_RETRY, upload_min_bytes=0) as client:
                for _ in range(calls):
                    with pytest.raises(HingelossError) as refused:
                        client.multiclass_hinge(scores, targets)
                    refusals.append(refused.value)
        else:

            async def refuse_all() -> None:
                async with AsyncLossClient(target, retry=NO_RETRY, upload_min_bytes=0) as client:
                    for _ in range(calls):
                        with pytest.raises(HingelossError) as refused:
                            await client.multiclass_hinge(scores, targets)
                        refusals.append(refused.value)

            asyncio.run(refuse_all())
    finally:
        server.close()
    assert [(e.code, e.message) for e in refusals] == calls * [
        (grpc.StatusCode.INVALID_ARGUMENT, "scores: refused unread")
    ]
    # Each refusal came from the upload itself, and turned nothing off.
    assert server.asked == calls * ["ComputeUpload"]


def test_an_older_server_slow_to_refuse_is_heard(shared_server: Any) -> None:
    """Each client's first upload is refused UNIMPLEMENTED while its parts are being
    written: the asyncio client hears it, answers that request in one message, and
    sends its next one in one message too."""
    server = RefusesUnread(grpc.StatusCode.UNIMPLEMENTED, upstream=shared_server.target)
    scores, targets = _sixteen_megabytes()
    with LossClient(shared_server.target, upload_min_bytes=None) as whole:
        expected = whole.multiclass_hinge(scores, targets)

    async def twice() -> list[LossResult]:
        target = f"127.0.0.1:{server.port}"
        async with AsyncLossClient(target, retry=NO_RETRY, upload_min_bytes=0) as client:
            return [await client.multiclass_hinge(scores, targets) for _ in range(2)]

    try:
        for _ in range(10):
            del server.asked[:]
            for answer in asyncio.run(twice()):
                _same(answer, expected)
            assert server.asked == ["ComputeUpload", "Compute", "Compute"]
    finally:
        server.close()


def test_small_requests_still_go_in_one_message() -> None:
    (scores, targets), _ = _inputs("multiclass_hinge")
    inputs, options = {"scores": scores, "targets": targets}, {"request_id": "r"}

    def split(min_bytes: int) -> pb.ComputeRequest | Upload:
        apart: list[tuple[str, memoryview]] = []
        request, _ = build_request("multiclass_hinge", inputs, options, scores_apart=apart)
        return split_request(request, apart, min_bytes)

    assert split(SYNC_UPLOAD_MIN_BYTES) == build_request("multiclass_hinge", inputs, options)[0]
    upload = split(scores.nbytes)
    assert isinstance(upload, Upload)
    assert upload.whole == build_request("multiclass_hinge", inputs, options)[0]
    assert not upload.request.multiclass_hinge.scores.data  # the bytes went apart only
