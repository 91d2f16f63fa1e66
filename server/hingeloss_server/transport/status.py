"""The one table from domain errors to gRPC statuses, with their rich details.

INVALID_ARGUMENT carries a google.rpc.BadRequest naming the field; load shedding a
RetryInfo; every status an ErrorInfo (reason UPPER_SNAKE, domain hingeloss.v1, and
lowerCamel metadata such as the failing request of a stream).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from hingeloss_server.engine.batch_queue import DEADLINE_SLACK_S
from hingeloss_server.engine.errors import (
    ArrivalTimeoutError,
    ComputeFailedError,
    DeadlineExpiredError,
    DeviceFailedError,
    DrainingError,
    HingelossError,
    InvalidInputError,
    OverloadedError,
)

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "hingeloss.v1"


class EndedEarlyError(InvalidInputError):
    """A call's request stream ended before its request was complete.

    So it does when its caller cancels it, or its deadline passes, mid-arrival: the
    reads end as if the request were complete, and the cancellation reaches the
    handler a moment later. Such a refusal waits for it (servicer.CANCEL_GRACE_S).
    """


def gave_up_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why a call ended without its answer when the server did not end it.

    gRPC tells a handler only that its call was cancelled, whether its caller gave
    up or its deadline passed; the time left says which.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


@dataclass(frozen=True)
class StatusMapping:
    """How one domain error is reported: its code, ErrorInfo reason and metrics label."""

    code: grpc.StatusCode
    reason: str
    # Label of hingeloss_requests_rejected_total, or None when it is not a rejection.
    rejected: str | None


def status_mapping(error: HingelossError) -> StatusMapping:
    if isinstance(error, InvalidInputError):
        return StatusMapping(
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "invalid_argument"
        )
    if isinstance(error, OverloadedError):
        # The SDK retries QUEUE_FULL and INFLIGHT_FULL (load shed), with RetryInfo.
        return StatusMapping(grpc.StatusCode.RESOURCE_EXHAUSTED, error.reason.upper(), error.reason)
    if isinstance(error, DeadlineExpiredError):
        return StatusMapping(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXPIRED_IN_QUEUE", None)
    if isinstance(error, ArrivalTimeoutError):
        return StatusMapping(
            grpc.StatusCode.DEADLINE_EXCEEDED, "REQUEST_ARRIVAL_TIMEOUT", "arrival_timeout"
        )
    if isinstance(error, DrainingError):
        return StatusMapping(grpc.StatusCode.UNAVAILABLE, "DRAINING", "draining")
    if isinstance(error, DeviceFailedError):
        return StatusMapping(grpc.StatusCode.UNAVAILABLE, "DEVICE_FAILED", None)
    if isinstance(error, ComputeFailedError) and error.out_of_memory:
        return StatusMapping(grpc.StatusCode.RESOURCE_EXHAUSTED, "DEVICE_OUT_OF_MEMORY", None)
    return StatusMapping(grpc.StatusCode.INTERNAL, "INTERNAL", None)


def error_status(error: HingelossError, metadata: Mapping[str, str] | None = None) -> grpc.Status:
    """The rich status for a domain error; `metadata` goes into its ErrorInfo."""
    mapping = status_mapping(error)
    details = []
    if isinstance(error, InvalidInputError):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.description
                    )
                ]
            )
        )
    if isinstance(error, OverloadedError):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    details.append(
        error_details_pb2.ErrorInfo(
            reason=mapping.reason, domain=ERROR_DOMAIN, metadata=dict(metadata or {})
        )
    )
    packed = []
    for detail in details:
        wrapped = any_pb2.Any()
        wrapped.Pack(detail)
        packed.append(wrapped)
    status = status_pb2.Status(code=mapping.code.value[0], message=str(error), details=packed)
    return rpc_status.to_status(status)


# Request ids are the caller's: at most this much of one goes into a log or a status.
REQUEST_ID_ECHO_CHARS = 64


def short_request_id(request_id: str) -> str:
    return request_id[:REQUEST_ID_ECHO_CHARS]


async def abort_call(
    context: grpc.aio.ServicerContext, error: HingelossError, metadata: dict[str, str]
) -> None:
    """Ends the call with the error's rich status, keeping none of the request alive."""
    status = error_status(error, metadata)
    if status.code is grpc.StatusCode.INTERNAL:
        logger.error("request %r: %s", metadata.get("requestId", ""), error)
    forget_frames(error)
    await context.abort_with_status(status)


def forget_frames(error: BaseException) -> None:
    """Drops the tracebacks of an error and of every error it chains to.

    gRPC keeps the exception an abort raises (chained to this error) for as long as
    it keeps the call's state; the frames in these tracebacks hold the request's
    bytes and tensors, megabytes a refused request would otherwise keep. The status
    says all a caller needs (INTERNAL errors are logged with theirs beforehand).
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
