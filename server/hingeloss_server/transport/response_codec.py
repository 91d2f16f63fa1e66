"""Serializes a ComputeResponse with each tensor's bytes copied once, from tensor memory.

Through the protobuf API a gradient is copied three times on its way out: into a
bytes object, into the message field (upb copies on assignment) and into the
serialized message, the last two on the event loop (6 ms each for 16 MB here).
Here protobuf serializes only the small fields, and each tensor's bytes are
spliced in as they are: on the wire a message field is a key, a length and its
bytes, and a parser takes fields in any order. The one copy is the final join.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from hingeloss import _tensors as tensors
from hingeloss._protowire import length_delimited_key, varint
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.engine.jobs import FactoredRows, JobResult, LossJob, SparseRows, WireArray
from hingeloss_server.engine.losses import SPECS
from hingeloss_server.transport.loss_codecs import CODECS, KINK

# A piece of a serialized message: encoded fields, or a tensor's memory as it is.
Piece = bytes | memoryview

# The keys of the length-delimited fields written here, from the message descriptors
# (so they follow loss_service.proto), encoded once.
_RESPONSE_GRADIENTS = length_delimited_key(pb.ComputeResponse, "gradients")
_RESPONSE_PER_SAMPLE = length_delimited_key(pb.ComputeResponse, "per_sample_losses")
_GRADIENT_DENSE = length_delimited_key(pb.Gradient, "dense")
_GRADIENT_ROW_SPARSE = length_delimited_key(pb.Gradient, "row_sparse")
_GRADIENT_FACTORED = length_delimited_key(pb.Gradient, "factored")
_FACTORED_MASK = length_delimited_key(pb.FactoredGradient, "mask")
_FACTORED_ROW_VALUES = length_delimited_key(pb.FactoredGradient, "row_values")
_ROW_SPARSE_INDICES = length_delimited_key(pb.RowSparseTensor, "indices")
_ROW_SPARSE_VALUES = length_delimited_key(pb.RowSparseTensor, "values")
_TENSOR_DATA = length_delimited_key(pb.Tensor, "data")

# The wire dtype of each torch dtype an answer can hold, looked up once per tensor.
_WIRE_DTYPES: dict[torch.dtype, int] = {
    tensors.torch_dtype(info.wire): info.wire for info in tensors.BY_NAME.values()
}


class _Chunks:
    """Pieces of a serialized message and their total size, joined once at the end."""

    def __init__(self, *pieces: Piece) -> None:
        self.pieces: list[Piece] = []
        self.size = 0
        for piece in pieces:
            self.add(piece)

    def add(self, piece: Piece) -> None:
        self.pieces.append(piece)
        self.size += piece.nbytes if isinstance(piece, memoryview) else len(piece)

    def add_field(self, key: bytes, body: _Chunks) -> None:
        """A length-delimited field: its key, length, then the body's pieces as they are."""
        self.add(key + varint(body.size))
        self.pieces.extend(body.pieces)
        self.size += body.size


def _tensor(array: WireArray) -> _Chunks:
    head = pb.Tensor(dtype=_WIRE_DTYPES[array.dtype], shape=array.shape)  # type: ignore[arg-type]
    chunks = _Chunks(head.SerializeToString())
    chunks.add_field(_TENSOR_DATA, _Chunks(array.data))
    return chunks


def _factored(grad: FactoredRows) -> _Chunks:
    head = pb.FactoredGradient(dense_shape=grad.dense_shape, dtype=_WIRE_DTYPES[grad.dtype])  # type: ignore[arg-type]
    chunks = _Chunks(head.SerializeToString())
    chunks.add_field(_FACTORED_MASK, _Chunks(grad.mask))
    chunks.add_field(_FACTORED_ROW_VALUES, _tensor(grad.values))
    return chunks


def _gradient(name: str, grad: WireArray | SparseRows | FactoredRows) -> _Chunks:
    chunks = _Chunks(pb.Gradient(input=name).SerializeToString())
    if isinstance(grad, FactoredRows):
        chunks.add_field(_GRADIENT_FACTORED, _factored(grad))
    elif isinstance(grad, SparseRows):
        rows = _Chunks(pb.RowSparseTensor(dense_shape=grad.dense_shape).SerializeToString())
        rows.add_field(_ROW_SPARSE_INDICES, _tensor(grad.indices))
        rows.add_field(_ROW_SPARSE_VALUES, _tensor(grad.values))
        chunks.add_field(_GRADIENT_ROW_SPARSE, rows)
    else:
        chunks.add_field(_GRADIENT_DENSE, _tensor(grad))
    return chunks


