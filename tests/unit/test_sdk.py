"""The SDK without a server: requests, answers, errors, retries, its public surface."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import time
import types
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

import hingeloss
from hingeloss import (
    NO_RETRY,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LossClient,
    OverloadedError,
    RetryPolicy,
    StreamAbortedError,
    UnavailableError,
)
from hingeloss import _tensors as tensors
from hingeloss._errors import from_rpc_error
from hingeloss._requests import InputKind, build_request, enum_value
from hingeloss._results import decode_response
from hingeloss._retry import CallAttempts, Retrier
from hingeloss.v1 import loss_service_pb2 as pb


def test_options_take_strings_or_enums() -> None:
    assert enum_value("CLASS_NORMALIZATION_", "divide_by_num_classes") == 2
    assert enum_value("CLASS_NORMALIZATION_", "CLASS_NORMALIZATION_DIVIDE_BY_NUM_CLASSES") == 2
    assert enum_value("KINK_SUBGRADIENT_", 2) == 2
    with pytest.raises(ValueError, match="choose from"):
        enum_value("TIE_BREAK_", "random")
    with pytest.raises(TypeError, match="takes no option 'tie_break'"):
        build_request(
            "binary_hinge", {"scores": [1.0], "labels": [1]}, {"tie_break": "first_index"}
        )
    with pytest.raises(TypeError, match="unknown option"):
        build_request("binary_hinge", {"scores": [1.0], "labels": [1]}, {"marginn": 1.0})


def test_unavailable_without_a_server() -> None:
    with (
        LossClient("127.0.0.1:1", timeout=5, retry=NO_RETRY) as client,
        pytest.raises(UnavailableError) as info,
    ):
        client.gan_generator(np.ones(2))
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_retry_never_outlives_the_deadline() -> None:
    policy = RetryPolicy(max_attempts=50, initial_backoff_s=0.2, max_backoff_s=0.2)
    with LossClient("127.0.0.1:1", timeout=1.0, retry=policy) as client:
        started = time.monotonic()
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            client.gan_generator(np.ones(2))
    assert time.monotonic() - started < 2.0


def test_public_surface() -> None:
    for name in hingeloss.__all__:
        assert hasattr(hingeloss, name), name
    assert issubclass(hingeloss.InvalidArgumentError, hingeloss.HingelossError)


def test_internals_are_private() -> None:
    """Public modules are the documented ones; every other public name is in __all__."""
    modules = {m.name for m in pkgutil.iter_modules(hingeloss.__path__)}
    assert {m for m in modules if not m.startswith("_")} == {"torch", "v1"}
    exported = {
        name
        for name in dir(hingeloss)
        if not name.startswith("_") and not isinstance(getattr(hingeloss, name), types.ModuleType)
    }
    assert exported == set(hingeloss.__all__) - {"__version__"}


def test_each_public_name_is_imported_from_its_home_for_type_checkers() -> None:
    """The lazy table and the TYPE_CHECKING imports of hingeloss/__init__.py agree."""
    tree = ast.parse(Path(hingeloss.__file__).read_text())
    typed = {
        alias.name: node.module.removeprefix("hingeloss.")
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hingeloss.")
        for alias in node.names
    }
    assert typed == hingeloss._HOMES  # noqa: SLF001 - the table under test
    assert set(typed) == set(hingeloss.__all__) - {"__version__"}


def test_importing_an_internal_module_loads_no_grpc() -> None:
    code = "import sys, hingeloss._factored; print('grpc' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_resource_exhausted_is_retried_only_when_the_server_sheds_load() -> None:
    policy = RetryPolicy()
    shedding = [
        OverloadedError("the queue is full", reason="QUEUE_FULL"),
        OverloadedError("busy", retry_delay=0.1),
        OverloadedError("Concurrent RPC limit exceeded!"),
    ]
    final = [
        OverloadedError("Received message larger than max (600 vs. 512)"),
        OverloadedError("Sent message larger than max (600 vs. 512)"),
        OverloadedError("the request does not fit", reason="DEVICE_OUT_OF_MEMORY"),
        OverloadedError("some quota ran out"),
    ]
    assert all(policy.is_retryable(e) for e in shedding)
    assert not any(policy.is_retryable(e) for e in final)
    assert all(policy.next_delay(1, e, None) is not None for e in shedding)
    assert all(policy.next_delay(1, e, None) is None for e in final)
    assert policy.is_retryable(UnavailableError("draining", reason="DRAINING"))
    assert not policy.is_retryable(InvalidArgumentError("bad"))


def test_only_the_servers_own_delay_past_the_longest_wait_ends_a_call() -> None:
    """Compared before jitter: a RetryInfo under max_retry_delay_s is always waited for,
    never longer than that, and the computed backoff is never cut short by it."""
    policy = RetryPolicy(max_attempts=10, max_retry_delay_s=60, jitter=1.0, max_backoff_s=100)
    asked = OverloadedError("busy", retry_delay=55.0)
    waits = [policy.next_delay(1, asked, None) for _ in range(200)]
    assert all(wait is not None and 0 <= wait <= 60 for wait in waits)
    assert policy.next_delay(1, OverloadedError("busy", retry_delay=61.0), None) is None
    assert policy.next_delay(1, OverloadedError("busy", retry_delay=-5.0), None) == 0.0
    unavailable = UnavailableError("down")
    assert all(policy.next_delay(9, unavailable, None) is not None for _ in range(200))


def test_retry_throttle_follows_grpc_token_bucket() -> None:
    retrier = Retrier(RetryPolicy(max_attempts=100, jitter=0.0))
    shed = OverloadedError("the queue is full", reason="QUEUE_FULL", retry_delay=0.01)
    allowed = [retrier.failed(1, shed, None) is not None for _ in range(7)]
    # 10 tokens; each failure costs one; retries only while more than 5 are left.
    assert allowed == [True, True, True, True, False, False, False]
    for _ in range(40):  # 0.1 token per success: 3 tokens become 7
        retrier.succeeded()
    assert retrier.failed(1, shed, None) is not None  # 6 left
    assert retrier.failed(1, shed, None) is None  # 5 left: not more than half

    # Failures that are not worth retrying cost nothing.
    assert retrier.throttle is not None
    tokens = retrier.throttle.tokens
    assert retrier.failed(1, InvalidArgumentError("bad"), None) is None
    assert retrier.throttle.tokens == tokens
    assert Retrier(RetryPolicy(throttle_max_tokens=None)).throttle is None
    with pytest.raises(ValueError, match="throttle_max_tokens"):
        RetryPolicy(throttle_max_tokens=0)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_call_attempts_say_when_to_retry_and_when_to_give_up() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.25, jitter=0.0)
    clock = _Clock()
    draining = UnavailableError("draining", reason="DRAINING")

    attempts = CallAttempts(Retrier(policy), 1.0, clock)
    assert attempts.start() == 1.0
    clock.now += 0.5
    assert attempts.retry_after(draining) == 0.25
    clock.now += 0.25
    assert attempts.start() == 0.25  # the call's deadline, not a fresh one per attempt
    with pytest.raises(UnavailableError) as info:  # a 0.5 s backoff would pass the deadline
        attempts.retry_after(draining)
    assert info.value is draining

    unlimited = CallAttempts(Retrier(policy), None, clock)
    assert unlimited.start() is None
    assert unlimited.retry_after(draining) == 0.25
    unlimited.start()
    assert unlimited.retry_after(draining) == 0.5
    unlimited.start()
    with pytest.raises(UnavailableError):  # the third attempt was the last
        unlimited.retry_after(draining)

    final = InvalidArgumentError("bad")
    with pytest.raises(InvalidArgumentError) as refused:
        CallAttempts(Retrier(policy), None, clock).retry_after(final)
    assert refused.value is final


class _FakeRpcError(grpc.RpcError):
    def __init__(self, status: status_pb2.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        message: str = self._status.message
        return message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


def test_error_info_metadata_is_parsed() -> None:
    info = error_details_pb2.ErrorInfo(
        reason="INVALID_ARGUMENT",
        domain="hingeloss.v1",
        metadata={"streamIndex": "3", "requestId": "r3"},
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    status = status_pb2.Status(code=3, message="bad labels", details=[packed])
    error = from_rpc_error(_FakeRpcError(status))
    assert isinstance(error, InvalidArgumentError)
    assert error.reason == "INVALID_ARGUMENT"
    assert error.metadata == {"streamIndex": "3", "requestId": "r3"}
    aborted = StreamAbortedError(error)
    assert aborted.culprit is error
    assert aborted.__cause__ is error
    assert "bad labels" in str(aborted)


def test_details_that_contradict_the_status_are_not_read() -> None:
    """grpcio-status checks the details against the call's own code and message."""
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason="QUEUE_FULL"))
    other = status_pb2.Status(code=8, message="bad labels", details=[packed])
    error = from_rpc_error(_FakeRpcError(other))
    assert isinstance(error, InvalidArgumentError)
    assert error.message == "bad labels"
    assert error.reason == ""
    assert isinstance(error.__cause__, _FakeRpcError)


