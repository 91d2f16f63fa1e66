"""Typed exceptions for the SDK, built from a gRPC status and its rich details.

grpcio-status reads the google.rpc.Status from a call's trailers; each exception
is chained to the original ``grpc.RpcError`` (its ``__cause__``), so nothing is hidden.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, e.g. ``multiclass_hinge.targets[3]``."""

    field: str
    description: str


class HingelossError(Exception):
    """Base class of every error the SDK raises for a failed call.

    Attributes:
        message: the status message.
        reason: the server's ErrorInfo reason (UPPER_SNAKE), or "".
        metadata: the server's ErrorInfo metadata, e.g. `streamIndex` and
            `requestId` of the request that ended a stream; empty when absent.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, *, reason: str = "", metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgumentError(HingelossError, ValueError):
    """The server rejected the request's contents; `field_violations` says where."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.field_violations = field_violations


class OverloadedError(HingelossError):
    """RESOURCE_EXHAUSTED: the server is shedding load (`retry_delay`: its suggested wait
    in seconds, where it names one); or, not retried, the request is too large for it (a
    message past its size limit, a batch past its device's memory), or a call without
    the token finds the server's limit of those taken."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_delay = retry_delay


class DeadlineExceededError(HingelossError, TimeoutError):
    """The call's deadline passed before the answer came."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(HingelossError, ConnectionError):
    """No server could take the call (down, unreachable or draining)."""

    code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(HingelossError, PermissionError):
    """The server requires a valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class CancelledError(HingelossError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class InternalError(HingelossError):
    """The server failed while computing (a bug or a device fault)."""

    code = grpc.StatusCode.INTERNAL


class StreamAbortedError(HingelossError):
    """A stream ended on another request's error before this request was answered.

    The server ends a ComputeStream at its first failing request, after answering
    every request before it; that request's future gets the error itself, and the
    requests after it get this one. Their answers were never delivered, and
    every call is a pure function of its request, so resubmitting them (on a
    new stream) is safe.

    Attributes:
        culprit: the error of the request that ended the stream (also `__cause__`).
    """

    code = grpc.StatusCode.ABORTED
    safe_to_resubmit = True

    def __init__(self, culprit: HingelossError) -> None:
        super().__init__(
            f"the stream ended before this request was answered, on another request's "
            f"{culprit.code.name}: {culprit.message}",
            reason="STREAM_ABORTED",
        )
        self.culprit = culprit
        self.__cause__ = culprit


_BY_CODE: dict[grpc.StatusCode, type[HingelossError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        OverloadedError,
        DeadlineExceededError,
        UnavailableError,
        UnauthenticatedError,
        CancelledError,
        InternalError,
    )
}


def _rich_status(call: grpc.Call) -> status_pb2.Status | None:
    """The google.rpc.Status in a finished call's trailers, read by grpcio-status."""
    if not callable(getattr(call, "trailing_metadata", None)):
        return None  # a bare RpcError carries no status
    # Details whose code or message contradict the call's are not its own; details that
    # do not parse say nothing. Either way the call's own code and message stand alone.
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
    except (ValueError, DecodeError):
        return None
    return status


async def _aio_rich_status(call: grpc.aio.Call) -> status_pb2.Status | None:
    """`_rich_status` of a finished grpc.aio call, read by grpcio-status's asyncio twin."""
    try:
        status: status_pb2.Status | None = await rpc_status.aio.from_call(call)
    except (ValueError, DecodeError):
        return None
    return status


def from_rpc_error(error: grpc.RpcError) -> HingelossError:
    """The typed exception of a failed call (not raised), chained to `error` as its cause.

    `error` is what a call raised: a sync call's RpcError (which is also the call)
    or a grpc.aio AioRpcError (the status a call ended with, as kept by a stream).
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    return _typed(code, message, _rich_status(error), cause=error)


async def from_aio_call(call: grpc.aio.Call, error: grpc.RpcError) -> HingelossError:
    """The typed exception of a failed grpc.aio call (not raised), chained to `error`."""
    code, message = await call.code(), await call.details()
    return _typed(code, message, await _aio_rich_status(call), cause=error)


def _typed(
    code: grpc.StatusCode,
    message: str | None,
    status: status_pb2.Status | None,
    *,
    cause: grpc.RpcError,
) -> HingelossError:
    """The exception for a status code, with what its BadRequest, RetryInfo and ErrorInfo say."""
    message = message or code.name
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    reason = ""
    metadata: dict[str, str] = {}
    for detail in status.details if status is not None else ():
        try:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry_delay = info.retry_delay.ToNanoseconds() / 1e9
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(error_info)
                reason = error_info.reason
                metadata = dict(error_info.metadata)
        except DecodeError:  # a detail that does not parse says nothing
            continue
    cls = _BY_CODE.get(code, HingelossError)
    result: HingelossError
    if cls is InvalidArgumentError:
        result = InvalidArgumentError(
            message, reason=reason, metadata=metadata, field_violations=tuple(violations)
        )
    elif cls is OverloadedError:
        result = OverloadedError(message, reason=reason, metadata=metadata, retry_delay=retry_delay)
    else:
        result = cls(message, reason=reason, metadata=metadata)
    if cls is HingelossError:
        result.code = code
    result.__cause__ = cause
    return result
