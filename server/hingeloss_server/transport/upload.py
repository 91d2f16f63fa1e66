"""ComputeUpload: a request whose large tensors arrive in parts, assembled into one buffer.

gRPC hands a server each message as one bytes object, made by copying the
message's slices more than once; for a message of many megabytes those copies
run at memory speed, for parts of about a megabyte at cache speed (see
docs/benchmarks.md). Here each part is copied once more, into the buffer the
request's tensors then view. What comes out is the ParsedRequest that a Compute
call of the same request gives: the rest of the service cannot tell the two
apart, so the answers are the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from hingeloss import _tensors as tensors
from hingeloss._protowire import LEN, field_number, walk
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.errors import InvalidInputError, OverloadedError
from hingeloss_server.transport.budget import INFLIGHT_RETRY_S, ByteBudget, inflight_full
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.transport.request_wire import (
    LOSS_TENSOR_FIELDS,
    ParsedRequest,
    parse_request,
)
from hingeloss_server.transport.status import EndedEarlyError

_REQUEST = field_number(pb.UploadPart, "request")
_DATA = field_number(pb.UploadPart, "data")


@dataclass(frozen=True)
class _Apart:
    """A tensor of the request whose bytes come in the later parts."""

    key: tuple[str, str]  # as ParsedRequest.data keys it: (loss field, tensor field)
    field: str  # as errors name it, e.g. "multiclass_hinge.scores"
    nbytes: int


class UploadAssembler:
    """One ComputeUpload call: its first part (`begin`), the others (`add`), the request.

    Every check happens before the bytes it guards are held: the tensors sent apart
    are sized from the first part, within the server's request limit, before their
    buffer exists (allocated, not touched: memory is taken as parts fill it); a
    part that would run past them is refused, not stored.
    """

    def __init__(self, limits: LimitsConfig) -> None:
        self._limits = limits
        self._head: ParsedRequest | None = None
        self._apart: list[_Apart] = []
        self._buffer = np.empty(0, dtype=np.uint8)
        self._filled = 0
        self._parts = 0

    @property
    def pending(self) -> int:
        """Bytes the tensors sent apart still need."""
        return self._buffer.size - self._filled

    def begin(self, raw: bytes) -> None:
        """The first part: the request; sizes and allocates what is sent apart."""
        kind, payload = _part(raw, 0)
        if kind != _REQUEST:
            raise InvalidInputError("upload[0]", "the first part must carry the request")
        try:
            self._head = parse_request(payload)
        except DecodeError:
            raise InvalidInputError("upload[0].request", "is not a valid ComputeRequest") from None
        self._apart = _tensors_apart(self._head)
        total = 0
        for tensor in self._apart:
            total += tensor.nbytes
            if total > self._limits.max_request_bytes:
                raise InvalidInputError(
                    f"{tensor.field}.data",
                    f"the request's tensors need more than the server limit of "
                    f"{self._limits.max_request_bytes} bytes",
                )
        try:
            self._buffer = np.empty(total, dtype=np.uint8)
        except MemoryError:  # address space capped (ulimit -v, strict overcommit)
            raise OverloadedError(
                "inflight_full",
                INFLIGHT_RETRY_S,
                f"the server cannot set {total} bytes aside for this upload now",
            ) from None
        self._parts = 1
        # Every structural check of the request (shapes, dtypes, options, limits) now,
        # on the buffer still to be filled: a bad request is refused before its parts.
        decode_request(self._request(), self._limits)

    def add(self, raw: bytes) -> None:
        """A later part: the next bytes of the tensors sent apart."""
        kind, payload = _part(raw, self._parts)
        where = f"upload[{self._parts}]"
        if kind != _DATA:
            raise InvalidInputError(where, "only the first part carries a request")
        end = self._filled + len(payload)
        if end > self._buffer.size:
            raise InvalidInputError(
                f"{where}.data",
                f"runs past the {self._buffer.size} bytes the request's tensors sent apart declare",
            )
        self._buffer[self._filled : end] = np.frombuffer(payload, dtype=np.uint8)
        self._filled = end
        self._parts += 1

    def finish(self) -> ParsedRequest:
        """The whole request, its tensors sent apart viewing the buffer."""
        assert self._head is not None, "begin() first"
        if self._filled < self._buffer.size:
            offset = 0
            for tensor in self._apart:  # the first tensor left short names the error
                if self._filled < offset + tensor.nbytes:
                    arrived = max(0, self._filled - offset)
                    raise EndedEarlyError(
                        f"{tensor.field}.data",
                        f"the upload ended after {arrived} of its {tensor.nbytes} bytes",
                    )
                offset += tensor.nbytes
        return self._request()

    def _request(self) -> ParsedRequest:
        """The request with its tensors sent apart viewing the buffer (filled or not)."""
        assert self._head is not None
        data = dict(self._head.data or {})
        view = self._buffer.data
        offset = 0
        for tensor in self._apart:
            data[tensor.key] = view[offset : offset + tensor.nbytes]
            offset += tensor.nbytes
        return ParsedRequest(self._head.message, self._head.nbytes + self._buffer.size, data)


def _part(raw: bytes, index: int) -> tuple[int, memoryview]:
    """Which field of the `part` oneof a message sets, and its bytes.

    A part setting it more than once is refused rather than merged: no client has a
    reason to send one, and a refusal cannot be misread.
    """
    view = memoryview(raw)
    try:
        fields = walk(view)
    except (ValueError, IndexError):
        raise InvalidInputError(f"upload[{index}]", "is not a valid UploadPart") from None
    found = [
        (number, view[start:end])
        for number, wire_type, _, start, end in fields
        if number in (_REQUEST, _DATA) and wire_type == LEN
    ]
    if len(found) != 1:
        raise InvalidInputError(
            f"upload[{index}]", "must set exactly one of request and data, once"
        )
    return found[0]


def _tensors_apart(head: ParsedRequest) -> list[_Apart]:
    """The request's tensors with no data and elements declared, in the contract's order:
    the loss message's tensor fields by number, then sample_weights."""
    message = head.message
    loss = message.WhichOneof("loss")
    candidates: list[tuple[tuple[str, str], str, pb.Tensor]] = []
    if loss is not None:
        loss_message = getattr(message, loss)
        for name in LOSS_TENSOR_FIELDS[loss]:
            if loss_message.HasField(name) and getattr(loss_message, name).ByteSize():
                candidates.append(((loss, name), f"{loss}.{name}", getattr(loss_message, name)))
    if message.sample_weights.ByteSize():  # an empty Tensor is an absent one
        candidates.append((("", "sample_weights"), "sample_weights", message.sample_weights))
    apart = []
    for key, field, tensor in candidates:
        if len(head.tensor_data(key[0], key[1], tensor)):
            continue  # sent whole, in the request
        nbytes = _declared_bytes(tensor, field)
        if nbytes:
            apart.append(_Apart(key, field, nbytes))
    return apart


