"""Every loss and option over a real channel, against the float64 numpy references."""

from __future__ import annotations

import secrets
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from helpers.cases import positional, random_inputs, sample_count
from helpers.references import LOSS_NAMES, reference

from hingeloss import LossClient

CASES: list[tuple[str, dict[str, Any]]] = [
    ("binary_hinge", {}),
    ("binary_hinge", {"margin": 0.5, "power": 2}),
    ("binary_hinge", {"kink": "one", "reduction": "sum"}),
    ("binary_hinge", {"label_encoding": "zero_one", "reduction": "none"}),
    ("binary_hinge", {"reduction": "weighted_mean"}),
    ("multiclass_hinge", {}),
    ("multiclass_hinge", {"class_normalization": "divide_by_num_classes", "power": 2}),
    ("multiclass_hinge", {"class_weights": True, "reduction": "sum", "kink": "one"}),
    ("multiclass_hinge", {"ignore_index": 2, "reduction": "mean"}),
    ("multiclass_hinge", {"ignore_index": 1, "reduction": "weighted_mean", "margin": 2.0}),
    ("crammer_singer", {}),
    ("crammer_singer", {"tie_break": "split_evenly", "power": 2}),
    ("crammer_singer", {"kink": "one", "reduction": "none", "margin": 0.0}),
    ("gan_discriminator", {}),
    ("gan_discriminator", {"combine": "pooled_mean"}),
    ("gan_discriminator", {"reduction": "weighted_mean", "kink": "one"}),
    ("gan_generator", {}),
    ("gan_generator", {"reduction": "sum"}),
    ("margin_ranking", {}),
    ("margin_ranking", {"margin": 0.0, "kink": "one", "reduction": "none"}),
]


@pytest.fixture
def rng() -> np.random.Generator:
    seed = secrets.randbits(32)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def _complete(
    loss: str, options: dict[str, Any], inputs: dict[str, np.ndarray], rng: Any
) -> dict[str, Any]:
    options = dict(options)
    if options.get("class_weights") is True:
        options["class_weights"] = rng.uniform(0.1, 2.0, size=inputs["scores"].shape[1])
    if options.get("reduction") == "weighted_mean":
        options["sample_weights"] = rng.uniform(0.0, 3.0, size=sample_count(loss, inputs))
    if options.get("label_encoding") == "zero_one":
        inputs["labels"] = (inputs["labels"] > 0).astype(np.int64)
    return options


def _check(result: Any, expected: Any, rtol: float = 1e-10) -> None:
    np.testing.assert_allclose(result.loss, expected.loss, rtol=rtol, atol=1e-12)
    assert len(result.grads) == len(expected.grads)
    for got, want in zip(result.grads, expected.grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-12)
    assert result.active_samples == sum(int(a.sum()) for a in expected.active)


