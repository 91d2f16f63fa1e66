"""Factored gradients over a real server: the SDK's expansion is the dense gradient, bit for bit.

Every case sends the same inputs with the dense and the factored format at once (a
gathering window makes them share a batch: the dense gradient is computed, the
factored job's is not downloaded), then twice factored (batches that compute no
dense gradient at all). The property test at the end builds such batches itself,
through the server's code without gRPC, so that both kinds are certain. Bit for bit
means the bytes: -0.0 and 0.0 differ here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from helpers.servers import ServerThread, server_config
from hypothesis import given, settings
from hypothesis import strategies as st

from hingeloss import AsyncLossClient, InvalidArgumentError, LossClient
from hingeloss import _factored as factored
from hingeloss import _tensors as tensors
from hingeloss._requests import InputKind, build_request
from hingeloss._results import decode_response
from hingeloss.torch import RemoteHingeLoss
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import BatchingConfig, LimitsConfig, WorkerConfig
from hingeloss_server.engine.compute import compute_batch
from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.engine.validation import prepare
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.transport.response_codec import encode_response

LOSSES = ("multiclass_hinge", "crammer_singer")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    # A gathering window makes concurrent requests share batches on 2 cores.
    thread = ServerThread(server_config(batching=BatchingConfig(max_batch_delay_us=5000))).start()
    yield thread
    thread.stop()


@dataclass(frozen=True)
class Case:
    """One request's inputs and options, by name for the test ids."""

    name: str
    loss: str
    rows: int = 6
    classes: int = 7
    dtype: str = "float32"
    # normal: random; ties: small integers (kinks and tied maxima); inactive: every
    # margin holds; active: all scores equal (every competitor inside the margin).
    scores: str = "normal"
    options: dict[str, Any] = field(default_factory=dict)
    ignored_rows: tuple[int, ...] = ()
    sample_weights: tuple[float, ...] = ()


def _cases() -> list[Case]:
    cases = []
    for loss in LOSSES:
        cases += [
            Case(f"{loss}-default", loss),
            Case(f"{loss}-kink-one-ties", loss, scores="ties", options={"kink": "one"}),
            Case(
                f"{loss}-margin-0-kink-one",
                loss,
                scores="ties",
                options={"margin": 0.0, "kink": "one"},
            ),
            Case(f"{loss}-margin-0.3", loss, options={"margin": 0.3}),
            Case(f"{loss}-b1", loss, rows=1),
            Case(f"{loss}-c2", loss, classes=2, rows=9),
            Case(f"{loss}-c8", loss, classes=8, rows=5),
            Case(f"{loss}-c10000", loss, classes=10_000, rows=3),
            Case(f"{loss}-all-inactive", loss, scores="inactive"),
            Case(f"{loss}-all-active", loss, scores="active"),
            Case(f"{loss}-sum", loss, options={"reduction": "sum"}),
            Case(f"{loss}-none", loss, options={"reduction": "none"}),
            Case(
                f"{loss}-weighted",
                loss,
                options={"reduction": "weighted_mean"},
                sample_weights=(0.5, 0.0, 3.0, -0.0, 1e-3, 2.0),
            ),
            Case(
                f"{loss}-weights-ignored-by-mean",
                loss,
                sample_weights=(0.5, 1.0, 3.0, 1.0, 1e-3, 2.0),
            ),
        ]
        for dtype in ("float16", "float64"):
            cases.append(Case(f"{loss}-{dtype}", loss, dtype=dtype, scores="ties"))
    cases += [
        Case(
            "multiclass_hinge-class-weights",
            "multiclass_hinge",
            options={"class_weights": [0.5, 2.0, 0.0, 1.0, 3.0, 1e-3, 1.0]},
        ),
        Case(
            "multiclass_hinge-divide-by-classes",
            "multiclass_hinge",
            options={"class_normalization": "divide_by_num_classes"},
        ),
        Case(
            "multiclass_hinge-weights-divided",
            "multiclass_hinge",
            dtype="float16",
            options={
                "class_weights": [0.5, 2.0, 0.0, 1.0, 3.0, 1e-3, 1.0],
                "class_normalization": "divide_by_num_classes",
            },
        ),
        Case(
            "multiclass_hinge-ignore-index",
            "multiclass_hinge",
            options={"ignore_index": -100},
            ignored_rows=(1, 4),
        ),
        Case(
            "multiclass_hinge-ignore-a-class",
            "multiclass_hinge",
            options={"ignore_index": 3, "reduction": "weighted_mean"},
            ignored_rows=(0, 5),
            sample_weights=(1.0, 2.0, 0.5, 1.0, 1.0, 4.0),
        ),
        Case(
            "crammer_singer-split-evenly",
            "crammer_singer",
            scores="ties",
            options={"tie_break": "split_evenly"},
        ),
        Case(
            "crammer_singer-split-evenly-weighted",
            "crammer_singer",
            scores="ties",
            options={"tie_break": "split_evenly", "reduction": "weighted_mean", "kink": "one"},
            sample_weights=(0.5, 0.0, 3.0, -0.0, 1e-3, 2.0),
        ),
        Case(
            "crammer_singer-split-evenly-float16",
            "crammer_singer",
            dtype="float16",
            scores="active",
            options={"tie_break": "split_evenly"},
        ),
    ]
    return cases


