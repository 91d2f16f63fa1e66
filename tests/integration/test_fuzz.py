"""Hostile input: generated requests over a real channel get OK or INVALID_ARGUMENT, never more.

Hypothesis builds ComputeRequests with every loss (or none), dtypes including
unknown enum numbers, shapes including negative and huge dimensions, data a few
bytes off, unknown enum values, missing fields, extreme floats (NaN, Inf, 1e38,
subnormals) and labels out of range. The same server then still answers a valid
request correctly. The atheris target of tests/tools/fuzz runs here on mutated seeds.
"""

from __future__ import annotations

import importlib.util
import math
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from helpers.servers import ServerThread, server_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hingeloss import LossClient
from hingeloss import _tensors as tensors
from hingeloss._errors import InvalidArgumentError, from_rpc_error
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.transport.request_codec import decode_request

FUZZ_TARGET = Path(__file__).resolve().parents[1] / "tools" / "fuzz" / "fuzz_decode.py"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
# `make fuzz` raises it (HINGELOSS_FUZZ_EXAMPLES); the other tests here scale with it.
EXAMPLES = int(os.environ.get("HINGELOSS_FUZZ_EXAMPLES", "150"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

FLOAT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
INT_DTYPES = (pb.DTYPE_INT32, pb.DTYPE_INT64)
UNKNOWN_NUMBERS = (-1, 7, 42, 2**31 - 1, -(2**31))
EXTREME_FLOATS = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    math.nan,
    math.inf,
    -math.inf,
    1e38,
    -1e38,
    3.4e38,
    1e308,
    -1e308,
    5e-324,
    1e-45,
    1e-40,
    65504.0,
    65520.0,
)
HUGE_DIMS = (2**31, 2**40, 2**62, 2**63 - 1, -(2**63))


# ---- strategies -------------------------------------------------------------------------


def _rarely(draw: st.DrawFn, one_in: int = 20) -> bool:
    """True about once in `one_in` draws: each kind of damage is rare, so that most
    requests carry one fault at most and many reach compute."""
    # A middle value: Hypothesis favours the bounds of a range.
    return draw(st.integers(0, one_in - 1)) == one_in // 2


def _floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(-10, 10), st.floats())


def _values(kind: str, classes: int, odd: bool) -> st.SearchStrategy[float]:
    """Element values: in the contract, or (`odd`) anything, extremes and strays included."""
    if kind in ("labels", "labels01"):
        usual = st.sampled_from([0.0, 1.0] if kind == "labels01" else [-1.0, 1.0])
        strays = st.sampled_from([2.0, -2.0, 0.5, math.nan, 1e38])
    elif kind == "targets":
        usual = st.integers(0, classes - 1).map(float)
        strays = st.one_of(
            st.integers(-3, classes + 3).map(float), st.sampled_from([-(2.0**62), 2.0**40])
        )
    elif kind == "weights":
        usual, strays = st.floats(0, 10), st.sampled_from(EXTREME_FLOATS)
    else:
        usual, strays = st.floats(-3, 3), _floats()
    return st.one_of(usual, strays) if odd else usual


def _encode(values: list[float], dtype: int) -> bytes:
    array = np.array(values, dtype=np.float64)
    if dtype in INT_DTYPES:
        info = np.iinfo(np.int32 if dtype == pb.DTYPE_INT32 else np.int64)
        clean = np.nan_to_num(array, nan=0.0, posinf=info.max, neginf=info.min)
        ints = np.clip(clean, float(info.min), float(info.max) / 2).astype(np.int64)
        return ints.astype(np.dtype(info.dtype).newbyteorder("<")).tobytes()
    if dtype == pb.DTYPE_BFLOAT16:
        bf16 = torch.from_numpy(array).to(torch.bfloat16)
        return bytes(bf16.view(torch.int16).numpy().tobytes())
    with np.errstate(over="ignore"):
        return tensors.from_numpy(array.astype(tensors.BY_WIRE[dtype].numpy or "float32")).data


