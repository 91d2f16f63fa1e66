"""The SDK against a server whose answers or statuses are wrong: typed errors, never wrong arrays.

A proxy in front of a real server tampers with each answer (or ends the call with a
status of its own); the SDK must fail that call with InternalError MALFORMED_ANSWER
(or the status's own typed error), on time, and never hand the caller an array made
from a wrong or missing answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from helpers.servers import InProcessServer, ServerThread

from hingeloss import (
    NO_RETRY,
    AsyncLossClient,
    InternalError,
    InvalidArgumentError,
    LossClient,
    OverloadedError,
    RetryPolicy,
)
from hingeloss._answers import MALFORMED
from hingeloss._channel import serving_status
from hingeloss.v1 import loss_service_pb2 as pb

SERVICE = "hingeloss.v1.LossService"
Tamper = Callable[[pb.ComputeResponse], None]

rng = np.random.default_rng(7)
SCORES = rng.standard_normal((6, 5)).astype(np.float32)
TARGETS = rng.integers(0, 5, 6)


class _Tampering(InProcessServer):
    """Forwards Compute and ComputeStream to a real server and changes each answer."""

    def __init__(self, upstream: str, tamper: Tamper) -> None:
        self.tamper = tamper
        super().__init__(upstream)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Compute": grpc.unary_unary_rpc_method_handler(
                    self._compute,
                    request_deserializer=pb.ComputeRequest.FromString,
                    response_serializer=pb.ComputeResponse.SerializeToString,
                ),
                "ComputeStream": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=pb.ComputeRequest.FromString,
                    response_serializer=pb.ComputeResponse.SerializeToString,
                ),
            },
        )

    def _answer(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        assert self.upstream is not None
        compute = self.upstream.unary_unary(
            f"/{SERVICE}/Compute",
            request_serializer=pb.ComputeRequest.SerializeToString,
            response_deserializer=pb.ComputeResponse.FromString,
        )
        response: pb.ComputeResponse = compute(request, timeout=10)
        return response

    def _compute(self, request: pb.ComputeRequest, context: Any) -> pb.ComputeResponse:
        response = self._answer(request)
        self.tamper(response)
        return response

    def _stream(self, requests: Iterator[pb.ComputeRequest], context: Any) -> Iterator[Any]:
        answers = [self._answer(request) for request in requests]
        for answer in answers:
            self.tamper(answer)
        yield from answers


@pytest.fixture
def tampering(shared_server: ServerThread) -> Iterator[Callable[[Tamper], str]]:
    started: list[_Tampering] = []

    def start(tamper: Tamper) -> str:
        started.append(_Tampering(shared_server.target, tamper))
        return f"127.0.0.1:{started[-1].port}"

    yield start
    for server in started:
        server.close()


def _dense(response: pb.ComputeResponse) -> pb.Tensor:
    return response.gradients[0].dense


def _short_data(response: pb.ComputeResponse) -> None:
    _dense(response).data = _dense(response).data[:-4]


def _no_data(response: pb.ComputeResponse) -> None:
    _dense(response).data = b""


def _other_shape(response: pb.ComputeResponse) -> None:
    del _dense(response).shape[:]
    _dense(response).shape.extend([5, 6])


def _other_dtype(response: pb.ComputeResponse) -> None:
    dense = _dense(response)
    dense.dtype = pb.DTYPE_FLOAT64
    dense.data = np.frombuffer(dense.data, dtype=np.float32).astype(np.float64).tobytes()


def _no_gradient(response: pb.ComputeResponse) -> None:
    del response.gradients[:]


def _two_gradients(response: pb.ComputeResponse) -> None:
    response.gradients.add().CopyFrom(response.gradients[0])


def _other_name(response: pb.ComputeResponse) -> None:
    response.gradients[0].input = "targets"


def _other_request(response: pb.ComputeResponse) -> None:
    response.request_id = "someone-else"


def _short_per_sample(response: pb.ComputeResponse) -> None:
    per_sample = response.per_sample_losses[0]
    per_sample.data = per_sample.data[:-4]
    per_sample.shape[0] -= 1


def _no_per_sample(response: pb.ComputeResponse) -> None:
    del response.per_sample_losses[:]


DENSE_TAMPERS = [
    _no_per_sample,
    _short_data,
    _no_data,
    _other_shape,
    _other_dtype,
    _no_gradient,
    _two_gradients,
    _other_name,
    _other_request,
    _short_per_sample,
]


@pytest.mark.parametrize("tamper", DENSE_TAMPERS, ids=lambda t: t.__name__.strip("_"))
@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_a_dense_answer_that_does_not_fit_fails_the_call(
    tampering: Callable[[Tamper], str], tamper: Tamper, array: str
) -> None:
    scores: Any = SCORES if array == "numpy" else torch.from_numpy(SCORES.copy())
    with (
        LossClient(tampering(tamper), retry=NO_RETRY, timeout=10) as client,
        pytest.raises(InternalError) as excinfo,
    ):
        client.multiclass_hinge(scores, TARGETS, return_per_sample=True)
    assert excinfo.value.reason == MALFORMED
    assert "does not fit its request" in excinfo.value.message


def test_the_same_answer_untouched_is_served(tampering: Callable[[Tamper], str]) -> None:
    with LossClient(tampering(lambda response: None), retry=NO_RETRY, timeout=10) as client:
        result = client.multiclass_hinge(SCORES, TARGETS, return_per_sample=True)
    assert result.grad.shape == SCORES.shape
    assert result.per_sample[0].shape == (6,)


def _sparse(response: pb.ComputeResponse) -> pb.RowSparseTensor:
    return response.gradients[0].row_sparse


def _set_indices(response: pb.ComputeResponse, rows: list[int]) -> None:
    sparse = _sparse(response)
    sparse.indices.data = np.asarray(rows, dtype="<i8").tobytes()


def _negative_row(response: pb.ComputeResponse) -> None:
    _set_indices(response, [-1, *np.frombuffer(_sparse(response).indices.data, "<i8")[1:]])


def _row_past_the_end(response: pb.ComputeResponse) -> None:
    _set_indices(response, [*np.frombuffer(_sparse(response).indices.data, "<i8")[:-1], 6])


def _rows_unsorted(response: pb.ComputeResponse) -> None:
    _set_indices(response, list(np.frombuffer(_sparse(response).indices.data, "<i8")[::-1]))


@pytest.mark.parametrize(
    "tamper", [_negative_row, _row_past_the_end, _rows_unsorted], ids=lambda t: t.__name__
)
def test_a_row_sparse_answer_with_bad_rows_fails_the_call(
    tampering: Callable[[Tamper], str], tamper: Tamper
) -> None:
    scores = SCORES.copy()
    scores[[2, 3], TARGETS[[2, 3]]] = 10.0  # rows 2 and 3 inactive: rows 0, 1, 4, 5 sent
    with (
        LossClient(tampering(tamper), retry=NO_RETRY, timeout=10) as client,
        pytest.raises(InternalError) as excinfo,
    ):
        client.multiclass_hinge(scores, TARGETS, gradient_format="row_sparse")
    assert excinfo.value.reason == MALFORMED


def _factored(response: pb.ComputeResponse) -> pb.FactoredGradient:
    return response.gradients[0].factored


def _short_mask(response: pb.ComputeResponse) -> None:
    _factored(response).mask = _factored(response).mask[:-1]


def _padding_bit(response: pb.ComputeResponse) -> None:
    mask = bytearray(_factored(response).mask)
    mask[0] |= 0x80  # 5 classes: bits 5 to 7 of each row's byte are padding
    _factored(response).mask = bytes(mask)


def _one_row_value(response: pb.ComputeResponse) -> None:
    values = _factored(response).row_values
    values.data = values.data[:4]
    del values.shape[:]
    values.shape.append(1)


@pytest.mark.parametrize(
    "tamper", [_short_mask, _padding_bit, _one_row_value], ids=lambda t: t.__name__
)
def test_a_factored_answer_that_does_not_fit_fails_the_call(
    tampering: Callable[[Tamper], str], tamper: Tamper
) -> None:
    with (
        LossClient(tampering(tamper), retry=NO_RETRY, timeout=10) as client,
        pytest.raises(InternalError) as excinfo,
    ):
        client.multiclass_hinge(SCORES, TARGETS, gradient_format="factored")
    assert excinfo.value.reason == MALFORMED


def _swap_ids(answers: list[pb.ComputeResponse]) -> None:
    first, second = answers[0].request_id, answers[1].request_id
    answers[0].request_id, answers[1].request_id = second, first


def test_stream_answers_for_other_requests_fail_their_calls(
    tampering: Callable[[Tamper], str],
) -> None:
    """Answers in another order than the requests: neither caller gets the other's."""
    swapped: list[pb.ComputeResponse] = []

    def tamper(response: pb.ComputeResponse) -> None:
        swapped.append(response)
        if len(swapped) == 2:
            _swap_ids(swapped)

    with LossClient(tampering(tamper), retry=NO_RETRY, timeout=10) as client:
        with client.stream() as stream:
            futures = [stream.multiclass_hinge(SCORES * k, TARGETS) for k in (1, 2)]
        for future in futures:
            error = future.exception(10)
            assert isinstance(error, InternalError), error
            assert "answers request" in error.message