CASES = _cases()


def _inputs(case: Case, seed: int) -> dict[str, Any]:
    """Scores, targets and options of a case, as numpy arrays."""
    rng = np.random.default_rng(seed)
    shape = (case.rows, case.classes)
    targets = rng.integers(0, case.classes, size=case.rows)
    if case.scores == "ties":
        scores = rng.integers(-2, 3, size=shape).astype(np.float64)
    elif case.scores == "inactive":
        scores = np.zeros(shape)
        scores[np.arange(case.rows), targets] = 100.0
    elif case.scores == "active":
        scores = np.zeros(shape)
    else:
        scores = rng.normal(scale=1.5, size=shape)
    options = dict(case.options)
    ignore = options.get("ignore_index")
    for row in case.ignored_rows:
        assert ignore is not None, "ignored rows need an ignore_index"
        targets[row] = ignore
    if ignore is not None and ignore >= 0:  # rows of that class are ignored too
        targets[targets == ignore] = (ignore + 1) % case.classes
        targets[list(case.ignored_rows)] = ignore
    if case.sample_weights:
        options["sample_weights"] = np.array(case.sample_weights[: case.rows])
    if "class_weights" in options:
        options["class_weights"] = np.array(options["class_weights"])
    return {"scores": scores.astype(case.dtype), "targets": targets, **options}


def _bytes(array: Any) -> bytes:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(array).tobytes()


def _assert_same_bits(factored_grad: Any, dense: Any) -> None:
    if isinstance(dense, torch.Tensor):
        assert factored_grad.dtype == dense.dtype
        assert factored_grad.device == dense.device
        assert torch.equal(factored_grad, dense)
    else:
        assert factored_grad.dtype == dense.dtype
        assert np.array_equal(factored_grad, dense)
    assert _bytes(factored_grad) == _bytes(dense)


async def _call(client: AsyncLossClient, loss: str, inputs: dict[str, Any], fmt: str) -> Any:
    options = {k: v for k, v in inputs.items() if k not in ("scores", "targets")}
    return await client.compute(
        loss, inputs["scores"], inputs["targets"], gradient_format=fmt, **options
    )


