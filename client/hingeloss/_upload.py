"""Large requests go up in parts (ComputeUpload): the request, then its scores' bytes.

gRPC copies every message it receives whole, several times over; a request of
many megabytes costs the server more to receive in one message than in parts of
about a megabyte, which stay in cache while they are copied (docs/benchmarks.md).
The parts are cut from the caller's own arrays: the scores' bytes are copied
once, into each part, instead of into a protobuf message and then out of it.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from hingeloss._protowire import length_delimited_key, varint, walk
from hingeloss._requests import SCORE_FIELDS_BY_NUMBER
from hingeloss.v1 import loss_service_pb2 as pb

COMPUTE_UPLOAD = "/hingeloss.v1.LossService/ComputeUpload"


class UploadDefault(enum.Enum):
    """Default of `upload_min_bytes`: the client's own (SYNC_ or ASYNC_UPLOAD_MIN_BYTES)."""

    CLIENT = "the client's default"


# Requests whose scores hold at least this many bytes are uploaded in parts by default.
# Measured (docs/benchmarks.md): grpcio's sync unary calls pay for large messages
# from about 0.25 MB on, its asyncio ones only from about 8 MB.
SYNC_UPLOAD_MIN_BYTES = 500_000
ASYNC_UPLOAD_MIN_BYTES = 8_000_000
# Bytes of scores a part carries: large enough that a part's overhead (a message
# through gRPC and the server's event loop) is small, small enough to stay in cache;
# with the part's framing, a message of at most 1 MiB.
UPLOAD_PART_BYTES = (1 << 20) - 16

_REQUEST_KEY = length_delimited_key(pb.UploadPart, "request")
_DATA_KEY = length_delimited_key(pb.UploadPart, "data")


@dataclass(frozen=True)
class Upload:
    """A request sent in parts, serialized when the call is made.

    The parts are copies: the caller may change its arrays as soon as the method
    has returned (or its coroutine has been made), and every attempt of the call
    sends the same bytes.
    """

    # The request without the bytes sent apart.
    request: pb.ComputeRequest
    # The score fields whose bytes were sent apart, with their sizes, in the order
    # the contract sends them (the fields by number).
    apart: tuple[tuple[str, int], ...]
    # The call's messages: the request, then the bytes part by part.
    parts: tuple[bytes, ...]

    @functools.cached_property
    def whole(self) -> pb.ComputeRequest:
        """The request in one message, for a server without ComputeUpload."""
        data = b"".join(_payload(part) for part in self.parts[1:])
        whole = pb.ComputeRequest()
        whole.CopyFrom(self.request)
        loss = getattr(whole, whole.WhichOneof("loss") or "")
        offset = 0
        for field, nbytes in self.apart:
            getattr(loss, field).data = data[offset : offset + nbytes]
            offset += nbytes
        return whole


def make_upload(
    request: pb.ComputeRequest,
    apart: Sequence[tuple[str, memoryview]],
    part_bytes: int = UPLOAD_PART_BYTES,
) -> Upload:
    """The Upload of a request whose score fields in `apart` hold no data."""
    head = request.SerializeToString()
    parts = [b"".join((_REQUEST_KEY, varint(len(head)), head))]
    for _, data in apart:
        for start in range(0, len(data), part_bytes):
            chunk = data[start : start + part_bytes]
            parts.append(b"".join((_DATA_KEY, varint(len(chunk)), chunk)))
    return Upload(request, tuple((field, len(data)) for field, data in apart), tuple(parts))


def upload_of(request: pb.ComputeRequest) -> Upload:
    """The Upload of a whole request: its score tensors' bytes are moved apart."""
    loss = request.WhichOneof("loss") or ""
    message = getattr(request, loss)
    apart = []
    for field in SCORE_FIELDS_BY_NUMBER[loss]:
        tensor = getattr(message, field)
        apart.append((field, memoryview(tensor.data)))
        tensor.ClearField("data")
    return make_upload(request, apart)


def split_request(
    request: pb.ComputeRequest,
    apart: Sequence[tuple[str, memoryview]],
    min_bytes: int | None,
) -> pb.ComputeRequest | Upload:
    """The request as one message (its score bytes written in), or as an Upload where
    its scores hold at least `min_bytes` (None: never)."""
    if min_bytes is not None and sum(len(data) for _, data in apart) >= min_bytes:
        return make_upload(request, apart)
    loss = getattr(request, request.WhichOneof("loss") or "")
    for field, data in apart:
        getattr(loss, field).data = bytes(data)
    return request


def _payload(part: bytes) -> memoryview:
    """The bytes a serialized data part carries."""
    ((_, _, _, start, end),) = walk(part)
    return memoryview(part)[start:end]