class _Refusing(InProcessServer):
    """Ends every Compute and ComputeStream call with `code` and raw status details."""

    def __init__(self, code: grpc.StatusCode, details: bytes) -> None:
        self.code, self.details = code, details
        super().__init__()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Compute": grpc.unary_unary_rpc_method_handler(self._refuse),
                "ComputeStream": grpc.stream_stream_rpc_method_handler(self._refuse_stream),
            },
        )

    def _refuse(self, request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata((("grpc-status-details-bin", self.details),))
        context.abort(self.code, "refused")
        raise AssertionError("abort raises")  # which untyped grpc does not tell mypy

    def _refuse_stream(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        next(requests)
        self._refuse(b"", context)
        yield b""  # pragma: no cover - abort raises


@pytest.fixture
def refusing() -> Iterator[Callable[[grpc.StatusCode, bytes], str]]:
    started: list[_Refusing] = []

    def start(code: grpc.StatusCode, details: bytes) -> str:
        started.append(_Refusing(code, details))
        return f"127.0.0.1:{started[-1].port}"

    yield start
    for server in started:
        server.close()


GARBAGE = b"\xff\x00 not a google.rpc.Status"


def test_status_details_that_do_not_parse_leave_the_status(
    refusing: Callable[[grpc.StatusCode, bytes], str],
) -> None:
    target = refusing(grpc.StatusCode.INVALID_ARGUMENT, GARBAGE)
    with LossClient(target, retry=NO_RETRY, timeout=5) as client:
        with pytest.raises(InvalidArgumentError, match="refused"):
            client.multiclass_hinge(SCORES, TARGETS)
        with client.stream() as stream:
            future = stream.multiclass_hinge(SCORES, TARGETS)
        assert isinstance(future.exception(10), InvalidArgumentError)


async def test_status_details_that_do_not_parse_end_an_asyncio_stream_on_time(
    refusing: Callable[[grpc.StatusCode, bytes], str],
) -> None:
    """The stream's reader maps the status to an error and fails what is pending; it used
    to die on the details, leaving the caller waiting past its timeout."""
    target = refusing(grpc.StatusCode.INVALID_ARGUMENT, GARBAGE)
    async with AsyncLossClient(target, retry=NO_RETRY, timeout=5) as client:
        with pytest.raises(InvalidArgumentError):
            await client.multiclass_hinge(SCORES, TARGETS)
        async with client.stream() as stream:
            pending = stream.multiclass_hinge(SCORES, TARGETS)
            with pytest.raises(InvalidArgumentError):
                await asyncio.wait_for(pending, 10)


def _retry_info(seconds: int, nanos: int = 0) -> bytes:
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
    )
    status = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="refused")
    status.details.add().Pack(info)
    serialized: bytes = status.SerializeToString()
    return serialized