def test_tensors_are_filled_in_place() -> None:
    scores = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # not contiguous
    message = pb.Tensor()
    tensors.fill_from_numpy(message, scores)
    assert message == tensors.from_numpy(scores)
    np.testing.assert_array_equal(tensors.to_numpy(message), scores)
    big_endian = np.arange(3, dtype=">f8")
    np.testing.assert_array_equal(tensors.to_numpy(tensors.from_numpy(big_endian)), [0, 1, 2])

    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        value = torch.arange(6).to(dtype).reshape(2, 3).t()
        message = pb.Tensor()
        tensors.fill_from_torch(message, value)
        assert message == tensors.from_torch(value)
        assert list(message.shape) == [3, 2]
        torch.testing.assert_close(tensors.to_torch(message), value.contiguous())

    weights = np.array([1.0, 2.0, 3.0])
    request, _ = build_request(
        "multiclass_hinge",
        {"scores": scores, "targets": np.array([0, 1, 1])},
        {"class_weights": weights, "sample_weights": weights, "request_id": "in-place"},
    )
    assert request.WhichOneof("loss") == "multiclass_hinge"
    assert request.request_id == "in-place"
    assert request.multiclass_hinge.scores == tensors.from_numpy(scores)
    assert request.multiclass_hinge.target_class_weights == tensors.from_numpy(weights)
    assert request.sample_weights == tensors.from_numpy(weights)
    empty, _ = build_request("gan_generator", {"fake_scores": np.zeros(0)}, {})
    assert empty.WhichOneof("loss") == "gan_generator"


