"""Every loss and option on a CUDA device against the float64 references.

Three routes: the kernels called directly on the device (big shapes, against the
CPU in float64), the engine (a Worker on the device: staging, kernels, per-job
split, no gRPC), and a real server started with `--devices cuda:0`. Scores come in
float64, float32, float16 and bfloat16; the last three compute in float32.

Without CUDA every test here skips. HINGELOSS_GPU_TEST_DEVICE=cpu runs the same
checks on the CPU, a dry run of the tests themselves where no GPU is at hand.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from helpers.cases import positional, random_inputs, sample_count
from helpers.references import reference
from helpers.servers import ServerThread, server_config

from hingeloss import NO_RETRY, LossClient, LossResult
from hingeloss._requests import SCORE_FIELDS, build_request
from hingeloss._results import decode_response
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import LimitsConfig, WorkerConfig
from hingeloss_server.engine import losses
from hingeloss_server.engine.device_worker import Worker
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.transport.response_codec import encode_response

DEVICE = str(torch.device(os.environ.get("HINGELOSS_GPU_TEST_DEVICE", "cuda:0")))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA"
    ),
]

LOSSES = tuple(SCORE_FIELDS)
REDUCTIONS = ("mean", "sum", "none", "weighted_mean")
KINKS = ("zero", "one")
GRADIENT_FORMATS = ("dense", "row_sparse", "none")
ROWS, CLASSES, FAKE_ROWS = 24, 5, 17
# A class that some rows hold, so that ignore_index drops rows.
IGNORED_CLASS = 2


@dataclass(frozen=True)
class Tolerance:
    """Relative and absolute tolerances of the loss, gradients and per-sample losses."""

    loss_rtol: float
    rtol: float
    atol: float


F64 = Tolerance(loss_rtol=1e-10, rtol=1e-10, atol=1e-12)
# Grid scores are exact in float32 and so is every hinge argument: only the row scales
# and class weights round.
F32 = Tolerance(loss_rtol=1e-6, rtol=1e-6, atol=1e-7)
# Gradients and per-sample losses come back rounded to the half type (unit roundoff 2^-11
# for float16, 2^-8 for bfloat16); the loss is reduced in float64 from float32 terms.
HALF = {
    torch.float16: Tolerance(loss_rtol=1e-6, rtol=2.0**-10, atol=1e-7),
    torch.bfloat16: Tolerance(loss_rtol=1e-6, rtol=2.0**-7, atol=1e-7),
}


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh randomness every run; HINGELOSS_TEST_SEED replays a failure."""
    seed = int(os.environ.get("HINGELOSS_TEST_SEED", secrets.randbits(32)))
    print(f"HINGELOSS_TEST_SEED={seed}")
    return np.random.default_rng(seed)


# -------------------------------- cases


def option_matrix(loss: str) -> list[dict[str, Any]]:
    """Every combination of the options of `loss` (class_weights=True: draw weights)."""
    if loss == "binary_hinge":
        grid: Iterator[tuple[Any, ...]] = itertools.product(
            REDUCTIONS, KINKS, (1, 2), ("plus_minus_one", "zero_one")
        )
        cases = [
            {"reduction": r, "kink": k, "power": p, "label_encoding": e} for r, k, p, e in grid
        ]
    elif loss == "multiclass_hinge":
        grid = itertools.product(
            REDUCTIONS,
            KINKS,
            (1, 2),
            ("sum_over_classes", "divide_by_num_classes"),
            (False, True),
            (None, IGNORED_CLASS),
        )
        cases = []
        for r, k, p, n, w, i in grid:
            case: dict[str, Any] = {"reduction": r, "kink": k, "power": p, "class_normalization": n}
            if w:
                case["class_weights"] = True
            if i is not None:
                case["ignore_index"] = i
            cases.append(case)
    elif loss == "crammer_singer":
        grid = itertools.product(REDUCTIONS, KINKS, (1, 2), ("first_index", "split_evenly"))
        cases = [{"reduction": r, "kink": k, "power": p, "tie_break": t} for r, k, p, t in grid]
    elif loss == "gan_discriminator":
        grid = itertools.product(REDUCTIONS, KINKS, ("sum_of_means", "pooled_mean"))
        cases = [{"reduction": r, "kink": k, "combine": c} for r, k, c in grid]
    elif loss == "gan_generator":
        cases = [{"reduction": r} for r in REDUCTIONS]
    else:
        cases = [{"reduction": r, "kink": k} for r, k in itertools.product(REDUCTIONS, KINKS)]
    margins = (None, 0.5, 2.0, 0.0)
    for index, case in enumerate(cases):
        # Cycle the margin, the gradient format and per-sample losses through the matrix.
        margin = margins[index % len(margins)]
        if margin is not None and loss not in ("gan_discriminator", "gan_generator"):
            case["margin"] = margin
        case["gradient_format"] = GRADIENT_FORMATS[index % len(GRADIENT_FORMATS)]
        case["return_per_sample"] = index % 2 == 0
    return cases


