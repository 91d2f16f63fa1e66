"""Parses a large ComputeRequest without copying its tensors' bytes.

Through protobuf a request's tensor bytes are copied twice, both with the GIL
held: into the parsed message, then out of it on every read of `data` (upb hands
out a fresh bytes object). For a 512 MiB request that stalls the event loop, and
every other caller, for most of a second, and holds three copies. Here the wire
format is walked instead: each `Tensor.data` field is located and left where it
is (a memoryview of the received bytes, which the decoded tensors then view), and
protobuf parses only the rest (dtypes, shapes, options, ids), a few hundred bytes.
Protobuf's own rules are kept: the last occurrence of a field wins, a repeated
sub-message merges, a loss field other than the current one resets the oneof, and
a field with an unexpected wire type is an unknown field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from hingeloss._protowire import LEN, MAX_FIELDS, varint, walk
from hingeloss.v1 import loss_service_pb2 as pb

# Smaller messages are parsed by protobuf directly: the walk would cost more than the copy.
# Measured in-process (parse and decode of 1000-class float32 requests): 35 against 37 us
# at 64 KB, 63 against 39 us at 256 KB, 159 against 37 us at 1 MB.
WIRE_PARSE_MIN_BYTES = 64 << 10

_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_SAMPLE_WEIGHTS = pb.ComputeRequest.DESCRIPTOR.fields_by_name["sample_weights"].number
_LOSS_FIELDS = pb.ComputeRequest.DESCRIPTOR.oneofs_by_name["loss"].fields
_LOSSES = {f.number: f.name for f in _LOSS_FIELDS}


def _tensor_fields(loss: Any) -> dict[int, str]:
    """The Tensor fields of a loss message, by field number."""
    message = loss.message_type
    assert message is not None  # every loss field is a message
    tensor = pb.Tensor.DESCRIPTOR.full_name
    return {
        f.number: f.name
        for f in message.fields
        if f.message_type is not None and f.message_type.full_name == tensor
    }


_LOSS_TENSORS = {f.number: _tensor_fields(f) for f in _LOSS_FIELDS}
# The Tensor fields of each loss message, by its name in the oneof, by field number.
LOSS_TENSOR_FIELDS: dict[str, tuple[str, ...]] = {
    f.name: tuple(name for _, name in sorted(_LOSS_TENSORS[f.number].items())) for f in _LOSS_FIELDS
}


@dataclass
class ParsedRequest:
    """A request as protobuf sees it, except that some tensors' `data` live in `data`.

    `data` maps (loss field, tensor field) to the bytes of that tensor's `data`,
    kept out of `message`; the request's own tensors (sample_weights) have "" as
    loss field. A tensor missing from it has its data (if any) in `message`.
    `nbytes` is the size of what was received for the request.
    """

    message: pb.ComputeRequest
    nbytes: int
    data: dict[tuple[str, str], memoryview] | None = field(default=None)

    def has_data(self, loss_field: str, name: str) -> bool:
        """Whether a tensor's data were set apart (and so are not in `message`)."""
        return self.data is not None and len(self.data.get((loss_field, name), b"")) > 0

    def tensor_data(self, loss_field: str, name: str, tensor: pb.Tensor) -> bytes | memoryview:
        """The bytes of a tensor's `data`: those set apart, or a copy out of `message`."""
        if self.data is not None and (loss_field, name) in self.data:
            return self.data[(loss_field, name)]
        return tensor.data


def parse_request(raw: bytes | memoryview) -> ParsedRequest:
    """Parses a serialized ComputeRequest; raises DecodeError when it is not one."""
    if len(raw) < WIRE_PARSE_MIN_BYTES:
        return ParsedRequest(pb.ComputeRequest.FromString(bytes(raw)), len(raw))
    view = memoryview(raw)
    data: dict[tuple[str, str], memoryview] = {}
    loss = ""
    budget = _FieldBudget()

    def request_field(number: int, start: int, end: int) -> bytes | None:
        nonlocal loss, data
        if number == _SAMPLE_WEIGHTS:
            return _length_delimited(
                number, _tensor(view, start, end, ("", "sample_weights"), data, budget)
            )
        if number not in _LOSSES:
            return None
        if _LOSSES[number] != loss:  # the oneof switches: the old loss is gone
            data = {k: v for k, v in data.items() if k[0] == ""}
            loss = _LOSSES[number]
        tensors = _LOSS_TENSORS[number]

        def loss_field(inner: int, start: int, end: int) -> bytes | None:
            if inner not in tensors:
                return None
            return _length_delimited(
                inner, _tensor(view, start, end, (loss, tensors[inner]), data, budget)
            )

        return _length_delimited(number, _rewrite(view, start, end, loss_field, budget))

    try:
        skeleton = _rewrite(view, 0, len(view), request_field, budget)
    except (ValueError, IndexError) as error:
        raise DecodeError(f"malformed request: {error}") from None
    return ParsedRequest(pb.ComputeRequest.FromString(skeleton), len(raw), data)


def _tensor(
    view: memoryview,
    start: int,
    end: int,
    key: tuple[str, str],
    data: dict[tuple[str, str], memoryview],
    budget: _FieldBudget,
) -> bytes:
    """The Tensor without its data, which goes to `data[key]` (the last occurrence wins)."""

    def without_data(number: int, start: int, end: int) -> bytes | None:
        if number != _TENSOR_DATA:
            return None
        data[key] = view[start:end]
        return b""

    return _rewrite(view, start, end, without_data, budget)


class _FieldBudget:
    """The fields one parse may still list: every level of the message draws on it, so
    that nesting (a singular field repeated, protobuf merges it) cannot multiply it."""

    def __init__(self) -> None:
        self.left = MAX_FIELDS

    def walk(self, view: memoryview, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
        fields = walk(view, start, end, limit=self.left)
        self.left -= len(fields)
        return fields


def _rewrite(
    view: memoryview,
    start: int,
    end: int,
    rewrite: Callable[[int, int, int], bytes | None],
    budget: _FieldBudget,
) -> bytes:
    """One message level, re-encoded with some of its length-delimited fields rewritten.

    `rewrite(number, payload start, payload end)` gives a field's new encoding,
    or None to keep it as it is; other wire types are kept as they are.
    """
    parts = []
    for number, wire_type, key_start, payload, stop in budget.walk(view, start, end):
        new = rewrite(number, payload, stop) if wire_type == LEN else None
        parts.append(bytes(view[key_start:stop]) if new is None else new)
    return b"".join(parts)


def _length_delimited(number: int, body: bytes) -> bytes:
    return varint(number << 3 | LEN) + varint(len(body)) + body