def _declared_bytes(tensor: pb.Tensor, field: str) -> int:
    """Bytes a tensor's dtype and shape call for: what its parts must bring."""
    if tensor.dtype not in tensors.BY_WIRE:
        raise InvalidInputError(f"{field}.dtype", f"unknown dtype {tensor.dtype}")
    for index, dim in enumerate(tensor.shape):
        if dim < 0:
            raise InvalidInputError(f"{field}.shape[{index}]", f"must be >= 0, got {dim}")
    return tensors.expected_nbytes(tensor)


async def receive_upload(
    context: grpc.aio.ServicerContext,
    limits: LimitsConfig,
    budget: ByteBudget,
    arriving: Callable[[], AbstractAsyncContextManager[None]],
) -> ParsedRequest:
    """A ComputeUpload's parts, read within `arriving` (the arrival limit), as one request.

    Each part, the first included, is held against the in-flight budget as it
    arrives, as what the server then holds: a caller cannot take the budget with
    bytes it declares and never sends, and uploads cannot outgrow it while they
    arrive. The call's own bytes never count against it: one upload alone gets in,
    as one Compute request does.
    """
    upload = UploadAssembler(limits)
    held = 0

    def hold(nbytes: int) -> None:
        nonlocal held
        if not budget.try_acquire(nbytes, own=held):
            raise inflight_full(budget)
        held += nbytes

    try:
        async with arriving():
            first = await context.read()
            if first is grpc.aio.EOF:
                raise EndedEarlyError("upload", "the call carried no part")
            hold(len(first))
            upload.begin(first)
            del first
            while (raw := await context.read()) is not grpc.aio.EOF:
                hold(len(raw))
                upload.add(raw)
        return upload.finish()
    finally:
        budget.release(held)