@dataclass
class Case:
    """One request: inputs as sent (numpy or torch), options for the SDK and the reference."""

    loss: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    reference_inputs: dict[str, np.ndarray]

    @property
    def reference_options(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.options.items()
            if k not in ("gradient_format", "return_per_sample", "request_id")
        }

    def describe(self) -> str:
        shown = {k: v for k, v in self.options.items() if not isinstance(v, np.ndarray)}
        dtypes = sorted({str(getattr(v, "dtype", "")) for v in self.inputs.values()})
        return f"{self.loss} {shown} {dtypes}"


def make_case(
    loss: str,
    template: dict[str, Any],
    rng: np.random.Generator,
    dtype: Any,
    *,
    integer_scores: bool,
    rows: int = ROWS,
) -> Case:
    """Inputs for one request; scores in `dtype` (a numpy dtype or a torch half type)."""
    inputs = random_inputs(
        loss, rng, rows, classes=CLASSES, fake_rows=FAKE_ROWS, integer_scores=integer_scores
    )
    options = dict(template)
    if options.get("class_weights") is True:
        options["class_weights"] = rng.uniform(0.1, 2.0, size=CLASSES)
    if "ignore_index" in options:
        # Never every row ignored (that request is invalid).
        inputs["targets"][0] = (options["ignore_index"] + 1) % CLASSES
    if options.get("reduction") == "weighted_mean":
        options["sample_weights"] = rng.uniform(0.0, 3.0, size=sample_count(loss, inputs))
    if options.get("label_encoding") == "zero_one":
        inputs["labels"] = (inputs["labels"] > 0).astype(np.int64)
    sent: dict[str, Any] = dict(inputs)
    reference_inputs = dict(inputs)
    for name in SCORE_FIELDS[loss]:
        if isinstance(dtype, torch.dtype):
            tensor = torch.from_numpy(inputs[name]).to(dtype)
            sent[name] = tensor
            reference_inputs[name] = tensor.double().numpy()
        else:
            sent[name] = inputs[name].astype(dtype)
            reference_inputs[name] = sent[name].astype(np.float64)
    if isinstance(dtype, torch.dtype):
        # torch in, torch out: the other inputs go as tensors too.
        for name, value in inputs.items():
            if name not in SCORE_FIELDS[loss]:
                sent[name] = torch.from_numpy(value)
    return Case(loss, sent, options, reference_inputs)


def as_float64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def check(result: LossResult, case: Case, tol: Tolerance, compute_dtype: str) -> None:
    """The result equals the float64 reference of the inputs as sent."""
    try:
        _check(result, case, tol, compute_dtype)
    except AssertionError as error:
        raise AssertionError(f"{case.describe()}: {error}") from error


def _check(result: LossResult, case: Case, tol: Tolerance, compute_dtype: str) -> None:
    expected = reference(case.loss, case.reference_inputs, case.reference_options)
    np.testing.assert_allclose(result.loss, expected.loss, rtol=tol.loss_rtol, atol=tol.atol)
    if case.options.get("gradient_format") == "none":
        assert result.grads == ()
    else:
        assert len(result.grads) == len(expected.grads)
        first = case.inputs[SCORE_FIELDS[case.loss][0]]
        for got, want in zip(result.grads, expected.grads, strict=True):
            # Gradients come back in the caller's array type and dtype.
            assert type(got) is type(first)
            assert got.dtype == first.dtype
            np.testing.assert_allclose(as_float64(got), want, rtol=tol.rtol, atol=tol.atol)
    if case.options.get("return_per_sample") or case.options.get("reduction") == "none":
        assert len(result.per_sample) == len(expected.per_sample)
        for got, want in zip(result.per_sample, expected.per_sample, strict=True):
            np.testing.assert_allclose(as_float64(got), want, rtol=tol.rtol, atol=tol.atol)
    assert result.active_samples == sum(int(a.sum()) for a in expected.active)
    ignored = 0
    if "ignore_index" in case.options:
        ignored = int(np.sum(np.asarray(case.reference_inputs["targets"]) == IGNORED_CLASS))
    assert result.samples == sum(len(a) for a in expected.active) - ignored
    assert result.timing.device == DEVICE
    assert result.resolved["compute_dtype"] == compute_dtype


