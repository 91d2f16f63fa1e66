"""Every input LOSSES.md says to reject: INVALID_ARGUMENT naming the field and first bad index."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from helpers.servers import server_config

from hingeloss import InvalidArgumentError, LossClient
from hingeloss import _tensors as tensors
from hingeloss._errors import from_rpc_error
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc
from hingeloss_server.config import LimitsConfig

enc = tensors.from_numpy
SCORES = np.array([0.5, -1.0, 2.0, 0.0])
LABELS = np.array([1, -1, 1, 1])
MATRIX = np.arange(12, dtype=np.float64).reshape(4, 3) / 5
TARGETS = np.array([0, 1, 2, 1])


def _raw(channel: grpc.Channel, request: pb.ComputeRequest) -> InvalidArgumentError:
    stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(request, timeout=10)
    error = from_rpc_error(info.value)
    assert isinstance(error, InvalidArgumentError), error
    return error


def _sdk(target: str, call: Callable[[LossClient], Any]) -> InvalidArgumentError:
    with LossClient(target) as client, pytest.raises(InvalidArgumentError) as info:
        call(client)
    return info.value


def _field(error: InvalidArgumentError) -> str:
    assert len(error.field_violations) == 1
    assert error.field_violations[0].field in str(error)
    return error.field_violations[0].field


def _with(array: np.ndarray, index: Any, value: float) -> np.ndarray:
    copy = np.array(array, dtype=np.float64)
    copy[index] = value
    return copy


SDK_CASES: dict[str, tuple[Callable[[LossClient], Any], str, str]] = {
    "target below 0": (
        lambda c: c.multiclass_hinge(MATRIX, np.array([0, -1, 2, 1])),
        "multiclass_hinge.targets[1]",
        "outside [0, 3)",
    ),
    "target at C": (
        lambda c: c.crammer_singer(MATRIX, np.array([0, 1, 3, 1])),
        "crammer_singer.targets[2]",
        "outside [0, 3)",
    ),
    "label 0 with plus-minus-one": (
        lambda c: c.binary_hinge(SCORES, np.array([1, -1, 0, 1])),
        "binary_hinge.labels[2]",
        "-1 or +1",
    ),
    "label -1 with zero-one": (
        lambda c: c.binary_hinge(SCORES, np.array([1, -1, 0, 1]), label_encoding="zero_one"),
        "binary_hinge.labels[1]",
        "0 or 1",
    ),
    "label 2 with zero-one": (
        lambda c: c.binary_hinge(SCORES, np.array([1, 0, 0, 2]), label_encoding="zero_one"),
        "binary_hinge.labels[3]",
        "0 or 1",
    ),
    "label 0.5": (
        lambda c: c.binary_hinge(SCORES, np.array([1.0, 0.5, -1.0, 1.0])),
        "binary_hinge.labels[1]",
        "-1 or +1",
    ),
    "ranking label 0": (
        lambda c: c.margin_ranking(SCORES, SCORES, np.array([1, 1, 1, 0])),
        "margin_ranking.labels[3]",
        "-1 or +1",
    ),
    "NaN score": (
        lambda c: c.binary_hinge(_with(SCORES, 2, np.nan), LABELS),
        "binary_hinge.scores[2]",
        "finite",
    ),
    "Inf score in a matrix": (
        lambda c: c.multiclass_hinge(_with(MATRIX, (3, 1), -np.inf), TARGETS),
        "multiclass_hinge.scores[3][1]",
        "finite",
    ),
    "Inf fake score": (
        lambda c: c.gan_discriminator(SCORES, _with(SCORES, 0, np.inf)),
        "gan_discriminator.fake_scores[0]",
        "finite",
    ),
    "NaN margin": (
        lambda c: c.binary_hinge(SCORES, LABELS, margin=float("nan")),
        "binary_hinge.margin",
        "finite",
    ),
    "NaN class weight": (
        lambda c: c.multiclass_hinge(MATRIX, TARGETS, class_weights=np.array([1.0, np.nan, 1])),
        "multiclass_hinge.target_class_weights[1]",
        "finite",
    ),
    "NaN sample weight": (
        lambda c: c.binary_hinge(
            SCORES, LABELS, reduction="weighted_mean", sample_weights=_with(np.ones(4), 3, np.nan)
        ),
        "sample_weights[3]",
        "finite",
    ),
    "float32 squared hinge overflows": (
        lambda c: c.binary_hinge(
            np.array([1.0, -3e30], dtype=np.float32), np.array([1, 1]), power=2
        ),
        "binary_hinge.scores[1]",
        "overflow",
    ),
    "float16 gradient overflows": (
        lambda c: c.binary_hinge(
            torch.tensor([-60000.0], dtype=torch.float16), np.array([1]), power=2
        ),
        "binary_hinge.scores[0]",
        "overflow",
    ),
    "empty batch": (
        lambda c: c.binary_hinge(np.zeros(0), np.zeros(0, dtype=np.int64)),
        "binary_hinge.scores",
        "empty",
    ),
    "empty fake set": (
        lambda c: c.gan_discriminator(SCORES, np.zeros(0)),
        "gan_discriminator.fake_scores",
        "empty",
    ),
    "every sample ignored": (
        lambda c: c.multiclass_hinge(MATRIX, np.full(4, -100), ignore_index=-100),
        "multiclass_hinge.targets",
        "ignored",
    ),
    "zero total weight": (
        lambda c: c.binary_hinge(
            SCORES, LABELS, reduction="weighted_mean", sample_weights=np.zeros(4)
        ),
        "sample_weights",
        "sum to 0",
    ),
    "one class": (
        lambda c: c.multiclass_hinge(MATRIX[:, :1], np.zeros(4, dtype=np.int64)),
        "multiclass_hinge.scores.shape[1]",
        "at least 2 classes",
    ),
    "targets vs N": (
        lambda c: c.multiclass_hinge(MATRIX, TARGETS[:3]),
        "multiclass_hinge.targets.shape",
        "4 rows",
    ),
    "a vs b": (
        lambda c: c.margin_ranking(SCORES, SCORES[:3], LABELS),
        "margin_ranking.scores_b.shape",
        "4 rows",
    ),
    "labels vs a": (
        lambda c: c.margin_ranking(SCORES, SCORES, LABELS[:2]),
        "margin_ranking.labels.shape",
        "4 rows",
    ),
    "1-D scores for multiclass": (
        lambda c: c.multiclass_hinge(SCORES, TARGETS),
        "multiclass_hinge.scores.shape",
        "2 dimension",
    ),
    "0-d numpy scores": (
        lambda c: c.binary_hinge(np.float64(0.3), np.float64(1.0)),
        "binary_hinge.scores.shape",
        "1 dimension",
    ),
    "0-d torch scores": (
        lambda c: c.gan_generator(torch.tensor(0.3)),
        "gan_generator.fake_scores.shape",
        "1 dimension",
    ),
    "class weights of the wrong length": (
        lambda c: c.multiclass_hinge(MATRIX, TARGETS, class_weights=np.ones(4)),
        "multiclass_hinge.target_class_weights.shape",
        "one weight per class",
    ),
    "negative class weight": (
        lambda c: c.multiclass_hinge(MATRIX, TARGETS, class_weights=np.array([1.0, -0.5, 1.0])),
        "multiclass_hinge.target_class_weights[1]",
        ">= 0",
    ),
    "sample weights of the wrong length": (
        lambda c: c.binary_hinge(
            SCORES, LABELS, reduction="weighted_mean", sample_weights=np.ones(5)
        ),
        "sample_weights.shape",
        "4 entries",
    ),
    "negative sample weight": (
        lambda c: c.binary_hinge(
            SCORES, LABELS, reduction="sum", sample_weights=np.array([1.0, 1.0, -1.0, 1.0])
        ),
        "sample_weights[2]",
        ">= 0",
    ),
    "power 3": (
        lambda c: c.crammer_singer(MATRIX, TARGETS, power=3),
        "crammer_singer.power",
        "1 or 2",
    ),
    "integer scores": (
        lambda c: c.binary_hinge(np.array([1, 2, 3, 4], dtype=np.int32), LABELS),
        "binary_hinge.scores.dtype",
        "float32",
    ),
    "float targets": (
        lambda c: c.multiclass_hinge(MATRIX, TARGETS.astype(np.float32)),
        "multiclass_hinge.targets.dtype",
        "int32 or int64",
    ),
    "real vs fake dtype": (
        lambda c: c.gan_discriminator(SCORES, SCORES.astype(np.float32)),
        "gan_discriminator.fake_scores.dtype",
        "must equal",
    ),
}


@pytest.mark.parametrize("case", list(SDK_CASES))
def test_rejected_over_the_sdk(shared_server: Any, case: str) -> None:
    call, field, words = SDK_CASES[case]
    error = _sdk(shared_server.target, call)
    assert _field(error) == field
    assert words in error.field_violations[0].description


def _request(**loss: Any) -> pb.ComputeRequest:
    return pb.ComputeRequest(request_id="raw", **loss)


RAW_CASES: dict[str, tuple[pb.ComputeRequest, str]] = {
    "no loss": (_request(), "loss"),
    "unknown reduction": (
        _request(binary_hinge=pb.BinaryHinge(scores=enc(SCORES), labels=enc(LABELS)), reduction=99),
        "reduction",
    ),
    "unknown gradient format": (
        _request(
            binary_hinge=pb.BinaryHinge(scores=enc(SCORES), labels=enc(LABELS)), gradient_format=7
        ),
        "gradient_format",
    ),
    "unknown kink": (
        _request(
            multiclass_hinge=pb.MulticlassHinge(
                scores=enc(MATRIX),
                targets=enc(TARGETS),
                kink_subgradient=5,  # type: ignore[arg-type]
            )
        ),
        "multiclass_hinge.kink_subgradient",
    ),
    "unknown label encoding": (
        _request(
            binary_hinge=pb.BinaryHinge(scores=enc(SCORES), labels=enc(LABELS), label_encoding=9)  # type: ignore[arg-type]
        ),
        "binary_hinge.label_encoding",
    ),
    "unknown tie break": (
        _request(
            crammer_singer=pb.CrammerSinger(scores=enc(MATRIX), targets=enc(TARGETS), tie_break=3)  # type: ignore[arg-type]
        ),
        "crammer_singer.tie_break",
    ),
    "unknown dtype": (
        _request(
            gan_generator=pb.GanGenerator(fake_scores=pb.Tensor(dtype=42, shape=[1], data=b"1234"))  # type: ignore[arg-type]
        ),
        "gan_generator.fake_scores.dtype",
    ),
    "missing scores": (
        _request(binary_hinge=pb.BinaryHinge(labels=enc(LABELS))),
        "binary_hinge.scores",
    ),
    "data shorter than the shape": (
        _request(
            gan_generator=pb.GanGenerator(
                fake_scores=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], data=b"\0" * 15)
            )
        ),
        "gan_generator.fake_scores.data",
    ),
    "negative dimension": (
        _request(
            multiclass_hinge=pb.MulticlassHinge(
                scores=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-2, 3], data=b""),
                targets=enc(TARGETS),
            )
        ),
        "multiclass_hinge.scores.shape[0]",
    ),
    "2^40 elements in 12 bytes": (
        _request(
            gan_generator=pb.GanGenerator(
                fake_scores=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 40], data=b"\0" * 12)
            )
        ),
        "gan_generator.fake_scores.shape[0]",
    ),
    "product beyond the element limit": (
        _request(
            crammer_singer=pb.CrammerSinger(
                scores=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20], data=b"\0" * 12),
                targets=enc(TARGETS),
            )
        ),
        "crammer_singer.scores.shape",
    ),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_rejected_on_the_wire(shared_server: Any, case: str) -> None:
    request, field = RAW_CASES[case]
    with grpc.insecure_channel(shared_server.target) as channel:
        error = _raw(channel, request)
    assert _field(error) == field


def test_huge_claimed_shape_is_refused_before_allocating(make_server: Any) -> None:
    """With the element limit out of the way, the byte count still refuses it first."""
    limits = LimitsConfig(max_request_rows=1 << 62, max_request_elements=1 << 62)
    server = make_server(server_config(limits=limits))
    request = _request(
        gan_generator=pb.GanGenerator(
            fake_scores=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 40], data=b"\0" * 12)
        )
    )
    valid_result: list[Any] = []

    def valid_call() -> None:
        with LossClient(server.target) as client:
            valid_result.append(client.binary_hinge(SCORES, LABELS))

    thread = threading.Thread(target=valid_call)
    thread.start()
    with grpc.insecure_channel(server.target) as channel:
        error = _raw(channel, request)
    thread.join()
    assert _field(error) == "gan_generator.fake_scores.data"
    assert "need 4398046511104" in error.field_violations[0].description
    expected = np.maximum(0.0, 1.0 - LABELS * SCORES).mean()
    assert valid_result[0].loss == pytest.approx(expected, rel=1e-12)


def test_server_keeps_serving_after_bad_input(shared_server: Any) -> None:
    with LossClient(shared_server.target) as client:
        for _ in range(3):
            with pytest.raises(InvalidArgumentError):
                client.binary_hinge(_with(SCORES, 0, np.nan), LABELS)
        result = client.binary_hinge(SCORES, LABELS)
    assert result.loss == pytest.approx(np.maximum(0.0, 1.0 - LABELS * SCORES).mean(), rel=1e-12)


def test_overflow_names_the_first_bad_row(shared_server: Any) -> None:
    scores = np.array([0.5, 1.0, -3e30, -4e30], dtype=np.float32)
    error = _sdk(shared_server.target, lambda c: c.binary_hinge(scores, np.ones(4), power=2))
    assert _field(error) == "binary_hinge.scores[2]"


def test_float16_per_sample_overflow_is_caught(shared_server: Any) -> None:
    """Finite float32 losses that overflow float16 on the way back are refused too."""
    scores = torch.tensor([-300.0, 0.5], dtype=torch.float16)
    error = _sdk(
        shared_server.target,
        lambda c: c.binary_hinge(scores, np.array([1, 1]), power=2, reduction="none"),
    )
    assert _field(error) == "binary_hinge.scores[0]"
    assert "overflow" in error.field_violations[0].description


def test_ignored_rows_never_overflow(shared_server: Any) -> None:
    scores = np.array([[0.0, 1.0, 2.0], [-3e38, 3e38, 0.0]], dtype=np.float32)
    with LossClient(shared_server.target) as client:
        result = client.multiclass_hinge(scores, np.array([0, -100]), ignore_index=-100)
    assert result.loss == pytest.approx(5.0)
    assert result.samples == 1
    np.testing.assert_array_equal(result.grad[1], np.zeros(3, dtype=np.float32))


def test_float16_overflows_only_in_what_the_caller_receives(shared_server: Any) -> None:
    """Per-sample sums past float16's range are refused only when the caller asks for them.

    8 rows of 131072 classes near 0: each row's Weston-Watkins sum is about 131071,
    past float16's 65504, but nobody asked for per-sample losses; the loss (float64)
    and every gradient entry (|g| <= 131071 / 8) fit.
    """
    rng = np.random.default_rng()
    rows, classes = 8, 131072
    scores = torch.from_numpy(rng.uniform(-0.01, 0.01, size=(rows, classes))).to(torch.float16)
    targets = rng.integers(0, classes, size=rows)
    with LossClient(shared_server.target) as client:
        result = client.multiclass_hinge(scores, targets)
        error = _sdk(
            shared_server.target,
            lambda c: c.multiclass_hinge(scores, targets, return_per_sample=True),
        )
    exact = scores.double().numpy()
    z = exact - exact[np.arange(rows), targets][:, None] + 1.0
    z[np.arange(rows), targets] = 0.0
    assert result.loss == pytest.approx(np.maximum(z, 0.0).sum() / rows, rel=1e-3)
    assert result.grad.dtype == torch.float16
    assert torch.isfinite(result.grad).all()
    assert _field(error) == "multiclass_hinge.scores[0]"
    assert "overflow" in error.field_violations[0].description
