"""The SDK against a server whose statuses are odd: details that do not parse, RetryInfo
delays that are negative or years long, a health status this SDK does not know.

Each call still ends, on time, with the status's own typed error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from helpers.servers import InProcessServer

from hingeloss import (
    NO_RETRY,
    AsyncLossClient,
    InvalidArgumentError,
    LossClient,
    OverloadedError,
    RetryPolicy,
)
from hingeloss._channel import serving_status

SERVICE = "hingeloss.v1.LossService"

rng = np.random.default_rng(11)
SCORES = rng.standard_normal((6, 5)).astype(np.float32)
TARGETS = rng.integers(0, 5, 6)


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
def refusing(
    serve_in_process: Callable[[InProcessServer], str],
) -> Callable[[grpc.StatusCode, bytes], str]:
    """Starts a refusing server; gives its target."""
    return lambda code, details: serve_in_process(_Refusing(code, details))


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
    """The stream's reader maps the status to an error and fails what is pending at once:
    a reader that died on the details would leave the caller waiting past its timeout."""
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
