"""The loss registry agrees with the wire contract: every loss, input and enum option once.

The engine's LossSpecs, the transport's codec entries and the SDK's tables (read from
the proto's descriptors) are three views of one declaration; these tests fail when a
loss, an input or an option is added to one of them and not to the others.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers.cases import random_inputs

from hingeloss._requests import OTHER_FIELDS, SCORE_FIELDS, build_request
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.compute import compute_batch
from hingeloss_server.engine.jobs import JobResult, LossKind
from hingeloss_server.engine.losses import SPECS
from hingeloss_server.engine.validation import prepare
from hingeloss_server.transport.loss_codecs import CODECS, KINK, Switch
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.transport.response_codec import encode_response


def _message(kind: LossKind) -> Any:
    """The descriptor of a loss's request message."""
    return pb.ComputeRequest.DESCRIPTOR.fields_by_name[kind.value].message_type


def _switches(kind: LossKind) -> tuple[Switch, ...]:
    kink = (KINK,) if SPECS[kind].hinge else ()
    return (*CODECS[kind].switches, *kink)


def test_the_registry_holds_every_loss_of_the_contract_once() -> None:
    oneof = pb.ComputeRequest.DESCRIPTOR.oneofs_by_name["loss"]
    assert [kind.value for kind in SPECS] == [field.name for field in oneof.fields]
    assert all(spec.kind is kind for kind, spec in SPECS.items())
    assert set(CODECS) == set(SPECS)


@pytest.mark.parametrize("kind", list(LossKind))
def test_a_specs_inputs_are_the_proto_fields_the_sdk_reads(kind: LossKind) -> None:
    spec = SPECS[kind]
    assert spec.input_fields == SCORE_FIELDS[kind.value]
    assert tuple(spec.aux) == OTHER_FIELDS[kind.value]
    fields = _message(kind).fields_by_name
    for name in spec.input_fields + tuple(spec.aux):
        assert fields[name].message_type.full_name == "hingeloss.v1.Tensor"


@pytest.mark.parametrize("kind", list(LossKind))
def test_every_enum_option_of_a_loss_is_decoded_and_echoed(kind: LossKind) -> None:
    message = _message(kind)
    fields = message.fields_by_name
    enums = {f.name for f in message.fields if f.enum_type is not None}
    assert {switch.field for switch in _switches(kind)} == enums
    for switch in _switches(kind):
        enum = fields[switch.field].enum_type
        assert {switch.off, switch.on} <= set(enum.values_by_number) - {0}
        assert switch.off != switch.on
        # The contract's convention: 0 (UNSPECIFIED) means the value numbered 1.
        assert switch.off == 1
        echo = pb.ResolvedOptions.DESCRIPTOR.fields_by_name[switch.echo or switch.field]
        assert echo.enum_type is not None, echo.name
        assert echo.enum_type.full_name == enum.full_name


def _resolved_after_compute(request: pb.ComputeRequest) -> tuple[Any, pb.ResolvedOptions]:
    job = decode_request(request, LimitsConfig())
    with torch.inference_mode():
        result = compute_batch([prepare(job)], torch.device("cpu")).results[0]
    assert isinstance(result, JobResult)
    response = pb.ComputeResponse.FromString(encode_response(job, result))
    return job, response.resolved


@pytest.mark.parametrize(
    ("kind", "switch"),
    [(kind, switch) for kind in LossKind for switch in _switches(kind)],
    ids=lambda value: value.field if isinstance(value, Switch) else str(value),
)
@pytest.mark.parametrize("sent", ["unset", "off", "on"])
def test_a_switch_sets_its_flag_and_is_echoed(kind: LossKind, switch: Switch, sent: str) -> None:
    inputs = random_inputs(kind.value, np.random.default_rng(7), 6, classes=4)
    request, _ = build_request(kind.value, inputs, {})
    if sent != "unset":
        setattr(getattr(request, kind.value), switch.field, getattr(switch, sent))
    job, resolved = _resolved_after_compute(request)
    owner = job.key.params if switch.splits_batches else job.options
    assert getattr(owner, switch.flag) is (sent == "on")
    assert getattr(resolved, switch.echo or switch.field) == (
        switch.on if sent == "on" else switch.off
    )


@pytest.mark.parametrize("kind", list(LossKind))
def test_hinges_echo_their_margin_power_and_kink(kind: LossKind) -> None:
    inputs = random_inputs(kind.value, np.random.default_rng(3), 5, classes=3)
    _, resolved = _resolved_after_compute(build_request(kind.value, inputs, {})[0])
    hinge = SPECS[kind].hinge
    assert (resolved.margin, resolved.power) == ((1.0, 1) if hinge else (0.0, 0))
    assert resolved.kink_subgradient == (pb.KINK_SUBGRADIENT_ZERO if hinge else 0)
