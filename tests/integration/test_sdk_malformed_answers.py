"""The SDK against a server whose answers are wrong: typed errors, never wrong arrays.

A proxy in front of a real server tampers with each answer; the SDK must fail that
call with InternalError MALFORMED_ANSWER, and never hand the caller an array made
from a wrong or missing answer (odd statuses: test_sdk_statuses.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from helpers.cases import positional, random_inputs
from helpers.servers import InProcessServer, ServerThread

from hingeloss import (
    NO_RETRY,
    InternalError,
    LossClient,
)
from hingeloss._answers import MALFORMED
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
def tampering(
    shared_server: ServerThread, serve_in_process: Callable[[InProcessServer], str]
) -> Callable[[Tamper], str]:
    """Starts a tampering proxy in front of the shared server; gives its target."""
    return lambda tamper: serve_in_process(_Tampering(shared_server.target, tamper))


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


def _other_loss(response: pb.ComputeResponse) -> None:
    response.resolved.loss = "crammer_singer"


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
    _other_loss,
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


def _short_indices(response: pb.ComputeResponse) -> None:
    _sparse(response).indices.data = _sparse(response).indices.data[:-1]


@pytest.mark.parametrize(
    "tamper",
    [_negative_row, _row_past_the_end, _rows_unsorted, _short_indices],
    ids=lambda t: t.__name__,
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
    "tamper", [_short_mask, _padding_bit, _one_row_value, _other_loss], ids=lambda t: t.__name__
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


@pytest.mark.parametrize(
    ("asked", "claimed"),
    [("first_index", pb.TIE_BREAK_SPLIT_EVENLY), ("split_evenly", pb.TIE_BREAK_FIRST_INDEX)],
)
def test_a_factored_answer_that_breaks_ties_otherwise_fails_the_call(
    shared_server: ServerThread, tampering: Callable[[Tamper], str], asked: str, claimed: int
) -> None:
    """The tie-break decides how a Crammer-Singer row's value spreads over its mask."""
    scores = np.zeros((4, 5), dtype=np.float32)  # every competitor tied: masks of 4 bits
    targets = np.arange(4)

    def claim(response: pb.ComputeResponse) -> None:
        response.resolved.tie_break = claimed  # type: ignore[assignment]

    with LossClient(shared_server.target, retry=NO_RETRY, timeout=10) as client:
        answer = client.crammer_singer(scores, targets, tie_break=asked, gradient_format="factored")
        assert answer.grad.shape == (4, 5)
    with (
        LossClient(tampering(claim), retry=NO_RETRY, timeout=10) as client,
        pytest.raises(InternalError) as excinfo,
    ):
        client.crammer_singer(scores, targets, tie_break=asked, gradient_format="factored")
    assert excinfo.value.reason == MALFORMED
    assert "breaks ties" in excinfo.value.message


def _one_set_fewer(response: pb.ComputeResponse) -> None:
    del response.per_sample_losses[-1]


def _one_set_more(response: pb.ComputeResponse) -> None:
    response.per_sample_losses.add().CopyFrom(response.per_sample_losses[0])


@pytest.mark.parametrize(
    ("loss", "tamper"),
    [
        ("gan_discriminator", _one_set_fewer),  # its real and fake samples: two sets
        ("margin_ranking", _one_set_more),  # its two score inputs share one set
        ("binary_hinge", _one_set_more),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_an_answer_with_other_sets_of_per_sample_losses_fails_the_call(
    shared_server: ServerThread, tampering: Callable[[Tamper], str], loss: str, tamper: Tamper
) -> None:
    inputs = positional(loss, random_inputs(loss, rng, 6))
    with LossClient(shared_server.target, retry=NO_RETRY, timeout=10) as client:
        untouched = client.compute(loss, *inputs, reduction="none").per_sample
    assert untouched is not None
    assert len(untouched) == (2 if loss == "gan_discriminator" else 1)
    with (
        LossClient(tampering(tamper), retry=NO_RETRY, timeout=10) as client,
        pytest.raises(InternalError) as excinfo,
    ):
        client.compute(loss, *inputs, reduction="none")
    assert excinfo.value.reason == MALFORMED
    assert "sets of per-sample losses" in excinfo.value.message


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
