"""Conversions between numpy arrays / torch tensors and the wire `Tensor` message.

The wire format is C-contiguous little-endian bytes. Decoding to numpy never
copies beyond the one read of the message's bytes: arrays are read-only views
of them. Encoding fills the fields of a message in place (`fill_from_numpy`,
`fill_from_torch`): building a Tensor and then copying it into its parent would
copy the bytes again at every level. torch is optional here: its functions
import it lazily so that numpy users never need it.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hingeloss.v1 import loss_service_pb2 as pb

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("hingeloss needs a little-endian host")


@dataclass(frozen=True)
class DTypeInfo:
    """One wire dtype: its names in numpy and torch and its element size."""

    wire: int
    name: str
    itemsize: int
    numpy: str | None  # None: numpy has no such type (bfloat16)
    is_float: bool


_DTYPES = (
    DTypeInfo(pb.DTYPE_FLOAT32, "float32", 4, "float32", True),
    DTypeInfo(pb.DTYPE_FLOAT64, "float64", 8, "float64", True),
    DTypeInfo(pb.DTYPE_FLOAT16, "float16", 2, "float16", True),
    DTypeInfo(pb.DTYPE_BFLOAT16, "bfloat16", 2, None, True),
    DTypeInfo(pb.DTYPE_INT32, "int32", 4, "int32", False),
    DTypeInfo(pb.DTYPE_INT64, "int64", 8, "int64", False),
)
BY_WIRE: dict[int, DTypeInfo] = {d.wire: d for d in _DTYPES}
BY_NAME: dict[str, DTypeInfo] = {d.name: d for d in _DTYPES}


def dtype_info(wire: int) -> DTypeInfo:
    """Returns the info of a wire dtype.

    Raises:
        ValueError: the dtype is unspecified, or unknown to this SDK version (a
            newer server may send dtypes added since).
    """
    info = BY_WIRE.get(wire)
    if info is None:
        raise ValueError(
            f"tensor dtype {wire} is unknown to this version of the hingeloss SDK "
            f"(known: {', '.join(sorted(BY_NAME))}); upgrade the SDK to decode it"
        )
    return info


def expected_nbytes(tensor: pb.Tensor) -> int:
    """Bytes that `tensor.data` must hold according to its dtype and shape (ValueError
    for a dtype unknown to this SDK version, as `dtype_info`)."""
    return math.prod(tensor.shape) * dtype_info(tensor.dtype).itemsize


def numpy_wire(array: np.ndarray[Any, Any]) -> tuple[int, tuple[int, ...], memoryview]:
    """A numpy array (any layout) as the wire takes it: dtype, shape and little-endian bytes.

    The bytes view the array itself where it is C-contiguous and little-endian already.
    """
    info = BY_NAME.get(array.dtype.name)
    if info is None:
        raise TypeError(f"unsupported numpy dtype {array.dtype}; use one of {sorted(BY_NAME)}")
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one, which the server
    # would then take for a batch of one instead of refusing its shape. A plain array
    # (a masked array's data, not its fill values), copied only where not contiguous.
    contiguous = np.asarray(array, order="C")
    if contiguous.dtype.byteorder == ">":
        contiguous = contiguous.astype(contiguous.dtype.newbyteorder("<"))
    data = contiguous.reshape(-1).view(np.uint8).data
    return info.wire, tuple(int(d) for d in contiguous.shape), data


def fill_from_numpy(message: pb.Tensor, array: np.ndarray[Any, Any]) -> None:
    """Writes a numpy array (any layout) into a Tensor message in place."""
    wire, shape, data = numpy_wire(array)
    fill(message, wire, shape, data)


def fill(message: pb.Tensor, wire: int, shape: tuple[int, ...], data: memoryview | None) -> None:
    """Writes a Tensor's fields; `data` None leaves its bytes to be sent apart."""
    message.dtype = wire  # type: ignore[assignment]
    del message.shape[:]
    message.shape.extend(shape)
    if data is not None:
        message.data = bytes(data)


def from_numpy(array: np.ndarray[Any, Any]) -> pb.Tensor:
    """Encodes a numpy array as a new Tensor message (see `fill_from_numpy`)."""
    message = pb.Tensor()
    fill_from_numpy(message, array)
    return message


def to_numpy(tensor: pb.Tensor) -> np.ndarray[Any, Any]:
    """Decodes a wire tensor into a read-only numpy view of its bytes (no copy).

    bfloat16 has no numpy type: it decodes to float32 (a copy).
    """
    info = dtype_info(tensor.dtype)
    shape = tuple(tensor.shape)
    data = _sized_data(tensor)
    if info.numpy is None:
        raw = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    return _numpy_view(data, info.numpy, shape)


class DataSizeError(ValueError):
    """A tensor's data is not the size its shape and dtype call for."""