async def _mixed_and_alone(target: str, loss: str, inputs: dict[str, Any]) -> list[Any]:
    """Dense and factored together, then two factored together."""
    async with AsyncLossClient(target) as client:
        mixed = await asyncio.gather(
            _call(client, loss, inputs, "dense"), _call(client, loss, inputs, "factored")
        )
        alone = await asyncio.gather(
            _call(client, loss, inputs, "factored"), _call(client, loss, inputs, "factored")
        )
    return [*mixed, *alone]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_numpy_expansion_equals_the_dense_gradient(server: ServerThread, case: Case) -> None:
    inputs = _inputs(case, seed=len(case.name))
    dense, *factored_results = asyncio.run(_mixed_and_alone(server.target, case.loss, inputs))
    assert dense.resolved["gradient_format"] == "dense"
    for result in factored_results:
        assert result.resolved["gradient_format"] == "factored"
        _assert_same_bits(result.grad, dense.grad)
        assert result.loss == dense.loss
        for mine, theirs in zip(result.per_sample, dense.per_sample, strict=True):
            assert _bytes(mine) == _bytes(theirs)


def test_many_callers_batched_together_each_get_the_dense_gradient(server: ServerThread) -> None:
    """16 concurrent callers, dense and factored, both losses, different rows: all exact."""
    cases = [c for c in CASES if c.classes == 7 and c.dtype == "float32" and not c.options]
    inputs = [_inputs(c, seed=i) for i, c in enumerate(cases)]

    async def together() -> list[Any]:
        async with AsyncLossClient(server.target) as client:
            return await asyncio.gather(
                *(
                    _call(client, c.loss, x, fmt)
                    for c, x in zip(cases, inputs, strict=True)
                    for fmt in ("dense", "factored")
                )
            )

    results = asyncio.run(together())
    assert max(r.timing.batch_requests for r in results) > 1
    for dense, mine in zip(results[::2], results[1::2], strict=True):
        _assert_same_bits(mine.grad, dense.grad)


TORCH_CASES = [c for c in CASES if c.dtype == "float32" and c.classes < 1000]
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _check_torch_case(target: str, case: Case, dtype: torch.dtype, device: str) -> None:
    inputs = _inputs(case, seed=len(case.name) + 1)
    inputs["scores"] = torch.from_numpy(inputs["scores"]).to(device=device, dtype=dtype)
    inputs["targets"] = torch.from_numpy(inputs["targets"]).to(device)
    dense, *factored_results = asyncio.run(_mixed_and_alone(target, case.loss, inputs))
    for result in factored_results:
        _assert_same_bits(result.grad, dense.grad)
        parts = result.grad_factored
        assert parts.mask_bits.device == dense.grad.device
        assert parts.values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.name)