def encode_response(job: LossJob, result: JobResult) -> bytes:
    """The serialized ComputeResponse of a computed job."""
    header = pb.ComputeResponse(
        request_id=job.request_id,
        loss=result.loss,
        sparsity=pb.Sparsity(samples=result.samples, active_samples=result.active),
        timing=pb.Timing(
            queue_us=int(result.queue_s * 1e6),
            compute_us=int(result.batch.compute_s * 1e6),
            batch_rows=result.batch.rows,
            batch_requests=result.batch.requests,
            device=result.batch.device,
        ),
        resolved=_resolved(job, result),
    )
    chunks = _Chunks(header.SerializeToString())
    for name, grad in zip(job.input_fields, result.grads, strict=False):
        chunks.add_field(_RESPONSE_GRADIENTS, _gradient(name, grad))
    for per_sample in result.per_sample:
        chunks.add_field(_RESPONSE_PER_SAMPLE, _tensor(per_sample))
    if chunks.size < JOIN_WITHOUT_GIL_BYTES:
        return b"".join(chunks.pieces)
    return join_without_gil(chunks.pieces, chunks.size)


# Answers at least this large are assembled with the GIL released (join_without_gil).
JOIN_WITHOUT_GIL_BYTES = 1 << 20
_PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
_PyBytes_FromStringAndSize.restype = ctypes.py_object
_PyBytes_FromStringAndSize.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]
# Where a bytes object's characters start (CPython's PyBytesObject.ob_sval).
_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1


def join_without_gil(pieces: list[Piece], size: int) -> bytes:
    """`b"".join(pieces)`, with the copying done while other threads run.

    `bytes.join` holds the GIL throughout as soon as one piece is not a bytes
    object, as the tensors' memoryviews are: hundreds of milliseconds in which
    the event loop stands still for a 512 MiB answer. Here the bytes object is
    created uninitialized (the C API's documented way to build one) and filled
    by numpy, which releases the GIL while it copies, before anyone else sees it.
    """
    out = _PyBytes_FromStringAndSize(None, size)
    address = id(out) + _BYTES_DATA_OFFSET
    target = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(address))
    offset = 0
    for piece in pieces:
        source = np.frombuffer(piece, dtype=np.uint8)
        np.copyto(target[offset : offset + source.size], source)
        offset += source.size
    assert offset == size
    return out  # type: ignore[no-any-return]


def _resolved(job: LossJob, result: JobResult) -> pb.ResolvedOptions:
    """The options the server applied, from the loss's spec and codec entry."""
    params = job.key.params
    options = job.options
    resolved = pb.ResolvedOptions(
        loss=params.kind.value,
        reduction=f"REDUCTION_{options.reduction.name}",
        gradient_format=f"GRADIENT_FORMAT_{options.gradient_format.name}",
    )
    resolved.compute_dtype = _WIRE_DTYPES[result.compute_dtype]  # type: ignore[assignment]
    # A hinge has a kink, a margin and a power, echoed even where they are fixed.
    if SPECS[params.kind].hinge:
        resolved.kink_subgradient = KINK.resolved(job)  # type: ignore[assignment]
        resolved.margin = params.margin
        resolved.power = params.power
    for switch in CODECS[params.kind].switches:
        setattr(resolved, switch.echo or switch.field, switch.resolved(job))
    return resolved


def payload_bytes(result: JobResult) -> int:
    """Bytes of an answer's tensors (what bytes_sent counts), before framing."""
    total = sum(len(p.data) for p in result.per_sample)
    for grad in result.grads:
        if isinstance(grad, SparseRows):
            total += len(grad.indices.data) + len(grad.values.data)
        elif isinstance(grad, FactoredRows):
            total += grad.mask.nbytes + len(grad.values.data)
        else:
            total += len(grad.data)
    return total
