"""Large requests go up in parts (ComputeUpload): the request, then its scores' bytes.

gRPC copies every message it receives whole, several times over; a request of
many megabytes costs the server more to receive in one message than in parts of
about a megabyte, which stay in cache while they are copied (docs/benchmarks.md).
The parts are cut from the caller's own arrays: the scores' bytes are copied
once, into each part, instead of into a protobuf message and then out of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hingeloss._protowire import length_delimited_key, varint
from hingeloss.v1 import loss_service_pb2 as pb

COMPUTE_UPLOAD = "/hingeloss.v1.LossService/ComputeUpload"
# Requests whose scores hold at least this many bytes are uploaded in parts.
UPLOAD_MIN_BYTES = 4 << 20
# Bytes of scores a part carries: large enough that a part's overhead (a message
# through gRPC and the server's event loop) is small, small enough to stay in cache.
UPLOAD_PART_BYTES = 1 << 20

_REQUEST_KEY = length_delimited_key(pb.UploadPart, "request")
_DATA_KEY = length_delimited_key(pb.UploadPart, "data")


@dataclass(frozen=True)
class Upload:
    """A request whose score tensors' bytes travel apart, in parts."""

    request: pb.ComputeRequest
    # The score fields of the request's loss message whose bytes were left out, and
    # those bytes, in the order the contract sends them (the fields by number).
    apart: tuple[tuple[str, memoryview], ...]
    part_bytes: int = UPLOAD_PART_BYTES

    def parts(self) -> Iterator[bytes]:
        """The call's messages, serialized: the request, then the bytes part by part."""
        head = self.request.SerializeToString()
        yield b"".join((_REQUEST_KEY, varint(len(head)), head))
        for _, data in self.apart:
            for start in range(0, len(data), self.part_bytes):
                chunk = data[start : start + self.part_bytes]
                yield b"".join((_DATA_KEY, varint(len(chunk)), chunk))

    def whole(self) -> pb.ComputeRequest:
        """The request in one message, for a server without ComputeUpload: its bytes are
        written into `request` (so `parts` no longer applies)."""
        return _with_data(self.request, self.apart)


def _with_data(
    request: pb.ComputeRequest, apart: Sequence[tuple[str, memoryview]]
) -> pb.ComputeRequest:
    loss = getattr(request, request.WhichOneof("loss") or "")
    for field, data in apart:
        getattr(loss, field).data = bytes(data)
    return request


def split_request(
    request: pb.ComputeRequest,
    apart: Sequence[tuple[str, memoryview]],
    min_bytes: int | None,
) -> pb.ComputeRequest | Upload:
    """The request as one message, or as an Upload where its scores hold at least
    `min_bytes` (None: never)."""
    if min_bytes is not None and sum(len(data) for _, data in apart) >= min_bytes:
        return Upload(request, tuple(apart))
    return _with_data(request, apart)