def test_torch_expansion_equals_the_dense_gradient(
    server: ServerThread, case: Case, dtype: torch.dtype
) -> None:
    _check_torch_case(server.target, case, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_expand_on_their_gpu(server: ServerThread) -> None:
    for case in TORCH_CASES:
        for dtype in TORCH_DTYPES:
            _check_torch_case(server.target, case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_server_packs_on_its_device() -> None:
    """The server on cuda:0 (mask packed there, pinned downloads), numpy and CUDA callers."""
    config = server_config(
        workers=WorkerConfig(devices=("cuda:0",)),
        batching=BatchingConfig(max_batch_delay_us=5000),
    )
    thread = ServerThread(config).start()
    try:
        for case in CASES:
            inputs = _inputs(case, seed=len(case.name))
            dense, *mine = asyncio.run(_mixed_and_alone(thread.target, case.loss, inputs))
            assert dense.timing.device == "cuda:0"
            for result in mine:
                _assert_same_bits(result.grad, dense.grad)
        for case in TORCH_CASES:
            for dtype in TORCH_DTYPES:
                _check_torch_case(thread.target, case, dtype, "cuda")
    finally:
        thread.stop()


def test_the_mask_and_values_are_the_gradients_factors(server: ServerThread) -> None:
    """grad_factored: where the mask is set a competitor gets v (Weston-Watkins), else 0."""
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(64, 300)).astype(np.float32)
    targets = rng.integers(0, 300, size=64)
    with LossClient(server.target) as client:
        result = client.multiclass_hinge(scores, targets, gradient_format="factored")
    parts = result.grad_factored
    assert parts.mask_bits.shape == (64, 300 // 8 + 1)
    mask = parts.mask()
    assert np.array_equal(np.packbits(mask, axis=1, bitorder="little"), parts.mask_bits)
    competitors = np.ones_like(mask)
    competitors[np.arange(64), targets] = False
    grad = result.grad
    assert np.array_equal(grad[mask], np.broadcast_to(parts.values[:, None], mask.shape)[mask])
    assert not grad[~mask & competitors].any()
    assert np.array_equal(grad[np.arange(64), targets], -(parts.values * mask.sum(1)))
    with pytest.raises(AttributeError):
        _ = dataclasses.replace(result, factored_grads=()).grad_factored


def test_streams_decode_factored_gradients(server: ServerThread) -> None:
    cases = [_inputs(c, seed=3) for c in CASES if c.loss == "crammer_singer"][:6]

    with LossClient(server.target) as client, client.stream() as stream:
        dense = [stream.crammer_singer(c["scores"], c["targets"]) for c in cases]
        mine = [
            stream.crammer_singer(c["scores"], c["targets"], gradient_format="factored")
            for c in cases
        ]
        pairs = [(d.result(30), f.result(30)) for d, f in zip(dense, mine, strict=True)]

    async def async_stream() -> list[tuple[Any, Any]]:
        async with AsyncLossClient(server.target) as client, client.stream() as stream:
            first = [stream.crammer_singer(c["scores"], c["targets"]) for c in cases]
            second = [
                stream.crammer_singer(c["scores"], c["targets"], gradient_format="factored")
                for c in cases
            ]
            answers = await asyncio.gather(*first), await asyncio.gather(*second)
            return list(zip(*answers, strict=True))

    for dense_result, factored_result in pairs + asyncio.run(async_stream()):
        _assert_same_bits(factored_result.grad, dense_result.grad)


@pytest.mark.parametrize("loss", LOSSES)
def test_autograd_gets_the_dense_gradient(server: ServerThread, loss: str) -> None:
    rng = np.random.default_rng(11)
    scores = torch.from_numpy(rng.normal(size=(32, 10))).to(torch.float32)
    targets = torch.from_numpy(rng.integers(0, 10, size=32))
    grads = []
    with LossClient(server.target) as client:
        for fmt in ("dense", "factored"):
            leaf = scores.clone().requires_grad_()
            loss_value = RemoteHingeLoss(client, loss, gradient_format=fmt)(leaf, targets)
            (loss_value * 3.0).backward()
            assert leaf.grad is not None
            grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    assert _bytes(grads[0]) == _bytes(grads[1])


INELIGIBLE = [
    ("multiclass_hinge", {"power": 2}),
    ("crammer_singer", {"power": 2}),
    ("binary_hinge", {}),
    ("gan_discriminator", {}),
    ("gan_generator", {}),
    ("margin_ranking", {}),
]


@pytest.mark.parametrize(("loss", "options"), INELIGIBLE, ids=[f"{n}-{o}" for n, o in INELIGIBLE])
def test_other_losses_and_power_2_are_refused_naming_the_field(
    server: ServerThread, loss: str, options: dict[str, Any]
) -> None:
    rng = np.random.default_rng(5)
    from helpers.cases import positional, random_inputs

    inputs = random_inputs(loss, rng, 4)
    with LossClient(server.target) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            client.compute(loss, *positional(loss, inputs), gradient_format="factored", **options)
        assert [v.field for v in caught.value.field_violations] == ["gradient_format"]
        assert "power 1" in caught.value.field_violations[0].description
        # Nothing else is lost: the same request, dense, is answered.
        assert client.compute(loss, *positional(loss, inputs), **options).grads


def _response_bytes(target: str, request: pb.ComputeRequest) -> bytes:
    """The serialized response, as it came over the wire."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=options) as channel:
        compute = channel.unary_unary("/hingeloss.v1.LossService/Compute")
        answer: bytes = compute(request.SerializeToString(), timeout=60)
    return answer


@pytest.mark.parametrize("loss", LOSSES)
def test_the_response_is_a_thirty_second_of_the_dense_one(server: ServerThread, loss: str) -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(256, 1000)).astype(np.float32)
    targets = rng.integers(0, 1000, size=256)
    sizes = {}
    for fmt in ("dense", "factored"):
        request, _ = build_request(
            loss, {"scores": scores, "targets": targets}, {"gradient_format": fmt}
        )
        sizes[fmt] = len(_response_bytes(server.target, request))
    # 125 mask bytes and 4 value bytes a row against 4000 gradient bytes.
    assert sizes["factored"] / sizes["dense"] <= 0.04
    assert sizes["factored"] >= 256 * (1000 // 8 + 4)


def test_pack_and_unpack_follow_numpys_little_bit_order() -> None:
    rng = np.random.default_rng(9)
    for columns in (1, 2, 7, 8, 9, 64, 1001):
        mask = rng.random((5, columns)) < 0.4
        expected = np.packbits(mask, axis=1, bitorder="little")
        as_floats = torch.from_numpy(mask).to(torch.float32)
        packed = factored.pack_rows(as_floats)
        assert np.array_equal(packed.numpy(), expected)
        # The GPU's way, run here on the CPU.
        assert np.array_equal(factored.pack_rows_by_product(as_floats).numpy(), expected)
        assert np.array_equal(factored.unpack_numpy(expected, columns), mask)
        assert torch.equal(factored.unpack_torch(packed, columns).bool(), torch.from_numpy(mask))
        first = torch.from_numpy(rng.integers(0, columns, size=(5, 1)))
        one_hot = np.zeros((5, columns), dtype=bool)
        one_hot[np.arange(5), first[:, 0].numpy()] = True
        packed_one_hot = factored.pack_one_hot(first, columns).numpy()
        assert np.array_equal(packed_one_hot, np.packbits(one_hot, axis=1, bitorder="little"))


def test_numpy_callers_of_a_bfloat16_answer_get_torchs_rounding(server: ServerThread) -> None:
    """numpy has no bfloat16: a bfloat16 answer decodes to float32 holding bfloat16 values."""
    rng = np.random.default_rng(4)
    scores = torch.from_numpy(rng.normal(size=(40, 9))).to(torch.bfloat16)
    targets = rng.integers(0, 9, size=40)
    numpy_kind = InputKind(is_torch=False, true_classes=targets)
    grads = {}
    for fmt in ("dense", "factored"):
        request, _ = build_request(
            "multiclass_hinge",
            {"scores": scores, "targets": targets},
            {"gradient_format": fmt, "class_normalization": "divide_by_num_classes"},
        )
        response = pb.ComputeResponse.FromString(_response_bytes(server.target, request))
        grads[fmt] = decode_response(response, numpy_kind).grad
    assert grads["factored"].dtype == grads["dense"].dtype == np.float32
    assert _bytes(grads["factored"]) == _bytes(grads["dense"])


def test_bfloat16_rounding_is_torchs() -> None:
    values = np.random.default_rng(6).normal(scale=1e3, size=100_000).astype(np.float32)
    values[:6] = [0.0, -0.0, 1.0000001, -3.3895314e38, 1.00390625, 1.01171875]  # ties too
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    assert _bytes(tensors.round_to_bfloat16(values)) == _bytes(expected)


def _through_the_engine(requests: list[tuple[pb.ComputeRequest, InputKind]]) -> list[Any]:
    """One batch of requests through decode, prepare, compute_batch, the wire and the SDK."""
    jobs = [decode_request(request, LimitsConfig()) for request, _ in requests]
    prepared = [prepare(job) for job in jobs]
    output = compute_batch(prepared, torch.device("cpu"))
    decoded = []
    for job, result, (_, kind) in zip(jobs, output.results, requests, strict=True):
        assert not isinstance(result, Exception), result
        response = pb.ComputeResponse.FromString(encode_response(job, result))
        decoded.append(decode_response(response, kind))
    return decoded


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    rows=st.integers(1, 9),
    classes=st.integers(2, 19),
    loss=st.sampled_from(LOSSES),
    dtype=st.sampled_from(["float16", "bfloat16", "float32", "float64"]),
    kink=st.sampled_from(["zero", "one"]),
    margin=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    reduction=st.sampled_from(["mean", "sum", "none", "weighted_mean"]),
)
def test_any_batch_expands_to_its_dense_gradient(
    data: st.DataObject,
    rows: int,
    classes: int,
    loss: str,
    dtype: str,
    kink: str,
    margin: float,
    reduction: str,
) -> None:
    """Random options and small integer scores (ties, kinks), batched dense beside factored."""
    scores = data.draw(
        st.lists(st.integers(-2, 2), min_size=rows * classes, max_size=rows * classes)
    )
    scores_t = torch.tensor(scores, dtype=torch.float64).reshape(rows, classes)
    targets = np.array(
        data.draw(st.lists(st.integers(0, classes - 1), min_size=rows, max_size=rows))
    )
    options: dict[str, Any] = {"kink": kink, "margin": margin, "reduction": reduction}
    weights = st.sampled_from([0.0, -0.0, 0.25, 1.0, 3.0])
    if reduction == "weighted_mean":
        drawn = data.draw(st.lists(weights, min_size=rows, max_size=rows))
        options["sample_weights"] = np.array([*drawn[:-1], 1.0])  # never all zero
    if loss == "crammer_singer":
        options["tie_break"] = data.draw(st.sampled_from(["first_index", "split_evenly"]))
    else:
        options["class_normalization"] = data.draw(
            st.sampled_from(["sum_over_classes", "divide_by_num_classes"])
        )
        if data.draw(st.booleans()):
            options["class_weights"] = np.array(
                data.draw(st.lists(weights, min_size=classes, max_size=classes))
            )
        if rows > 1 and data.draw(st.booleans()):
            options["ignore_index"] = -1
            targets[data.draw(st.integers(0, rows - 2))] = -1
    inputs = {"scores": scores_t.to(getattr(torch, dtype)), "targets": torch.from_numpy(targets)}
    requests = [
        build_request(loss, inputs, {**options, "gradient_format": fmt})
        for fmt in ("dense", "factored", "factored")
    ]
    dense, *factored_results = _through_the_engine(requests)
    # Alone: a batch that computes no dense gradient.
    factored_results += _through_the_engine(requests[1:2])
    for result in factored_results:
        _assert_same_bits(result.grad, dense.grad)


def test_targets_of_another_array_type_than_the_scores(server: ServerThread) -> None:
    rng = np.random.default_rng(12)
    scores = rng.normal(size=(16, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=16)
    with LossClient(server.target) as client:
        dense = client.multiclass_hinge(scores, targets)
        mine = client.multiclass_hinge(
            scores, torch.from_numpy(targets), gradient_format="factored"
        )
        torch_scores = client.multiclass_hinge(
            torch.from_numpy(scores), targets, gradient_format="factored"
        )
    _assert_same_bits(mine.grad, dense.grad)
    assert _bytes(torch_scores.grad) == _bytes(dense.grad)


def test_more_classes_than_float32_counts_exactly_are_refused() -> None:
    """Past 2^24 classes a float32 count of set bits depends on the order of the sum."""
    for classes, refused in ((1 << 24, False), ((1 << 24) + 1, True)):
        request, _ = build_request(
            "multiclass_hinge",
            {"scores": np.zeros((1, classes), dtype=np.float16), "targets": np.zeros(1, np.int64)},
            {"gradient_format": "factored"},
        )
        if not refused:
            assert decode_request(request, LimitsConfig()).options.gradient_format == "factored"
            continue
        with pytest.raises(InvalidInputError) as caught:
            decode_request(request, LimitsConfig())
        assert caught.value.field == "gradient_format"
        assert "16777216 classes" in str(caught.value)
