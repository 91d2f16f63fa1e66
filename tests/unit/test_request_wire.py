"""The zero-copy request parser agrees with protobuf on every message, odd ones included.

`parse_request` walks large messages itself and leaves each tensor's data in the
received bytes; whatever it returns, put back together, must be exactly what
protobuf parses from the same bytes, and what protobuf refuses it must refuse.
The size threshold is lowered to 0 here so that small messages take the walk.
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from helpers.cases import random_inputs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hingeloss._protowire import varint
from hingeloss._requests import SCORE_FIELDS, build_request
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import LimitsConfig
from hingeloss_server.transport import request_wire
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.transport.request_wire import ParsedRequest, parse_request

LOSSES = tuple(SCORE_FIELDS)


@pytest.fixture(autouse=True)
def walk_every_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(request_wire, "WIRE_PARSE_MIN_BYTES", 0)


def _serialized(loss: str, seed: int, rows: int = 7, **options: object) -> bytes:
    inputs = random_inputs(loss, np.random.default_rng(seed), rows)
    request, _ = build_request(loss, inputs, {"request_id": f"{loss}-{seed}", **options})
    return request.SerializeToString()


def _rebuilt(parsed: ParsedRequest) -> pb.ComputeRequest:
    """The parsed request with every tensor's data put back into the message."""
    message = pb.ComputeRequest()
    message.CopyFrom(parsed.message)
    assert parsed.data is not None
    for (loss, name), data in parsed.data.items():
        owner = getattr(message, loss) if loss else message
        getattr(owner, name).data = bytes(data)
    return message


def _agrees(raw: bytes) -> None:
    try:
        expected = pb.ComputeRequest.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_request(raw)
        return
    parsed = parse_request(raw)
    assert _rebuilt(parsed) == expected
    assert parsed.nbytes == len(raw)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_parses_as_protobuf_parses_it(loss: str) -> None:
    raw = _serialized(loss, 1, sample_weights=np.arange(7.0))
    _agrees(raw)
    parsed = parse_request(raw)
    assert parsed.data is not None
    # The data are views of the received bytes, not copies.
    assert all(view.obj is raw for view in parsed.data.values())


def test_decoded_tensors_view_the_received_bytes() -> None:
    raw = _serialized("multiclass_hinge", 2, rows=64)
    job = decode_request(parse_request(raw), LimitsConfig())
    via_protobuf = decode_request(pb.ComputeRequest.FromString(raw), LimitsConfig())
    assert job.inputs[0].equal(via_protobuf.inputs[0])
    assert job.targets is not None
    assert via_protobuf.targets is not None
    assert job.targets.equal(via_protobuf.targets)
    assert job.nbytes == via_protobuf.nbytes


@pytest.mark.parametrize(
    "parts",
    [
        # A repeated sub-message merges; the last data wins.
        ("binary_hinge", "binary_hinge"),
        # The oneof switches away and back: the first binary_hinge is gone.
        ("binary_hinge", "multiclass_hinge", "binary_hinge"),
        ("gan_discriminator", "margin_ranking"),
    ],
)
def test_merged_and_switched_messages(parts: tuple[str, ...]) -> None:
    _agrees(b"".join(_serialized(loss, seed) for seed, loss in enumerate(parts)))


def test_unknown_fields_and_unexpected_wire_types() -> None:
    raw = _serialized("binary_hinge", 3)
    # Unknown field 99 (a varint), and the binary_hinge field sent as a varint: both unknown.
    loss_number = pb.ComputeRequest.DESCRIPTOR.fields_by_name["binary_hinge"].number
    _agrees(raw + bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 5]))
    _agrees(raw + bytes([loss_number << 3 | 0, 1]))
    # A Tensor whose data comes as a fixed32: unknown, and the tensor has no data.
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1]).SerializeToString()
    odd = tensor + bytes([3 << 3 | 5, 0, 0, 128, 63])
    hinge = bytes([1 << 3 | 2, len(odd)]) + odd
    _agrees(bytes([loss_number << 3 | 2, len(hinge)]) + hinge)


def test_truncated_and_corrupt_messages_are_refused() -> None:
    raw = _serialized("crammer_singer", 4)
    for cut in (1, 2, 5, len(raw) // 2, len(raw) - 1):
        _agrees(raw[:cut])
    with pytest.raises(DecodeError):
        parse_request(raw[:-1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    loss=st.sampled_from(LOSSES),
    seed=st.integers(0, 2**16),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
# A corruption that once passed the walk: a varint ran past the end of its Tensor.
@example(loss="margin_ranking", seed=35, edits=[(145, 242), (987, 18)])
def test_corrupted_requests_agree_with_protobuf(
    loss: str, seed: int, edits: list[tuple[int, int]]
) -> None:
    """Bytes changed at random: refused by both, or parsed to the same message."""
    raw = bytearray(_serialized(loss, seed, rows=3))
    for position, value in edits:
        raw[position % len(raw)] = value
    data = bytes(raw)
    try:
        expected = pb.ComputeRequest.FromString(data)
    except DecodeError:
        expected = None
    try:
        parsed = parse_request(data)
    except DecodeError:
        # The walk refuses groups (wire types 3 and 4), which protobuf keeps as
        # unknown fields; nothing else that protobuf accepts.
        assert expected is None or _has_group(data)
        return
    assert expected is not None
    assert _rebuilt(parsed) == expected


def _has_group(data: bytes) -> bool:
    return any(byte & 7 in (3, 4) for byte in data)


def test_a_level_of_too_many_fields_is_refused_before_it_is_listed() -> None:
    """Millions of tiny unknown fields would each cost a Python tuple, megabytes of
    them, on the event loop: a level past MAX_FIELDS does not parse."""
    request = pb.ComputeRequest(request_id="r").SerializeToString()
    flood = request + b"\x7a\x00" * (1 << 20)  # field 15, empty, a million times: 2 MB
    with pytest.raises(DecodeError, match="more than 1024 fields"):
        parse_request(flood)


def test_nesting_cannot_multiply_the_field_bound() -> None:
    """Every level draws on one budget: 100 loss messages of 100 tensors of 10 empty
    fields each (no level past 1,024; protobuf merges repeated messages) do not parse."""
    tensor = b"\x7a\x00" * 10
    scores_key = pb.MulticlassHinge.DESCRIPTOR.fields_by_name["scores"].number << 3 | 2
    loss_key = pb.ComputeRequest.DESCRIPTOR.fields_by_name["multiclass_hinge"].number << 3 | 2
    loss = (bytes([scores_key, len(tensor)]) + tensor) * 100
    flood = (bytes([loss_key]) + varint(len(loss)) + loss) * 100
    assert len(flood) >= request_wire.WIRE_PARSE_MIN_BYTES  # the walk, not protobuf
    with pytest.raises(DecodeError, match="more than 1024 fields"):
        parse_request(flood)