@pytest.mark.parametrize(
    ("loss", "options"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
@pytest.mark.parametrize("integer_scores", [False, True], ids=["random", "on-margin"])
def test_loss_matches_reference(
    shared_server: Any,
    rng: np.random.Generator,
    loss: str,
    options: dict[str, Any],
    integer_scores: bool,
) -> None:
    rows = int(rng.integers(1, 40))
    inputs = random_inputs(
        loss,
        rng,
        rows,
        classes=int(rng.integers(2, 9)),
        fake_rows=int(rng.integers(1, 70)),
        integer_scores=integer_scores,
    )
    options = _complete(loss, options, inputs, rng)
    ignored = options.get("ignore_index")
    if ignored is not None and np.all(inputs["targets"] == ignored):
        # Every sample ignored is refused (test_invalid_input): keep one counted here.
        inputs["targets"][0] = (ignored + 1) % inputs["scores"].shape[1]
    with LossClient(shared_server.target) as client:
        result = client.compute(loss, *positional(loss, inputs), return_per_sample=True, **options)
    expected = reference(loss, inputs, options)
    _check(result, expected)
    for got, want in zip(result.per_sample, expected.per_sample, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert result.samples == sum(len(a) for a in expected.active) - (
        int(np.sum(inputs["targets"] == options["ignore_index"]))
        if "ignore_index" in options
        else 0
    )


@pytest.mark.parametrize("classes", [2, 10_000])
def test_multiclass_edge_sizes(shared_server: Any, rng: np.random.Generator, classes: int) -> None:
    rows = 1 if classes > 2 else 17
    inputs = random_inputs("multiclass_hinge", rng, rows, classes=classes)
    with LossClient(shared_server.target) as client:
        for loss in ("multiclass_hinge", "crammer_singer"):
            result = client.compute(loss, *positional(loss, inputs))
            _check(result, reference(loss, inputs, {}))


def test_divide_by_num_classes_is_torch_multi_margin_loss(
    shared_server: Any, rng: np.random.Generator
) -> None:
    inputs = random_inputs("multiclass_hinge", rng, 23, classes=7)
    weight = rng.uniform(0.2, 2.0, size=7)
    logits = torch.tensor(inputs["scores"], requires_grad=True)
    targets = torch.tensor(inputs["targets"])
    for power in (1, 2):
        logits.grad = None
        expected = torch.nn.functional.multi_margin_loss(
            logits, targets, p=power, weight=torch.tensor(weight)
        )
        expected.backward()  # type: ignore[no-untyped-call]
        with LossClient(shared_server.target) as client:
            result = client.multiclass_hinge(
                logits.detach(),
                targets,
                power=power,
                class_weights=weight,
                class_normalization="divide_by_num_classes",
            )
        torch.testing.assert_close(
            torch.tensor(result.loss, dtype=torch.float64),
            expected.detach(),
            rtol=1e-10,
            atol=1e-12,
        )
        torch.testing.assert_close(result.grad, logits.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_matches_float32(
    shared_server: Any, rng: np.random.Generator, dtype: torch.dtype
) -> None:
    inputs = random_inputs("multiclass_hinge", rng, 64, classes=10)
    scores = torch.tensor(inputs["scores"]).to(dtype)
    with LossClient(shared_server.target) as client:
        result = client.multiclass_hinge(scores, inputs["targets"])
        exact = reference("multiclass_hinge", {**inputs, "scores": scores.double().numpy()}, {})
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert result.grad.dtype == dtype
    assert result.resolved["compute_dtype"] == "float32"
    np.testing.assert_allclose(result.loss, exact.loss, rtol=tolerance)
    np.testing.assert_allclose(
        result.grad.double().numpy(), exact.grads[0], rtol=tolerance, atol=tolerance / 10
    )


def test_resolved_options_are_echoed(shared_server: Any, rng: np.random.Generator) -> None:
    inputs = random_inputs("multiclass_hinge", rng, 4)
    with LossClient(shared_server.target) as client:
        default = client.multiclass_hinge(inputs["scores"], inputs["targets"])
        torch_like = client.multiclass_hinge(
            inputs["scores"],
            inputs["targets"],
            class_normalization="divide_by_num_classes",
            kink="one",
            reduction="sum",
            margin=0.25,
        )
        ranking = client.margin_ranking(
            inputs["scores"][:, 0], inputs["scores"][:, 1], np.ones(4, dtype=np.int64)
        )
    assert default.resolved == {
        "loss": "multiclass_hinge",
        "reduction": "mean",
        "gradient_format": "dense",
        "kink": "zero",
        "class_normalization": "sum_over_classes",
        "margin": 1.0,
        "power": 1,
        "compute_dtype": "float64",
    }
    assert torch_like.resolved["class_normalization"] == "divide_by_num_classes"
    assert torch_like.resolved["kink"] == "one"
    assert torch_like.resolved["reduction"] == "sum"
    assert torch_like.resolved["margin"] == 0.25
    assert ranking.resolved["margin"] == 1.0
    assert ranking.resolved["kink"] == "zero"


def test_gan_discriminator_uneven_sets(shared_server: Any) -> None:
    """N_r != N_f: SUM_OF_MEANS and POOLED_MEAN really differ, and both are right."""
    rng = np.random.default_rng()
    inputs = {"real_scores": rng.normal(size=3) - 2.0, "fake_scores": rng.normal(size=64)}
    with LossClient(shared_server.target) as client:
        means = client.gan_discriminator(inputs["real_scores"], inputs["fake_scores"])
        pooled = client.gan_discriminator(
            inputs["real_scores"], inputs["fake_scores"], combine="pooled_mean"
        )
    _check(means, reference("gan_discriminator", inputs, {}))
    _check(pooled, reference("gan_discriminator", inputs, {"combine": "pooled_mean"}))
    assert abs(means.loss / 2 - pooled.loss) > 1e-3


def _clear_the_margin_in_row_0(loss: str, inputs: dict[str, np.ndarray]) -> None:
    """Row 0 of every score input far on the right side of the margin: a zero gradient row.

    Random rows are all active now and then (about one run in a hundred at 50 rows).
    """
    if loss == "multiclass_hinge":
        inputs["scores"][0, inputs["targets"][0]] += 100.0
    elif loss == "binary_hinge":
        inputs["scores"][0] = 100.0 * inputs["labels"][0]
    elif loss == "gan_discriminator":
        inputs["real_scores"][0], inputs["fake_scores"][0] = 100.0, -100.0
    else:
        inputs["scores_a"][0] = inputs["scores_b"][0] + 100.0 * inputs["labels"][0]


@pytest.mark.parametrize(
    "loss", ["multiclass_hinge", "binary_hinge", "gan_discriminator", "margin_ranking"]
)
def test_row_sparse_gradient_decodes_to_dense(
    shared_server: Any, rng: np.random.Generator, loss: str
) -> None:
    inputs = random_inputs(loss, rng, 50, classes=6, fake_rows=31)
    _clear_the_margin_in_row_0(loss, inputs)
    with LossClient(shared_server.target) as client:
        dense = client.compute(loss, *positional(loss, inputs))
        sparse = client.compute(loss, *positional(loss, inputs), gradient_format="row_sparse")
        none = client.compute(loss, *positional(loss, inputs), gradient_format="none")
    for got, want, (indices, values) in zip(
        sparse.grads, dense.grads, sparse.sparse_grads, strict=True
    ):
        np.testing.assert_array_equal(got, want)
        nonzero_rows = np.flatnonzero(np.abs(want.reshape(len(want), -1)).sum(axis=1))
        np.testing.assert_array_equal(indices, nonzero_rows)
        assert len(values) == len(nonzero_rows) < len(want)
    assert none.grads == ()
    assert none.loss == dense.loss


def test_gan_generator_is_never_sparse(shared_server: Any, rng: np.random.Generator) -> None:
    fake = rng.normal(size=20) + 10.0
    with LossClient(shared_server.target) as client:
        result = client.gan_generator(fake)
    assert result.active_samples == result.samples == 20
    np.testing.assert_allclose(result.grad, np.full(20, -1 / 20), rtol=1e-12)


def test_server_info(shared_server: Any) -> None:
    with LossClient(shared_server.target) as client:
        info = client.server_info()
        health = client.health()
    assert set(info.losses) == {
        "binary_hinge",
        "multiclass_hinge",
        "crammer_singer",
        "gan_discriminator",
        "gan_generator",
        "margin_ranking",
    }
    assert list(info.devices) == ["cpu"]
    assert info.limits.max_message_bytes == 512 << 20
    assert info.version
    assert info.torch_version == torch.__version__
    assert health == "SERVING"


def test_reflection_lists_the_services(shared_server: Any) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(shared_server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"hingeloss.v1.LossService", "grpc.health.v1.Health"} <= services


def test_gzip_compression_gives_the_same_answer(shared_server: Any) -> None:
    inputs = random_inputs("multiclass_hinge", np.random.default_rng(), 64, classes=20)
    with LossClient(shared_server.target, compression=grpc.Compression.Gzip) as client:
        compressed = client.multiclass_hinge(inputs["scores"], inputs["targets"])
    _check(compressed, reference("multiclass_hinge", inputs, {}))


def test_health_has_both_names_and_unknown_is_not_found(shared_server: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(shared_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "hingeloss.v1.LossService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_stream_error_names_the_failing_request(shared_server: Any) -> None:
    from hingeloss._errors import from_rpc_error
    from hingeloss._requests import build_request
    from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc

    good = {"scores": np.array([0.5, -1.0]), "labels": np.array([1, 1])}
    bad = {"scores": np.array([0.5, -1.0]), "labels": np.array([1, 3])}
    requests = [
        build_request("binary_hinge", inputs, {"request_id": rid})[0]
        for rid, inputs in (("a", good), ("b", bad), ("c", good))
    ]
    with grpc.insecure_channel(shared_server.target) as channel:
        stream = pb_grpc.LossServiceStub(channel).ComputeStream(iter(requests), timeout=10)  # type: ignore[no-untyped-call]
        first = next(stream)
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
    assert first.request_id == "a"
    error = from_rpc_error(info.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "binary_hinge.labels[1]" in str(error)
    details = _error_info(info.value)
    assert dict(details.metadata) == {"streamIndex": "1", "requestId": "b"}


def _error_info(rpc_error: grpc.RpcError) -> Any:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(rpc_error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


def test_unary_error_carries_the_request_id(shared_server: Any) -> None:
    from hingeloss._requests import build_request
    from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc

    request, _ = build_request(
        "binary_hinge",
        {"scores": np.array([np.nan]), "labels": np.array([1])},
        {"request_id": "x" * 500},
    )
    with (
        grpc.insecure_channel(shared_server.target) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.LossServiceStub(channel).Compute(request, timeout=10)  # type: ignore[no-untyped-call]
    assert dict(_error_info(info.value).metadata) == {"requestId": "x" * 64}


def test_server_info_reports_every_limit(shared_server: Any) -> None:
    from hingeloss_server.config import BatchingConfig, LimitsConfig

    with LossClient(shared_server.target) as client:
        limits = client.server_info().limits
    assert limits.max_request_bytes == LimitsConfig().max_request_bytes
    assert limits.max_batch_bytes == BatchingConfig().max_batch_bytes
    assert limits.max_request_rows == LimitsConfig().max_request_rows


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_resolved_options_pass_back_as_the_calls_keywords(shared_server: Any, loss: str) -> None:
    """`result.resolved` names each option as the call does: fed back, it resolves the same."""
    inputs = positional(loss, random_inputs(loss, np.random.default_rng(), 6))
    with LossClient(shared_server.target) as client:
        first = client.compute(loss, *inputs)
        options = {k: v for k, v in first.resolved.items() if k not in ("loss", "compute_dtype")}
        again = client.compute(loss, *inputs, **options)
    assert again.resolved == first.resolved
    assert again.loss == first.loss
