"""Checks and wraps one request's tensors under the server's limits, without copying them.

Only O(1) checks happen here (dtypes, shapes, byte counts, limits), so that a
tensor claiming a shape of 2^40 is refused before anything is allocated.
"""

from __future__ import annotations

import math

import torch

from hingeloss import _tensors as tensors
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.transport.request_wire import ParsedRequest

# Every input is a vector of rows or a rows x classes matrix (ServerInfo reports it).
MAX_DIMS = 2
FLOAT_WIRE_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
INT_WIRE_DTYPES = (pb.DTYPE_INT32, pb.DTYPE_INT64)


class TensorDecoder:
    """Decodes one request's tensors under the server's limits."""

    def __init__(self, limits: LimitsConfig, loss_field: str, parsed: ParsedRequest) -> None:
        self._limits = limits
        self._prefix = loss_field
        self._parsed = parsed
        self.nbytes = 0

    def field(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def tensor(
        self,
        message: pb.Tensor,
        name: str,
        *,
        ndim: int,
        floats: bool,
        required: bool = True,
        top_level: bool = False,
    ) -> torch.Tensor | None:
        """Checks and wraps one tensor; `top_level` names a field of the request itself."""
        field = name if top_level else self.field(name)
        owner = "" if top_level else self._prefix
        # ByteSize, not `data`: under upb every read of a bytes field is a fresh copy.
        if message.ByteSize() == 0 and not self._parsed.has_data(owner, name):
            if required:
                raise InvalidInputError(field, "is required")
            return None
        allowed = FLOAT_WIRE_DTYPES if floats else FLOAT_WIRE_DTYPES + INT_WIRE_DTYPES
        if message.dtype not in allowed:
            names = ", ".join(tensors.BY_WIRE[d].name for d in allowed)
            raise InvalidInputError(
                f"{field}.dtype", f"must be one of {names}, got {message.dtype}"
            )
        shape = list(message.shape)
        elements = self._elements(field, shape, ndim)
        expected = elements * tensors.BY_WIRE[message.dtype].itemsize
        # The received bytes themselves for a large request (request_wire.py); a copy
        # out of the message otherwise. The tensor views them.
        data = self._parsed.tensor_data(owner, name, message)
        if len(data) != expected:
            raise InvalidInputError(
                f"{field}.data",
                f"holds {len(data)} bytes; dtype and shape {shape} need {expected}",
            )
        if self.nbytes + expected > self._limits.max_request_bytes:
            raise InvalidInputError(
                f"{field}.data",
                f"the request's tensors need more than the server limit of "
                f"{self._limits.max_request_bytes} bytes",
            )
        self.nbytes += expected
        return tensors.torch_view(data, message.dtype, shape)

    def _elements(self, field: str, shape: list[int], ndim: int) -> int:
        """The element count of a shape, checked against the dimensions and the limits."""
        if len(shape) != ndim:
            # The count only: a shape of a million dims must not come back in the error.
            raise InvalidInputError(
                f"{field}.shape", f"must have {ndim} dimension(s), got {len(shape)}"
            )
        for index, dim in enumerate(shape):
            if dim < 0:
                raise InvalidInputError(f"{field}.shape[{index}]", f"must be >= 0, got {dim}")
        rows = shape[0]
        if rows > self._limits.max_request_rows:
            raise InvalidInputError(
                f"{field}.shape[0]",
                f"{rows} rows exceed the server limit of {self._limits.max_request_rows}",
            )
        # Python ints do not overflow; the element limit bounds every product below.
        elements = math.prod(shape)
        if elements > self._limits.max_request_elements:
            raise InvalidInputError(
                f"{field}.shape",
                f"{elements} elements exceed the server limit of "
                f"{self._limits.max_request_elements}",
            )
        return elements

    def same_rows(self, tensor: torch.Tensor, name: str, rows: int, rows_of: str) -> None:
        if tensor.shape[0] != rows:
            raise InvalidInputError(
                f"{self.field(name)}.shape",
                f"must have {rows} rows like {self.field(rows_of)}, got {list(tensor.shape)}",
            )

    def required(self, message: pb.Tensor, name: str, *, ndim: int, floats: bool) -> torch.Tensor:
        """A tensor the loss cannot do without: INVALID_ARGUMENT "is required" if absent."""
        tensor = self.tensor(message, name, ndim=ndim, floats=floats)
        assert tensor is not None  # tensor() raises for a missing required one
        return tensor

    def same_dtype(self, first: pb.Tensor, other: pb.Tensor, name: str, of: str) -> None:
        if other.dtype != first.dtype:
            raise InvalidInputError(
                f"{self.field(name)}.dtype",
                f"must equal {self.field(of)}.dtype ({first.dtype}), got {other.dtype}",
            )