# -------------------------------- the engine: a Worker on the device, no gRPC


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    one = Worker("hingeloss-gpu-test", torch.device(DEVICE), None)
    yield one
    one.close()


def engine(worker: Worker, cases: list[Case]) -> list[LossResult]:
    """Computes the cases as one batch on the worker's device (they must share a batch key)."""
    built = [build_request(case.loss, case.inputs, case.options) for case in cases]
    jobs = [decode_request(request, LimitsConfig()) for request, _ in built]
    outcomes, _ = worker.run(jobs)
    by_job = {id(outcome.job): outcome for outcome in outcomes}
    results = []
    for job, (_, kind) in zip(jobs, built, strict=True):
        outcome = by_job[id(job)]
        if outcome.error is not None:
            raise AssertionError(f"{job.request_id}: {outcome.error}")
        assert outcome.result is not None
        answer = pb.ComputeResponse.FromString(encode_response(job, outcome.result))
        results.append(decode_response(answer, kind))
    return results


@pytest.mark.parametrize("loss", LOSSES)
def test_engine_every_option_matches_reference(
    worker: Worker, rng: np.random.Generator, loss: str
) -> None:
    """float64 (random and on-margin scores) and float32 (on-margin scores)."""
    for template in option_matrix(loss):
        for dtype, integer_scores, tol, compute in (
            (np.float64, False, F64, "float64"),
            (np.float64, True, F64, "float64"),
            (np.float32, True, F32, "float32"),
        ):
            case = make_case(loss, template, rng, dtype, integer_scores=integer_scores)
            (result,) = engine(worker, [case])
            check(result, case, tol, compute)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("loss", LOSSES)
def test_engine_half_precision_matches_reference(
    worker: Worker, rng: np.random.Generator, loss: str, half: torch.dtype
) -> None:
    """Half scores compute in float32; gradients and per-sample losses come back in half."""
    for template in option_matrix(loss)[::3]:
        case = make_case(loss, template, rng, half, integer_scores=True)
        (result,) = engine(worker, [case])
        check(result, case, HALF[half], "float32")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_engine_batch_of_many_requests_is_invisible(
    worker: Worker, rng: np.random.Generator, dtype: Any
) -> None:
    """Requests sharing a batch on the device each get their own answer."""
    for loss, shared in (
        ("multiclass_hinge", {"power": 2, "kink": "one", "class_weights": True}),
        ("crammer_singer", {"tie_break": "split_evenly"}),
        ("gan_discriminator", {"combine": "pooled_mean"}),
        ("margin_ranking", {"margin": 0.5}),
    ):
        weights = rng.uniform(0.1, 2.0, size=CLASSES)
        cases = []
        for index, reduction in enumerate(REDUCTIONS * 2):
            template = {**shared, "reduction": reduction}
            template["gradient_format"] = GRADIENT_FORMATS[index % len(GRADIENT_FORMATS)]
            case = make_case(
                loss, template, rng, dtype, integer_scores=True, rows=int(rng.integers(1, 50))
            )
            if "class_weights" in case.options:
                case.options["class_weights"] = weights  # equal weights batch together
            cases.append(case)
        results = engine(worker, cases)
        for case, result in zip(cases, results, strict=True):
            assert result.timing.batch_requests == len(cases)
            check(result, case, F64 if dtype is np.float64 else F32, np.dtype(dtype).name)


# -------------------------------- the kernels, called directly, at large shapes


