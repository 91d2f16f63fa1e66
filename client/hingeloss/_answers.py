"""Checks a server's answer against the request it answers, before it is decoded.

A server (or anything between it and the caller) that answers with a gradient of
another shape, dtype or size, with bytes that do not match what they declare, or
with another request's answer must not hand the caller a wrong array, memory
nobody wrote, or a numpy error from deep inside the decoding: the call fails with
`InternalError`, reason MALFORMED_ANSWER, saying what did not fit.

`check_answer` reads names, dtypes and shapes only: reading a bytes field copies it
(upb). What the data holds (its size, row indices, mask bits) is checked as it is
decoded, which reads it once anyway (`check_rows`, `mask_bits`, and DataSizeError
from the tensors), inside `malformed`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from hingeloss import _factored as factored
from hingeloss import _tensors as tensors
from hingeloss._errors import InternalError
from hingeloss._requests import InputKind, SentScores, enum_name
from hingeloss.v1 import loss_service_pb2 as pb

MALFORMED = "MALFORMED_ANSWER"

# The answer form of each gradient format (UNSPECIFIED is dense).
_FORMS: dict[int, str] = {
    pb.GRADIENT_FORMAT_ROW_SPARSE: "row_sparse",
    pb.GRADIENT_FORMAT_FACTORED: "factored",
}


class MisfitError(ValueError):
    """An answer's data does not fit what it declares (found as it is decoded)."""


@contextmanager
def malformed() -> Iterator[None]:
    """Decoding an answer: data that does not fit its declaration is the answer's fault."""
    try:
        yield
    except (tensors.DataSizeError, MisfitError) as error:
        raise _malformed(str(error)) from error


def asked_tie_break(kind: InputKind) -> int:
    """The tie-break a crammer_singer request asked for, its default (first index) resolved."""
    return kind.tie_break or pb.TIE_BREAK_FIRST_INDEX


def _tie_break_name(number: int) -> str:
    try:
        return enum_name("TIE_BREAK_", number)
    except ValueError:  # a value this SDK version does not know
        return f"unknown({number})"


def check_rows(indices: np.ndarray[Any, Any], rows: int) -> None:
    """MisfitError unless a row-sparse gradient's row indices increase within [0, rows)."""
    if indices.size and (indices[0] < 0 or indices[-1] >= rows or np.any(np.diff(indices) <= 0)):
        raise MisfitError(f"row indices not increasing within [0, {rows})")


def mask_bits(mask: bytes, rows: int, columns: int) -> np.ndarray[Any, Any]:
    """A factored gradient's mask as (rows, bytes a row), or MisfitError: bytes of another size,
    or bits set past the last class."""
    width = factored.packed_width(columns)
    if len(mask) != rows * width:
        raise MisfitError(f"a mask of {len(mask)} bytes, not {rows * width}")
    bits = np.frombuffer(mask, dtype=np.uint8).reshape(rows, width)
    spare = width * 8 - columns
    if spare and rows and np.any(bits[:, -1] >> (8 - spare)):
        raise MisfitError("mask bits set past the last class")
    return bits


def _malformed(problem: str) -> InternalError:
    return InternalError(
        f"the server's answer does not fit its request: {problem}", reason=MALFORMED
    )


def check_answer(response: pb.ComputeResponse, kind: InputKind) -> None:
    """Raises InternalError where `response` cannot be the answer to the request of `kind`."""
    problem = _problem(response, kind)
    if problem is not None:
        raise _malformed(problem)