def _response(values: np.ndarray) -> pb.ComputeResponse:
    response = pb.ComputeResponse(request_id="r", loss=0.5)
    tensors.fill_from_numpy(response.gradients.add().dense, values)
    return response


def test_torch_answers_are_owned_and_writable() -> None:
    values = np.linspace(-1, 1, 8, dtype=np.float32)
    response = _response(values)
    kind = InputKind(is_torch=True, device=torch.device("cpu"), dtype=torch.float32)
    first = decode_response(response, kind).grad
    second = decode_response(response, kind).grad
    first.add_(10)
    torch.testing.assert_close(second, torch.from_numpy(values))
    np.testing.assert_array_equal(tensors.to_numpy(response.gradients[0].dense), values)
    half = InputKind(is_torch=True, device=torch.device("cpu"), dtype=torch.float16)
    converted = decode_response(response, half).grad
    assert converted.dtype == torch.float16
    converted.mul_(2)


def test_values_unknown_to_this_sdk_do_not_break_decoding() -> None:
    """A newer server may resolve options or dtypes this SDK version does not know."""
    response = _response(np.ones(2))
    response.resolved.loss = "binary_hinge"
    response.resolved.reduction = 99  # type: ignore[assignment]
    response.resolved.tie_break = 7  # type: ignore[assignment]
    response.resolved.compute_dtype = 42  # type: ignore[assignment]
    result = decode_response(response, InputKind(is_torch=False))
    assert result.resolved["reduction"] == "unknown(99)"
    assert result.resolved["tie_break"] == "unknown(7)"
    assert result.resolved["compute_dtype"] == "unknown(42)"
    np.testing.assert_array_equal(result.grad, [1.0, 1.0])
    # Only a tensor actually decoded in an unknown dtype fails, and says why.
    response.gradients[0].dense.dtype = 42  # type: ignore[assignment]
    with pytest.raises(ValueError, match="dtype 42 is unknown to this version"):
        decode_response(response, InputKind(is_torch=False))
    cpu_torch = InputKind(is_torch=True, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype 42 is unknown to this version"):
        decode_response(response, cpu_torch)


def _factored_answer(request_id: str, loss: str) -> pb.ComputeResponse:
    """An answer of `loss` with a 2x3 factored gradient of "scores"."""
    response = pb.ComputeResponse(request_id=request_id, loss=0.5)
    response.resolved.loss = loss
    factored = response.gradients.add(input="scores").factored
    factored.dense_shape.extend([2, 3])
    factored.dtype = pb.DTYPE_FLOAT32
    factored.mask = bytes([0b011, 0b101])
    tensors.fill_from_numpy(factored.row_values, np.ones(2, dtype=np.float32))
    return response


def _malformed_message(response: pb.ComputeResponse, kind: InputKind) -> str:
    with pytest.raises(InternalError) as caught:
        decode_response(response, kind)
    assert caught.value.reason == "MALFORMED_ANSWER"
    return caught.value.message


def test_a_factored_gradient_for_a_request_without_targets_is_a_malformed_answer() -> None:
    """binary_hinge's request has no class targets to expand a mask with."""
    request, kind = build_request(
        "binary_hinge",
        {"scores": np.zeros((2, 3), np.float32), "labels": np.ones((2, 3))},
        {"gradient_format": "factored"},
    )
    response = _factored_answer(request.request_id, "binary_hinge")
    assert "without targets" in _malformed_message(response, kind)


def test_a_factored_gradient_of_a_loss_without_one_is_a_malformed_answer() -> None:
    """Only the multi-class hinges factor: no rule expands another loss's mask."""
    kind = InputKind(is_torch=False, true_classes=np.zeros(2, dtype=np.int64))
    response = _factored_answer("r", "margin_ranking")
    assert "margin_ranking" in _malformed_message(response, kind)


@pytest.mark.parametrize("numpy_counts", [True, False], ids=["bitwise_count", "table"])
def test_row_counts_of_packed_masks_match_the_unpacked_sums(
    numpy_counts: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both counters (numpy's bitwise_count and the table numpy before 2.0 needs) against a sum."""
    from hingeloss import _factored as factored

    if not numpy_counts:
        monkeypatch.delattr(np, "bitwise_count", raising=False)

    rng = np.random.default_rng()
    columns = int(rng.integers(1, 70))
    mask = rng.random((9, columns)) < rng.random((9, 1))
    mask[0] = False
    mask[1] = True
    bits = np.packbits(mask, axis=1, bitorder="little")
    every_byte = np.arange(256, dtype=np.uint8)[:, None]
    assert np.array_equal(factored._POPCOUNT, np.unpackbits(every_byte, axis=1).sum(1))
    expected = mask.sum(1).astype(np.float32)
    assert np.array_equal(factored.row_counts_numpy(bits, np.dtype(np.float32)), expected)