def _kernel(
    loss: str, scores: torch.Tensor, other: torch.Tensor, options: dict[str, Any]
) -> losses.LossOutput:
    row_scale = torch.full(
        (scores.shape[0],), 1.0 / scores.shape[0], dtype=scores.dtype, device=scores.device
    )
    if loss == "binary_hinge":
        return losses.binary_hinge(
            scores, other.to(scores.dtype), row_scale=row_scale, margin=1.0, **options
        )
    if loss == "multiclass_hinge":
        weights = torch.linspace(0.5, 1.5, scores.shape[1], dtype=scores.dtype)
        return losses.multiclass_hinge(
            scores,
            other,
            margin=1.0,
            class_weights=weights.to(scores.device),
            divide_by_num_classes=True,
            row_scale=row_scale,
            ignore_mask=other == 3,
            **options,
        )
    return losses.crammer_singer(
        scores, other, margin=1.0, split_ties=False, row_scale=row_scale, **options
    )


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("kink_one", [False, True], ids=["kink-zero", "kink-one"])
@pytest.mark.parametrize("loss", ["binary_hinge", "multiclass_hinge", "crammer_singer"])
def test_kernels_on_device_equal_cpu_float64_at_large_shapes(
    rng: np.random.Generator, loss: str, power: int, kink_one: bool
) -> None:
    """4096 x 1000 half-integer scores: ties and zero hinge arguments on every row.

    Half-integers keep every hinge argument exact in float32, so float32 on the
    device equals float64 on the CPU up to the rounding of the row scales.
    """
    rows, classes = 4096, 1000
    shape = (rows * classes,) if loss == "binary_hinge" else (rows, classes)
    scores64 = torch.from_numpy(rng.integers(-8, 9, size=shape) / 2.0)
    if loss == "binary_hinge":
        other = torch.from_numpy(rng.choice([-1.0, 1.0], size=shape))
    else:
        other = torch.from_numpy(rng.integers(0, classes, size=rows))
    options = {"power": power, "kink_one": kink_one}
    want = _kernel(loss, scores64, other, options)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        got = _kernel(loss, scores64.to(DEVICE, dtype), other.to(DEVICE), options)
        for name, a, b in (
            ("per_sample", got.per_sample, want.per_sample),
            ("grads", got.grads, want.grads),
        ):

            def message(m: str, n: str = name) -> str:
                return f"{n}: {m}"

            for x, y in zip(a, b, strict=True):
                assert x.device == torch.device(DEVICE)
                assert x.dtype == dtype
                torch.testing.assert_close(x.cpu().double(), y, rtol=rtol, atol=1e-12, msg=message)
        for x, y in zip(got.active, want.active, strict=True):
            assert torch.equal(x.cpu(), y)


# -------------------------------- over a real server on the device


@pytest.fixture(scope="module")
def device_server() -> Iterator[ServerThread]:
    thread = ServerThread(server_config(workers=WorkerConfig(devices=(DEVICE,)))).start()
    yield thread
    thread.stop()


@pytest.mark.parametrize("loss", LOSSES)
def test_server_every_option_matches_reference(
    device_server: ServerThread, rng: np.random.Generator, loss: str
) -> None:
    with LossClient(device_server.target, retry=NO_RETRY) as client:
        for template in option_matrix(loss):
            for dtype, integer_scores, tol, compute in (
                (np.float64, False, F64, "float64"),
                (np.float32, True, F32, "float32"),
            ):
                case = make_case(loss, template, rng, dtype, integer_scores=integer_scores)
                result = client.compute(loss, *positional(loss, case.inputs), **case.options)
                check(result, case, tol, compute)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_server_half_precision_matches_reference(
    device_server: ServerThread, rng: np.random.Generator, half: torch.dtype
) -> None:
    with LossClient(device_server.target, retry=NO_RETRY) as client:
        for loss in LOSSES:
            for template in option_matrix(loss)[::4]:
                case = make_case(loss, template, rng, half, integer_scores=True)
                result = client.compute(loss, *positional(loss, case.inputs), **case.options)
                check(result, case, HALF[half], "float32")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_server_takes_and_returns_device_tensors(
    device_server: ServerThread, rng: np.random.Generator, half: torch.dtype
) -> None:
    """Tensors on the caller's device in, gradients on that device and dtype out."""
    case = make_case("multiclass_hinge", {"power": 2}, rng, half, integer_scores=True)
    scores = case.inputs["scores"].to(DEVICE)
    targets = case.inputs["targets"].to(DEVICE)
    with LossClient(device_server.target, retry=NO_RETRY) as client:
        result = client.multiclass_hinge(scores, targets, power=2)
    assert result.grad.device == scores.device
    assert result.grad.dtype == half
    expected = reference("multiclass_hinge", case.reference_inputs, {"power": 2})
    np.testing.assert_allclose(
        as_float64(result.grad), expected.grads[0], rtol=HALF[half].rtol, atol=1e-7
    )