@st.composite
def _tensor(
    draw: st.DrawFn, shape: tuple[int, ...], kind: str, classes: int, score_dtype: int
) -> pb.Tensor | None:
    """A tensor meant to be `shape`, mostly well formed, sometimes subtly or badly not."""
    if _rarely(draw, 40):
        return None  # missing field
    usual: tuple[pb.DType, ...] = INT_DTYPES if kind == "targets" else FLOAT_DTYPES
    if kind in ("labels", "labels01"):
        usual = FLOAT_DTYPES + INT_DTYPES
    if _rarely(draw):
        dtype = draw(st.sampled_from(FLOAT_DTYPES + INT_DTYPES + (0,) + UNKNOWN_NUMBERS))
    elif kind == "scores":
        dtype = score_dtype  # a request's score tensors share one dtype
    else:
        dtype = draw(st.sampled_from(usual))
    if _rarely(draw):
        dims = st.one_of(st.integers(-3, 9), st.sampled_from(HUGE_DIMS))
        shape = tuple(draw(st.lists(dims, max_size=4)))
    message = pb.Tensor(dtype=dtype, shape=shape)
    count = math.prod(shape) if all(0 <= d <= 64 for d in shape) else -1
    if dtype in tensors.BY_WIRE and 0 <= count <= 256:
        odd = _rarely(draw, 8)
        values = draw(st.lists(_values(kind, classes, odd), min_size=count, max_size=count))
        data = _encode(values, dtype)
    else:
        data = draw(st.binary(max_size=16))
    offset = draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) if _rarely(draw) else 0
    message.data = data[:offset] if offset < 0 else data + bytes(offset)
    return message


@st.composite
def _enum(draw: st.DrawFn, valid: int) -> int:
    """Mostly a valid enum number (0..valid), sometimes an unknown one."""
    if _rarely(draw, 30):
        return draw(st.sampled_from(UNKNOWN_NUMBERS))
    return draw(st.integers(0, valid))


@st.composite
def _margin(draw: st.DrawFn) -> float | None:
    if draw(st.booleans()):
        return None
    return draw(_floats()) if _rarely(draw, 5) else draw(st.floats(-2, 3))


@st.composite
def _power(draw: st.DrawFn) -> int | None:
    if _rarely(draw, 30):
        return draw(st.integers(-(2**31), 2**31 - 1))
    return draw(st.sampled_from([None, 1, 2]))


def _set(message: Any, name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, pb.Tensor):
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


@st.composite
def compute_requests(draw: st.DrawFn) -> pb.ComputeRequest:
    losses = [
        "binary_hinge",
        "multiclass_hinge",
        "crammer_singer",
        "gan_discriminator",
        "gan_generator",
        "margin_ranking",
    ]
    loss = None if _rarely(draw, 40) else draw(st.sampled_from(losses))
    rows = 0 if _rarely(draw, 40) else draw(st.integers(1, 8))
    classes = 1 if _rarely(draw, 40) else draw(st.integers(2, 5))
    score_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    request = pb.ComputeRequest(request_id=draw(st.text(max_size=24)))

    def tensor(shape: tuple[int, ...], kind: str) -> pb.Tensor | None:
        return draw(_tensor(shape, kind, classes, score_dtype))

    total_rows = rows
    if loss == "binary_hinge":
        message: Any = request.binary_hinge
        _set(message, "scores", tensor((rows,), "scores"))
        encoding = draw(_enum(2))
        zero_one = encoding == pb.LABEL_ENCODING_ZERO_ONE
        _set(message, "labels", tensor((rows,), "labels01" if zero_one else "labels"))
        _set(message, "label_encoding", encoding)
        _set(message, "margin", draw(_margin()))
        _set(message, "power", draw(_power()))
        _set(message, "kink_subgradient", draw(_enum(2)))
    elif loss in ("multiclass_hinge", "crammer_singer"):
        message = getattr(request, loss)
        _set(message, "scores", tensor((rows, classes), "scores"))
        _set(message, "targets", tensor((rows,), "targets"))
        _set(message, "margin", draw(_margin()))
        _set(message, "power", draw(_power()))
        _set(message, "kink_subgradient", draw(_enum(2)))
        if loss == "multiclass_hinge":
            if draw(st.booleans()):
                _set(message, "target_class_weights", tensor((classes,), "weights"))
            _set(message, "class_normalization", draw(_enum(2)))
            ignore = st.one_of(st.integers(-3, classes + 2), st.sampled_from([-(2**63), 2**63 - 1]))
            _set(message, "ignore_index", draw(st.one_of(st.none(), ignore)))
        else:
            _set(message, "tie_break", draw(_enum(2)))
    elif loss == "gan_discriminator":
        fake_rows = 0 if _rarely(draw, 40) else draw(st.integers(1, 5))
        total_rows = rows + fake_rows
        message = request.gan_discriminator
        _set(message, "real_scores", tensor((rows,), "scores"))
        _set(message, "fake_scores", tensor((fake_rows,), "scores"))
        _set(message, "combine", draw(_enum(2)))
        _set(message, "kink_subgradient", draw(_enum(2)))
    elif loss == "gan_generator":
        _set(request.gan_generator, "fake_scores", tensor((rows,), "scores"))
    elif loss == "margin_ranking":
        message = request.margin_ranking
        _set(message, "scores_a", tensor((rows,), "scores"))
        _set(message, "scores_b", tensor((rows,), "scores"))
        _set(message, "labels", tensor((rows,), "labels"))
        _set(message, "margin", draw(_margin()))
        _set(message, "kink_subgradient", draw(_enum(2)))
    request.reduction = draw(_enum(4))  # type: ignore[assignment]
    request.gradient_format = draw(_enum(3))  # type: ignore[assignment]
    request.return_per_sample = draw(st.booleans())
    weighted = request.reduction == pb.REDUCTION_WEIGHTED_MEAN
    if _rarely(draw, 10) != weighted:  # almost always given when needed, rarely otherwise
        _set(request, "sample_weights", tensor((total_rows,), "weights"))
    return request


