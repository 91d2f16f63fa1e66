"""UploadAssembler: which tensors a ComputeUpload sends apart, and in what order."""

from __future__ import annotations

import numpy as np
import pytest

from hingeloss._requests import build_request
from hingeloss._upload import make_upload
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.errors import InvalidInputError, OverloadedError
from hingeloss_server.transport.request_wire import parse_request
from hingeloss_server.transport.upload import UploadAssembler, _tensors_apart


def _assemble(parts: list[bytes]) -> UploadAssembler:
    upload = UploadAssembler(LimitsConfig())
    upload.begin(parts[0])
    for part in parts[1:]:
        upload.add(part)
    return upload


def test_the_loss_tensors_by_field_number_then_sample_weights() -> None:
    real, fake = np.arange(3, dtype=np.float32), np.arange(5, dtype=np.float64)
    weights = np.linspace(0, 1, 8)
    request, _ = build_request(
        "gan_discriminator",
        {"real_scores": real, "fake_scores": fake.astype(np.float32)},
        {"sample_weights": weights},
    )
    # Every tensor apart, sample_weights included: their bytes follow in one stream.
    data = b""
    for tensor in (request.gan_discriminator.real_scores, request.gan_discriminator.fake_scores):
        data += tensor.data
        tensor.ClearField("data")
    data += request.sample_weights.data
    request.sample_weights.ClearField("data")
    head = pb.UploadPart(request=request).SerializeToString()
    upload = _assemble([head, pb.UploadPart(data=data).SerializeToString()])
    assert upload.pending == 0
    parsed = upload.finish()
    assert parsed.data is not None
    assert bytes(parsed.data[("gan_discriminator", "real_scores")]) == real.tobytes()
    assert (
        bytes(parsed.data[("gan_discriminator", "fake_scores")])
        == fake.astype(np.float32).tobytes()
    )
    assert bytes(parsed.data[("", "sample_weights")]) == weights.tobytes()


def test_a_tensor_sent_whole_in_the_request_is_not_expected_again() -> None:
    scores, targets = np.ones((2, 3), dtype=np.float32), np.array([0, 2])
    apart: list[tuple[str, memoryview]] = []
    request, _ = build_request(
        "multiclass_hinge", {"scores": scores, "targets": targets}, {}, scores_apart=apart
    )
    parts = list(make_upload(request, apart, part_bytes=5).parts)
    assert len(parts) == 1 + 5  # 24 bytes of scores in parts of 5; targets went whole
    upload = _assemble(parts)
    parsed = upload.finish()
    assert parsed.data is not None
    assert bytes(parsed.data[("multiclass_hinge", "scores")]) == scores.tobytes()
    targets_message = parsed.message.multiclass_hinge.targets
    assert parsed.tensor_data("multiclass_hinge", "targets", targets_message) == targets.tobytes()
    assert parsed.nbytes == request.ByteSize() + scores.nbytes  # the request, then the data


def test_an_empty_or_absent_tensor_is_not_sent_apart() -> None:
    request = pb.ComputeRequest()
    request.gan_discriminator.real_scores.dtype = pb.DTYPE_FLOAT32
    request.gan_discriminator.real_scores.shape.append(0)  # empty: no bytes to send
    request.gan_discriminator.fake_scores.dtype = pb.DTYPE_FLOAT32
    request.gan_discriminator.fake_scores.shape.append(3)
    request.sample_weights.SetInParent()  # an empty Tensor stands for an absent one
    head = parse_request(request.SerializeToString())
    assert [t.field for t in _tensors_apart(head)] == ["gan_discriminator.fake_scores"]


def test_a_request_sent_whole_in_its_first_part_takes_no_data_part() -> None:
    request, _ = build_request(
        "multiclass_hinge", {"scores": np.ones((2, 3), dtype=np.float32), "targets": [0, 2]}, {}
    )
    upload = _assemble([pb.UploadPart(request=request).SerializeToString()])
    assert upload.pending == 0
    with pytest.raises(InvalidInputError) as caught:
        upload.add(pb.UploadPart(data=b"\x00").SerializeToString())
    assert caught.value.field == "upload[1].data"


def test_a_bad_request_is_refused_on_its_first_part() -> None:
    """Its structure is checked before any part arrives: here the targets' rows."""
    apart: list[tuple[str, memoryview]] = []
    request, _ = build_request(
        "multiclass_hinge",
        {"scores": np.ones((4, 3), dtype=np.float32), "targets": [0, 2]},
        {},
        scores_apart=apart,
    )
    with pytest.raises(InvalidInputError) as caught:
        _assemble([pb.UploadPart(request=request).SerializeToString()])
    assert caught.value.field == "multiclass_hinge.targets.shape"


def test_an_upload_the_server_cannot_set_memory_aside_for_is_shed() -> None:
    """Where the address space runs out (ulimit -v, strict overcommit): RESOURCE_EXHAUSTED
    with a retry hint, not an internal error."""
    huge = 1 << 50  # a petabyte, within limits raised to allow it
    limits = LimitsConfig(max_request_bytes=huge, max_request_elements=huge)
    request = pb.ComputeRequest()
    request.gan_generator.fake_scores.dtype = pb.DTYPE_FLOAT32
    request.gan_generator.fake_scores.shape.append(huge // 4)
    upload = UploadAssembler(limits)
    with pytest.raises(OverloadedError) as caught:
        upload.begin(pb.UploadPart(request=request).SerializeToString())
    assert "cannot set" in str(caught.value)
