"""Reads a few fields of serialized messages without parsing them: the load loop stays cheap.

A response carrying a 16 MB gradient holds a handful of top-level fields; walking
their tags and lengths costs microseconds, where a full parse would copy the
gradient. Only the small Timing submessage is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

from hingeloss.v1 import loss_service_pb2 as pb

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_TIMING_FIELD = pb.ComputeResponse.DESCRIPTOR.fields_by_name["timing"].number


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decodes the varint at `pos`; returns (value, position after it)."""
    result = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def fields(
    buf: bytes | memoryview, start: int = 0, end: int | None = None
) -> list[tuple[int, int, int, int]]:
    """The fields of one message level, in wire order, as (number, wire type, start, end).

    For length-delimited fields, [start, end) is the payload; for varints, `start`
    holds the value and `end` the position after it; fixed-size fields give their span.
    """
    stop = len(buf) if end is None else end
    pos = start
    found: list[tuple[int, int, int, int]] = []
    while pos < stop:
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = read_varint(buf, pos)
            found.append((number, wire_type, value, pos))
        elif wire_type == _LEN:
            length, pos = read_varint(buf, pos)
            found.append((number, wire_type, pos, pos + length))
            pos += length
        elif wire_type == _I64:
            found.append((number, wire_type, pos, pos + 8))
            pos += 8
        elif wire_type == _I32:
            found.append((number, wire_type, pos, pos + 4))
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if pos != stop:
        raise ValueError("truncated message")
    return found


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
        if number == _TIMING_FIELD and wire_type == _LEN:
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
        if number == 1 and wire_type == _VARINT:
            dtype = value_start
        elif number == 2 and wire_type == _VARINT:
            shape.append(value_start)
        elif number == 2 and wire_type == _LEN:  # packed
            pos = value_start
            while pos < value_end:
                dim, pos = read_varint(buf, pos)
                shape.append(dim)
    return dtype, tuple(shape)
