"""Protobuf wire-format primitives: varints and field keys, for code that walks or splices bytes.

The server's response splicer and request parser and the load-testing client's
response reader handle serialized messages without protobuf's copies; they all
encode and decode keys and lengths here. Field numbers come from the message
descriptors, never from literals, so the code follows the proto.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# Wire types (protobuf encoding guide): the low three bits of a field's key.
VARINT, I64, LEN, I32 = 0, 1, 2, 5

_LENGTH_DELIMITED_TYPES = frozenset(
    {FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING}
)


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint encoding of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


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


# Fields a message may hold for `walk` (its callers count every level's against it).
# The service's messages have a few dozen at most (a shape's dims are one packed
# field); millions of tiny fields would cost a Python tuple each, megabytes of them,
# on the event loop that every caller shares.
MAX_FIELDS = 1024


def walk(
    buf: bytes | memoryview, start: int = 0, end: int | None = None, limit: int = MAX_FIELDS
) -> list[tuple[int, int, int, int, int]]:
    """The fields of one message level, in wire order.

    Each is (number, wire type, key start, payload start, end); a varint's payload is
    its encoded bytes. Raises ValueError where protobuf would refuse the level: field
    number 0, a group or unknown wire type, or a field that runs past the level's end;
    and past `limit` fields.
    """
    stop = len(buf) if end is None else end
    found: list[tuple[int, int, int, int, int]] = []
    pos = start
    while pos < stop:
        if len(found) == limit:
            raise ValueError(f"more than {MAX_FIELDS} fields")
        key_start = pos
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        payload = pos
        if wire_type == VARINT:
            _, pos = read_varint(buf, pos)
        elif wire_type == LEN:
            length, payload = read_varint(buf, pos)
            pos = payload + length
        elif wire_type in (I64, I32):
            pos += 8 if wire_type == I64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > stop:
            raise ValueError("truncated field")
        found.append((number, wire_type, key_start, payload, pos))
    return found


def field_number(message: type[Message], name: str) -> int:
    """The number of a message's field, by name (KeyError for a field it lacks)."""
    return int(message.DESCRIPTOR.fields_by_name[name].number)


def length_delimited_key(message: type[Message], name: str) -> bytes:
    """The encoded key of a message, bytes or string field: what precedes its length.

    Computed once at import by its users, so that a renumbered or retyped field
    fails there rather than producing bytes that parse as something else.
    """
    field = message.DESCRIPTOR.fields_by_name[name]
    if field.type not in _LENGTH_DELIMITED_TYPES:
        raise TypeError(f"{message.DESCRIPTOR.name}.{name} is not length-delimited")
    return varint(field.number << 3 | LEN)
