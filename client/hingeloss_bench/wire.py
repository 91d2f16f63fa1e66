"""Reads a few fields of serialized messages without parsing them: the load loop stays cheap.

A response carrying a 16 MB gradient holds a handful of top-level fields; walking
their tags and lengths costs microseconds, where a full parse would copy the
gradient. Only the small Timing submessage is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

from hingeloss._protowire import LEN, VARINT, field_number, read_varint, walk
from hingeloss._upload import upload_of
from hingeloss.v1 import loss_service_pb2 as pb

_TIMING_FIELD = field_number(pb.ComputeResponse, "timing")
_TENSOR_DTYPE = field_number(pb.Tensor, "dtype")
_TENSOR_SHAPE = field_number(pb.Tensor, "shape")


def fields(
    buf: bytes | memoryview, start: int = 0, end: int | None = None
) -> list[tuple[int, int, int, int]]:
    """The fields of one message level, in wire order, as (number, wire type, start, end).

    For length-delimited fields, [start, end) is the payload; for varints, `start`
    holds the value and `end` the position after it; fixed-size fields give their span.
    """
    return [
        (number, wire_type, read_varint(buf, payload)[0] if wire_type == VARINT else payload, stop)
        for number, wire_type, _, payload, stop in walk(buf, start, end)
    ]


@dataclass(frozen=True)
class ServerTiming:
    """The Timing a response reports, in microseconds and rows."""

    queue_us: int
    compute_us: int
    batch_rows: int
    batch_requests: int


NO_TIMING = ServerTiming(0, 0, 0, 0)


def response_timing(payload: bytes) -> ServerTiming:
    """The Timing of a serialized ComputeResponse (zeros when it has none)."""
    for number, wire_type, start, end in fields(payload):
        if number == _TIMING_FIELD and wire_type == LEN:
            timing = pb.Timing.FromString(payload[start:end])
            return ServerTiming(
                timing.queue_us, timing.compute_us, timing.batch_rows, timing.batch_requests
            )
    return NO_TIMING


def tensor_header(buf: bytes | memoryview, start: int, end: int) -> tuple[int, tuple[int, ...]]:
    """(dtype, shape) of a serialized Tensor, without touching its data."""
    dtype = 0
    shape: list[int] = []
    for number, wire_type, value_start, value_end in fields(buf, start, end):
        if number == _TENSOR_DTYPE and wire_type == VARINT:
            dtype = value_start
        elif number == _TENSOR_SHAPE and wire_type == VARINT:
            shape.append(value_start)
        elif number == _TENSOR_SHAPE and wire_type == LEN:  # packed
            pos = value_start
            while pos < value_end:
                dim, pos = read_varint(buf, pos)
                shape.append(dim)
    return dtype, tuple(shape)


def upload_parts(payload: bytes) -> tuple[bytes, ...]:
    """A serialized ComputeRequest as the SDK uploads it (ComputeUpload's messages):
    the request without its scores' bytes, then those bytes in parts."""
    return upload_of(pb.ComputeRequest.FromString(payload)).parts