def test_a_negative_retry_delay_is_no_wait(
    refusing: Callable[[grpc.StatusCode, bytes], str],
) -> None:
    target = refusing(grpc.StatusCode.RESOURCE_EXHAUSTED, _retry_info(-5))
    policy = RetryPolicy(max_attempts=3, throttle_max_tokens=None)
    with LossClient(target, retry=policy, timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(OverloadedError) as excinfo:
            client.multiclass_hinge(SCORES, TARGETS)
    assert excinfo.value.retry_delay == -5
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("client_class", [LossClient, AsyncLossClient])
def test_a_retry_delay_past_the_longest_wait_ends_the_call(
    refusing: Callable[[grpc.StatusCode, bytes], str], client_class: Any
) -> None:
    """Without a deadline too: a server asking for years gets an answer now."""
    target = refusing(grpc.StatusCode.RESOURCE_EXHAUSTED, _retry_info(10**9))
    policy = RetryPolicy(max_attempts=3, max_retry_delay_s=5)

    started = time.monotonic()
    with pytest.raises(OverloadedError) as excinfo:
        _call_without_deadline(client_class, target, policy)
    assert excinfo.value.retry_delay == 10**9
    assert time.monotonic() - started < 3


def _call_without_deadline(client_class: Any, target: str, policy: RetryPolicy) -> None:
    if client_class is LossClient:
        with LossClient(target, retry=policy, timeout=None) as client:
            client.multiclass_hinge(SCORES, TARGETS)
        return

    async def call() -> None:
        async with AsyncLossClient(target, retry=policy, timeout=None) as client:
            await client.multiclass_hinge(SCORES, TARGETS)

    asyncio.run(call())


def test_an_unknown_serving_status_is_named_not_raised() -> None:
    answer = health_pb2.HealthCheckResponse(status=99)  # type: ignore[arg-type]
    assert serving_status(answer) == "unknown(99)"