def _sized_data(tensor: pb.Tensor) -> bytes:
    """`tensor.data`, read once (upb copies a bytes field on each read), or DataSizeError
    where it is not the size its dtype and shape call for (never a view of memory nobody
    wrote). The server's decoder checks its requests' sizes itself (tensor_decoder.py)."""
    expected = expected_nbytes(tensor)  # an unknown dtype says so before the data is read
    data = tensor.data
    if len(data) != expected:
        shape = tuple(tensor.shape)
        raise DataSizeError(f"{len(data)} bytes of data for shape {shape}, not {expected}")
    return data


def _numpy_view(
    data: bytes | memoryview, numpy_dtype: str, shape: Sequence[int]
) -> np.ndarray[Any, Any]:
    """A read-only numpy array viewing little-endian `data` (no copy)."""
    return np.frombuffer(data, dtype=np.dtype(numpy_dtype).newbyteorder("<")).reshape(shape)


def round_to_bfloat16(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32.

    The rounding of torch's float32 -> bfloat16 conversion, for finite values: numpy
    has no bfloat16, and a bfloat16 tensor decodes to float32 here.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def torch_dtype(wire: int) -> torch.dtype:
    """The torch dtype of a wire dtype."""
    import torch

    return getattr(torch, dtype_info(wire).name)  # type: ignore[no-any-return]


def wire_dtype_of_torch(dtype: torch.dtype) -> int:
    """The wire dtype of a torch dtype; raises TypeError when it has none."""
    name = str(dtype).removeprefix("torch.")
    info = BY_NAME.get(name)
    if info is None:
        raise TypeError(f"unsupported torch dtype {dtype}; use one of {sorted(BY_NAME)}")
    return info.wire


def torch_wire(tensor: torch.Tensor) -> tuple[int, tuple[int, ...], memoryview]:
    """A torch tensor (any device; moved to the CPU) as the wire takes it (`numpy_wire`)."""
    import torch

    wire = wire_dtype_of_torch(tensor.dtype)
    host = tensor.detach().to("cpu").contiguous()
    # Reinterpreting as bytes works for every dtype, bfloat16 included (numpy lacks it),
    # once flattened: a 0-d tensor has no dimension to reinterpret. It needs a unit
    # stride, which `contiguous` leaves alone on a dimension of one element.
    flat = host.reshape(-1)
    if flat.stride(0) != 1:
        flat = flat.clone(memory_format=torch.contiguous_format)
    data = flat.view(torch.uint8).numpy().data
    return wire, tuple(int(d) for d in host.shape), data


def fill_from_torch(message: pb.Tensor, tensor: torch.Tensor) -> None:
    """Writes a torch tensor (any device; moved to the CPU) into a Tensor message in place."""
    wire, shape, data = torch_wire(tensor)
    fill(message, wire, shape, data)


def from_torch(tensor: torch.Tensor) -> pb.Tensor:
    """Encodes a torch tensor as a new Tensor message (see `fill_from_torch`)."""
    message = pb.Tensor()
    fill_from_torch(message, tensor)
    return message


def to_torch(tensor: pb.Tensor) -> torch.Tensor:
    """Decodes a wire tensor into a CPU torch tensor over its bytes.

    Reading a bytes field of a message copies it once (upb); the tensor then views
    that copy. The view is read-only in spirit: torch cannot mark it so, and callers
    never write it.
    """
    return torch_view(_sized_data(tensor), tensor.dtype, tuple(tensor.shape))


def torch_view(data: bytes | memoryview, wire: int, shape: Sequence[int]) -> torch.Tensor:
    """A CPU torch tensor viewing `data` (no copy), of wire dtype `wire` and `shape`.

    `data` holds exactly the bytes of `shape` (its callers check: `to_torch`, the
    server's decoder). Made through numpy where numpy has the dtype: neither numpy's view nor
    `torch.from_numpy` releases the GIL, where torch's `view` would, so a server's
    event loop decoding a request does not hand the GIL to another thread midway.
    """
    import torch

    info = dtype_info(wire)
    if not data:  # no elements: torch.frombuffer takes no empty buffer
        return torch.empty(tuple(shape), dtype=torch_dtype(wire))
    readonly = memoryview(data).readonly
    if info.numpy is not None:
        array = _numpy_view(data, info.numpy, tuple(shape))
        return _from_readonly(readonly, torch.from_numpy, array)
    flat = _from_readonly(readonly, torch.frombuffer, data, dtype=torch_dtype(wire))
    return flat.view(tuple(shape))


# The makers (torch.from_numpy, torch.frombuffer) whose one warning has been silenced.
_readonly_warned: set[Any] = set()


def _from_readonly(readonly: bool, make: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`make(*args)` without torch's warning that the memory is not writable.

    Torch gives that warning once per process and maker, on the first read-only call, so
    only that call needs it silenced (a `catch_warnings` on every call would cost more
    than the tensor).
    """
    if not readonly or make in _readonly_warned:
        return make(*args, **kwargs)  # type: ignore[no-any-return]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tensor = make(*args, **kwargs)
    _readonly_warned.add(make)
    return tensor  # type: ignore[no-any-return]