# ---- a server for the whole module ------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    thread = ServerThread(server_config()).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield channel


def _check_refusal(error: grpc.RpcError) -> None:
    """Only INVALID_ARGUMENT, naming one field and short (it echoes no request data)."""
    assert error.code() in ALLOWED, (error.code(), error.details())
    typed = from_rpc_error(error)
    assert isinstance(typed, InvalidArgumentError), typed
    assert len(typed.field_violations) == 1
    assert len(error.details() or "") < 300, error.details()


# ---- over the wire ----------------------------------------------------------------------


@FUZZ_SETTINGS
@given(request=compute_requests())
def test_generated_requests_get_ok_or_invalid_argument(
    channel: grpc.Channel, request: pb.ComputeRequest
) -> None:
    call = pb_grpc.LossServiceStub(channel).Compute.future(request, timeout=30)  # type: ignore[no-untyped-call]
    error = call.exception()
    if error is None:
        assert call.result().request_id == request.request_id
    else:
        _check_refusal(error)


@settings(FUZZ_SETTINGS, max_examples=max(1, EXAMPLES // 5))
@given(requests=st.lists(compute_requests(), min_size=1, max_size=4))
def test_generated_streams_get_ok_or_invalid_argument(
    channel: grpc.Channel, requests: list[pb.ComputeRequest]
) -> None:
    responses = pb_grpc.LossServiceStub(channel).ComputeStream(iter(requests), timeout=30)  # type: ignore[no-untyped-call]
    answered: list[str] = []
    error = _drain(responses, answered)
    # Answered in order, up to the first refused request, which ends the stream.
    assert answered == [r.request_id for r in requests[: len(answered)]]
    if error is None:
        assert len(answered) == len(requests)
    else:
        _check_refusal(error)


def _drain(responses: Iterator[Any], answered: list[Any]) -> grpc.RpcError | None:
    try:
        for response in responses:
            answered.append(getattr(response, "request_id", response))
    except grpc.RpcError as error:
        return error
    return None


def _load_target() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_decode", FUZZ_TARGET)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TARGET = _load_target()
SEEDS: list[bytes] = TARGET.seeds()


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A seed request with a few byte-level edits: flips, inserts, deletions, truncation."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        else:
            other = draw(st.sampled_from(SEEDS))
            data[at:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


@settings(FUZZ_SETTINGS, max_examples=EXAMPLES)
@given(data=st.one_of(st.binary(max_size=256), _mutated()))
def test_raw_bytes_get_ok_or_invalid_argument(channel: grpc.Channel, data: bytes) -> None:
    """Bytes that are not a ComputeRequest at all: never UNKNOWN (gRPC's parse-failure code)."""
    call = channel.unary_unary("/hingeloss.v1.LossService/Compute").future(data, timeout=30)
    error = call.exception()
    if error is not None:
        _check_refusal(error)


@pytest.mark.parametrize(
    "method", ["/hingeloss.v1.LossService/GetServerInfo", "/grpc.health.v1.Health/Check"]
)
def test_unparsable_message_of_any_unary_method_is_invalid_argument(
    channel: grpc.Channel, method: str
) -> None:
    """Every service is guarded, health included: bad bytes are the caller's error, not UNKNOWN."""
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method)(b"\xff\xff\xff", timeout=10)
    _check_refusal(info.value)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_unparsable_message_ends_a_stream_with_invalid_argument(channel: grpc.Channel) -> None:
    """The requests before it are answered; the bad one ends the stream, as a bad request does."""
    good = SEEDS[0]
    call = channel.stream_stream("/hingeloss.v1.LossService/ComputeStream")
    responses = call(iter([good, good, b"\xff\xff garbage", good]), timeout=30)
    answered: list[bytes] = []
    error = _drain(responses, answered)
    assert len(answered) == 2
    assert error is not None
    _check_refusal(error)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    typed = from_rpc_error(error)
    assert isinstance(typed, InvalidArgumentError)
    assert typed.field_violations[0].field == "request"


def test_huge_claimed_shapes_allocate_nothing(
    fuzz_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shape of 2^40 backed by 12 bytes: refused from its header, with or without limits."""
    claims = [
        pb.GanGenerator(
            fake_scores=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**40], data=bytes(12))
        ),
        pb.GanGenerator(
            fake_scores=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[2**63 - 1], data=bytes(12))
        ),
    ]

    def refuse(data: Any, dtype: int, shape: tuple[int, ...]) -> Any:
        raise AssertionError(f"a tensor was made from a claimed shape {tuple(shape)}")

    # The request codec makes every tensor through this one function: none may be made.
    monkeypatch.setattr(tensors, "torch_view", refuse)
    no_limits = LimitsConfig(max_request_rows=2**63, max_request_elements=2**64)
    for message in claims:
        request = pb.ComputeRequest(gan_generator=message)
        for limits in (LimitsConfig(), no_limits):
            with pytest.raises(InvalidInputError):
                decode_request(request, limits)

    before = _rss()
    with grpc.insecure_channel(fuzz_server.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        for message in claims:
            with pytest.raises(grpc.RpcError) as info:
                stub.Compute(pb.ComputeRequest(gan_generator=message), timeout=10)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _rss() - before < 32 << 20


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


# ---- the atheris target, in process -----------------------------------------------------


@settings(FUZZ_SETTINGS, max_examples=4 * EXAMPLES)
@given(data=st.one_of(_mutated(), st.binary(max_size=128)))
def test_fuzz_target_survives_mutated_requests(data: bytes) -> None:
    TARGET.one_input(data)


def test_fuzz_target_accepts_every_seed() -> None:
    for seed in SEEDS:
        TARGET.one_input(seed)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_runs_the_target_for_a_bounded_time(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            str(FUZZ_TARGET),
            "-runs=20000",
            "-max_total_time=8",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Done" in completed.stderr


def test_extreme_sample_weights_keep_their_meaning(fuzz_server: ServerThread) -> None:
    """Weights of 1e308 each sum past float64: the weighted mean must still be the mean."""
    with LossClient(fuzz_server.target) as client:
        huge = client.binary_hinge(
            np.zeros(2),
            np.ones(2),
            reduction="weighted_mean",
            sample_weights=np.array([1e308, 1e308]),
        )
        tiny = client.binary_hinge(
            np.array([0.0, 5.0]),
            np.ones(2),
            reduction="weighted_mean",
            sample_weights=np.array([5e-324, 0.0]),
        )
    assert huge.loss == pytest.approx(1.0)
    np.testing.assert_allclose(huge.grad, [-0.5, -0.5])
    assert tiny.loss == pytest.approx(1.0)


# ---- and afterwards ---------------------------------------------------------------------


def test_server_still_answers_correctly_after_fuzzing(fuzz_server: ServerThread) -> None:
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
    targets = np.array([0, 2])
    with LossClient(fuzz_server.target) as client:
        assert client.health() == "SERVING"
        result = client.multiclass_hinge(
            logits, targets, class_normalization="divide_by_num_classes"
        )
    expected = torch.nn.functional.multi_margin_loss(
        torch.from_numpy(logits), torch.from_numpy(targets)
    )
    assert result.loss == pytest.approx(float(expected), rel=1e-12)
    assert fuzz_server.server.batcher.stats.requests == 0
    assert fuzz_server.server.pool.stuck_workers() == []
