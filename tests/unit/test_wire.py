"""The hand-spliced ComputeResponse parses to exactly what the protobuf API would build."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers.cases import random_inputs

from hingeloss import _tensors as tensors
from hingeloss._protowire import field_number, length_delimited_key, read_varint, varint
from hingeloss._requests import build_request
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.compute import compute_batch
from hingeloss_server.engine.jobs import JobResult, LossJob, SparseRows, WireArray
from hingeloss_server.engine.validation import prepare
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.transport.response_codec import encode_response


def _computed(loss: str, inputs: dict[str, Any], options: dict[str, Any]) -> tuple[LossJob, Any]:
    request, _ = build_request(loss, inputs, {"request_id": "wire-test", **options})
    job = decode_request(request, LimitsConfig())
    with torch.inference_mode():
        result = compute_batch([prepare(job)], torch.device("cpu")).results[0]
    assert isinstance(result, JobResult)
    return job, result


def _api_tensor(message: pb.Tensor, array: WireArray) -> None:
    message.dtype = tensors.wire_dtype_of_torch(array.dtype)  # type: ignore[assignment]
    message.shape.extend(array.shape)
    message.data = bytes(array.data)


def _built_by_the_api(job: LossJob, result: JobResult, encoded: pb.ComputeResponse) -> Any:
    """The same answer built field by field with the protobuf API (header copied over)."""
    expected = pb.ComputeResponse()
    expected.CopyFrom(encoded)
    del expected.gradients[:]
    del expected.per_sample_losses[:]
    for name, grad in zip(job.input_fields, result.grads, strict=False):
        gradient = expected.gradients.add(input=name)
        if isinstance(grad, SparseRows):
            gradient.row_sparse.dense_shape.extend(grad.dense_shape)
            _api_tensor(gradient.row_sparse.indices, grad.indices)
            _api_tensor(gradient.row_sparse.values, grad.values)
        else:
            assert isinstance(grad, WireArray), type(grad)  # no factored gradients here
            _api_tensor(gradient.dense, grad)
    for per_sample in result.per_sample:
        _api_tensor(expected.per_sample_losses.add(), per_sample)
    return expected


CASES = [
    ("multiclass_hinge", "float32", {}),
    ("multiclass_hinge", "float64", {"gradient_format": "row_sparse", "return_per_sample": True}),
    ("gan_discriminator", "float32", {"reduction": "none"}),
    ("margin_ranking", "float64", {"gradient_format": "none"}),
    ("binary_hinge", "bfloat16", {"return_per_sample": True}),
]


@pytest.mark.parametrize(("loss", "dtype", "options"), CASES)
def test_spliced_response_equals_the_api_built_one(
    loss: str, dtype: str, options: dict[str, Any]
) -> None:
    inputs: dict[str, Any] = random_inputs(loss, np.random.default_rng(), 300, classes=7)
    if dtype == "bfloat16":
        inputs = {
            k: torch.tensor(v).to(torch.bfloat16) if v.dtype.kind == "f" else v
            for k, v in inputs.items()
        }
    else:
        inputs = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    job, result = _computed(loss, inputs, options)
    serialized = encode_response(job, result)
    parsed = pb.ComputeResponse.FromString(serialized)
    expected = _built_by_the_api(job, result, parsed)
    assert parsed == expected
    assert len(serialized) == expected.ByteSize()
    assert parsed.request_id == "wire-test"
    assert parsed.resolved.loss == loss
    for gradient in parsed.gradients:
        which = gradient.WhichOneof("value")
        tensor = gradient.dense if which == "dense" else gradient.row_sparse.values
        assert tensors.BY_WIRE[tensor.dtype].name == dtype


def test_result_bytes_view_tensor_memory() -> None:
    """The answer's tensors reach the wire without an intermediate bytes copy."""
    inputs = random_inputs("binary_hinge", np.random.default_rng(), 64)
    _, result = _computed("binary_hinge", inputs, {})
    grad = result.grads[0]
    assert isinstance(grad, WireArray)
    assert isinstance(grad.data, memoryview)
    assert grad.data.nbytes == 64 * 8


def test_join_without_gil_builds_the_same_bytes() -> None:
    from hingeloss_server.transport.response_codec import join_without_gil

    rng = np.random.default_rng(3)
    tensor = rng.normal(size=(1000, 300)).astype(np.float32)
    pieces: list[bytes | memoryview] = [
        b"\x0a\x05",
        memoryview(tensor).cast("B"),  # type: ignore[arg-type]  # numpy stubs: Buffer from 3.12
        b"",
        b"tail" * 1000,
    ]
    joined = join_without_gil(pieces, sum(memoryview(p).nbytes for p in pieces))
    assert type(joined) is bytes
    assert joined == b"".join(pieces)
    assert hash(joined) == hash(b"".join(pieces))


def test_wire_primitives_round_trip_and_follow_the_descriptors() -> None:
    for value in (0, 1, 127, 128, 300, 1 << 31, (1 << 64) - 1):
        encoded = varint(value)
        assert read_varint(b"\xff" + encoded, 1) == (value, 1 + len(encoded))
    # Key of ComputeResponse.gradients: field 3, wire type 2 (length-delimited).
    assert length_delimited_key(pb.ComputeResponse, "gradients") == bytes([3 << 3 | 2])
    assert field_number(pb.Tensor, "data") == pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
    with pytest.raises(TypeError, match="not length-delimited"):
        length_delimited_key(pb.ComputeResponse, "loss")
    with pytest.raises(ValueError, match="malformed varint"):
        read_varint(b"\xff" * 11, 0)


def test_a_one_element_tensor_of_any_stride_goes_on_the_wire() -> None:
    """`contiguous` leaves a dimension of one element with its stride; bytes need a unit one."""
    strided = torch.randn(1, 2, dtype=torch.float64)[:, 0]
    assert strided.stride() == (2,)
    wire, shape, data = tensors.torch_wire(strided)
    assert (wire, shape) == (pb.DTYPE_FLOAT64, (1,))
    assert bytes(data) == strided.numpy().tobytes()