def _problem(response: pb.ComputeResponse, kind: InputKind) -> str | None:
    if not isinstance(response, pb.ComputeResponse):  # grpc.aio's None for unparsable bytes
        return "it is not a ComputeResponse"
    if kind.request_id is not None and response.request_id != kind.request_id:
        return f"it answers request {response.request_id!r}, not {kind.request_id!r}"
    if not kind.scores:
        return None  # a kind made by hand, not by build_request: nothing known to check
    answered = response.resolved.loss  # "" from a server that does not say
    if kind.loss is not None and answered and answered != kind.loss:
        return f"it answers a {answered!r} request, not {kind.loss!r}"
    tie_break = response.resolved.tie_break  # how a factored gradient spreads its values
    if kind.loss == "crammer_singer" and tie_break and tie_break != asked_tie_break(kind):
        return f"it breaks ties by {_tie_break_name(tie_break)}, not as asked"
    asked = 0 if kind.gradient_format == pb.GRADIENT_FORMAT_NONE else len(kind.scores)
    if len(response.gradients) != asked:
        return f"{len(response.gradients)} gradients where {asked} were asked"
    form = _FORMS.get(kind.gradient_format, "dense")
    # As many gradients as score inputs, when any were asked (checked above).
    for scores, gradient in zip(kind.scores, response.gradients, strict=False):
        problem = _gradient(gradient, scores, form, response.resolved.compute_dtype)
        if problem is not None:
            return problem
    sets = len(response.per_sample_losses)
    if kind.per_sample_asked and not sets:
        return "no per-sample losses, though asked"
    if sets and kind.per_sample_sets is not None and sets != kind.per_sample_sets:
        return f"{sets} sets of per-sample losses, not {kind.per_sample_sets}"
    for k, per_sample in enumerate(response.per_sample_losses):
        problem = _tensor(per_sample, kind.scores[k].shape[:1], kind.scores[k].wire)
        if problem is not None:
            return f"per-sample losses {k}: {problem}"
    return None


def _gradient(gradient: pb.Gradient, scores: SentScores, form: str, compute: int) -> str | None:
    """What is wrong with the gradient of `scores`, in the answer form `form`."""
    if gradient.input != scores.name:
        return f"a gradient of {gradient.input!r} where {scores.name!r}'s was due"
    if gradient.WhichOneof("value") != form:
        return f"the gradient of {scores.name!r} is {gradient.WhichOneof('value')}, not {form}"
    if form == "row_sparse":
        problem = _row_sparse(gradient.row_sparse, scores.shape, scores.wire)
    elif form == "factored":
        problem = _factored(gradient.factored, scores.shape, scores.wire, compute)
    else:
        problem = _tensor(gradient.dense, scores.shape, scores.wire)
    return None if problem is None else f"the gradient of {scores.name!r}: {problem}"


def _tensor(tensor: pb.Tensor, shape: Sequence[int], wire: int) -> str | None:
    """What is wrong with a tensor that should hold `shape` values of dtype `wire`.

    Not its data's size: reading a bytes field copies it (upb), megabytes for a dense
    gradient; the decoding reads it once and checks the size then (DataSizeError).
    """
    if tensor.dtype != wire:
        return f"dtype {_dtype(tensor.dtype)}, not {_dtype(wire)}"
    if tuple(tensor.shape) != tuple(shape):
        return f"shape {tuple(tensor.shape)}, not {tuple(shape)}"
    return None


def _row_sparse(sparse: pb.RowSparseTensor, shape: Sequence[int], wire: int) -> str | None:
    """Rows of `shape` in increasing order, each once, with their values."""
    if tuple(sparse.dense_shape) != tuple(shape):
        return f"dense shape {tuple(sparse.dense_shape)}, not {tuple(shape)}"
    if len(sparse.indices.shape) != 1:
        return f"row indices of shape {tuple(sparse.indices.shape)}"
    rows = sparse.indices.shape[0]
    return _tensor(sparse.indices, (rows,), pb.DTYPE_INT64) or _tensor(
        sparse.values, (rows, *shape[1:]), wire
    )


def _factored(
    message: pb.FactoredGradient, shape: Sequence[int], wire: int, resolved_compute: int
) -> str | None:
    """A mask of `shape`'s bits (the padding bits clear) and a value per row."""
    if len(shape) != 2 or tuple(message.dense_shape) != tuple(shape):
        return f"dense shape {tuple(message.dense_shape)}, not {tuple(shape)}"
    if message.dtype != wire:
        return f"dtype {_dtype(message.dtype)}, not {_dtype(wire)}"
    # Row values come in the compute dtype the answer resolves (FactoredGradient.row_values);
    # a server that names none computes float64 scores in float64, others in float32.
    compute = resolved_compute or (
        pb.DTYPE_FLOAT64 if wire == pb.DTYPE_FLOAT64 else pb.DTYPE_FLOAT32
    )
    problem = _tensor(message.row_values, (shape[0],), compute)
    return None if problem is None else f"row values: {problem}"


def _dtype(wire: int) -> str:
    info = tensors.BY_WIRE.get(wire)
    return info.name if info is not None else f"unknown({wire})"
