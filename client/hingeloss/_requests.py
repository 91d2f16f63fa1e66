"""Builds ComputeRequests from arrays and keyword options; shared by every client flavour.

Options take plain strings ("divide_by_num_classes", "one") or the proto enum values.
Inputs are numpy arrays, torch tensors (any device) or anything `numpy.asarray` takes.

Each loss's inputs and options are read from the request messages' descriptors (the
wire contract), so that adding a loss or an option to the proto needs nothing here:
its Tensor fields are its inputs (labels and targets without a gradient, the others
scores), except class weights; every other field is a keyword option named as the
field, except `kink` (kink_subgradient) and `class_weights` (target_class_weights).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from hingeloss import _tensors as tensors
from hingeloss.v1 import loss_service_pb2 as pb

# The request's loss messages, by their field of the `loss` oneof.
_LOSS_MESSAGES: dict[str, Descriptor] = {
    field.name: field.message_type  # type: ignore[misc]  # a oneof of messages
    for field in pb.ComputeRequest.DESCRIPTOR.oneofs_by_name["loss"].fields
}
LOSSES: tuple[str, ...] = tuple(_LOSS_MESSAGES)
# The SDK's keyword for a proto field, where it is not the field's own name (requests'
# fields, and ResolvedOptions' gan_combine, the GAN discriminator's `combine`).
_KEYWORDS = {
    "kink_subgradient": "kink",
    "target_class_weights": "class_weights",
    "gan_combine": "combine",
}
# Tensor fields that are inputs without a gradient; the other Tensor inputs are scores.
_NOT_DIFFERENTIABLE = ("labels", "targets")


@dataclass(frozen=True)
class _Option:
    """A keyword option: its proto field, and its enum's prefix or whether it is a Tensor."""

    field: str
    enum_prefix: str | None = None
    tensor: bool = False


def option_keyword(field_name: str) -> str:
    """The keyword an option of this proto field goes by in the SDK."""
    return _KEYWORDS.get(field_name, field_name)


def enum_prefix(enum: EnumDescriptor) -> str:
    """'KINK_SUBGRADIENT_' of KinkSubgradient: every enum's zero value is PREFIX_UNSPECIFIED."""
    return str(enum.values_by_number[0].name).removesuffix("UNSPECIFIED")


def _option(field: FieldDescriptor) -> _Option:
    if field.enum_type is not None:
        return _Option(field.name, enum_prefix=enum_prefix(field.enum_type))
    return _Option(field.name, tensor=field.message_type is not None)


def _is_input(field: FieldDescriptor) -> bool:
    """A Tensor field the SDK takes positionally (scores, labels, targets), not by keyword."""
    message = field.message_type
    return (
        message is not None
        and message.full_name == pb.Tensor.DESCRIPTOR.full_name
        and field.name not in _KEYWORDS
    )


# Score inputs of each loss, in declaration order: gradients come back in this order.
SCORE_FIELDS: dict[str, tuple[str, ...]] = {
    loss: tuple(
        f.name for f in message.fields if _is_input(f) and f.name not in _NOT_DIFFERENTIABLE
    )
    for loss, message in _LOSS_MESSAGES.items()
}
# Sets of per-sample losses an answer holds, where a loss has more than one
# (ComputeResponse.per_sample_losses): gan_discriminator's real and fake samples.
# margin_ranking's two score inputs share their samples: one set.
PER_SAMPLE_SETS: dict[str, int] = {"gan_discriminator": 2}
# The same by field number: the order in which ComputeUpload sends their bytes.
SCORE_FIELDS_BY_NUMBER: dict[str, tuple[str, ...]] = {
    loss: tuple(sorted(SCORE_FIELDS[loss], key=lambda field: message.fields_by_name[field].number))
    for loss, message in _LOSS_MESSAGES.items()
}
# Non-differentiable inputs (labels, targets) of each loss.
OTHER_FIELDS: dict[str, tuple[str, ...]] = {
    loss: tuple(f.name for f in message.fields if _is_input(f) and f.name in _NOT_DIFFERENTIABLE)
    for loss, message in _LOSS_MESSAGES.items()
}
# Keyword options of each loss: every field of its message that is not an input.
LOSS_OPTIONS: dict[str, dict[str, _Option]] = {
    loss: {option_keyword(f.name): _option(f) for f in message.fields if not _is_input(f)}
    for loss, message in _LOSS_MESSAGES.items()
}
# Every loss's keyword options together: one a loss lacks is refused, not unknown.
_ANY_LOSS_OPTIONS: dict[str, _Option] = {
    keyword: option for options in LOSS_OPTIONS.values() for keyword, option in options.items()
}
_ENUM_TYPES: dict[str, EnumTypeWrapper] = {
    enum_prefix(enum): getattr(pb, enum.name) for enum in pb.DESCRIPTOR.enum_types_by_name.values()
}


def enum_value(prefix: str, value: str | int) -> int:
    """Resolves "divide_by_num_classes" (or an enum number) to the proto enum number."""
    enum_type = _ENUM_TYPES[prefix]
    if isinstance(value, int):
        if value not in enum_type.values():
            raise ValueError(f"{value} is not a valid {prefix.rstrip('_').lower()}")
        return value
    name = prefix + value.strip().upper().removeprefix(prefix)
    try:
        return int(enum_type.Value(name))
    except ValueError:
        choices = [n.removeprefix(prefix).lower() for n in enum_type.keys()]  # noqa: SIM118 - EnumTypeWrapper
        choices = [c for c in choices if c != "unspecified"]
        raise ValueError(
            f"{value!r} is not a valid {prefix.rstrip('_').lower()}; choose from {choices}"
        ) from None


def enum_name(prefix: str, number: int) -> str:
    """The lower-case option name of an enum number, e.g. 'divide_by_num_classes'."""
    return str(_ENUM_TYPES[prefix].Name(number)).removeprefix(prefix).lower()


@dataclass(frozen=True)
class SentScores:
    """One score input as the request carried it: what its gradient must match."""

    name: str
    shape: tuple[int, ...]
    wire: int


@dataclass(frozen=True)
class InputKind:
    """What the caller passed, so that results come back as the same type."""

    is_torch: bool
    device: Any = None
    dtype: Any = None
    # What the answer must be (_answers.py checks; None and empty: not known): for the
    # request of this id and loss; a gradient for each score input, in declaration
    # order; in the gradient format asked; this many sets of per-sample losses, if asked;
    # with the tie-break asked (crammer_singer; 0: the default, first index).
    request_id: str | None = None
    scores: tuple[SentScores, ...] = ()
    gradient_format: int = 0
    per_sample_asked: bool = False
    loss: str | None = None
    per_sample_sets: int | None = None
    tie_break: int = 0
    # With a factored gradient: each row's true-class column (0 where ignored), int64,
    # as the caller's targets were (numpy, or torch on their device).
    true_classes: Any = None


def _is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _shape(value: Any) -> tuple[int, ...]:
    shape = value.shape if hasattr(value, "shape") else np.shape(value)
    return tuple(int(d) for d in shape)


def wire_of(value: Any, name: str) -> tuple[int, tuple[int, ...], memoryview]:
    """One input's wire dtype, shape and bytes (a view of the input's where it can be)."""
    if _is_torch(value):
        return tensors.torch_wire(value)
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype == np.bool_:
        raise TypeError(f"{name}: boolean arrays are not accepted; use integers or floats")
    return tensors.numpy_wire(array)


def fill(message: pb.Tensor, value: Any, name: str) -> None:
    """Writes one input into its Tensor field of a request, in place."""
    wire, shape, data = wire_of(value, name)
    tensors.fill(message, wire, shape, data)


def encode(value: Any, name: str) -> pb.Tensor:
    """Encodes one input for the wire as a new Tensor message."""
    message = pb.Tensor()
    fill(message, value, name)
    return message


def build_request(
    loss: str,
    inputs: Mapping[str, Any],
    options: Mapping[str, Any],
    *,
    scores_apart: list[tuple[str, memoryview]] | None = None,
) -> tuple[pb.ComputeRequest, InputKind]:
    """Builds one request; returns it with what the results must be converted back to.

    Args:
        loss: a loss name, e.g. "multiclass_hinge".
        inputs: arrays by proto field name (scores, targets, ...).
        options: margin, power, kink, label_encoding, class_weights,
            class_normalization, ignore_index, tie_break, combine, reduction,
            gradient_format, return_per_sample, sample_weights, request_id.
        scores_apart: where given, the score tensors are left without their bytes,
            which are appended here with their field's name, in field-number order
            (for ComputeUpload, `_upload.py`).
    """
    if loss not in _LOSS_MESSAGES:
        raise ValueError(f"unknown loss {loss!r}; choose from {sorted(_LOSS_MESSAGES)}")
    rest = dict(options)
    # Every field is written where it lives in the request: a Tensor built apart and
    # then CopyFrom'd into its parent would copy its bytes again at each level.
    request = pb.ComputeRequest(request_id=str(rest.pop("request_id", None) or uuid.uuid4().hex))
    message = getattr(request, loss)
    message.SetInParent()
    wires: dict[str, int] = {}
    for field in SCORE_FIELDS_BY_NUMBER[loss]:
        wire, shape, data = wire_of(inputs[field], field)
        wires[field] = wire
        if scores_apart is None:
            tensors.fill(getattr(message, field), wire, shape, data)
        else:
            tensors.fill(getattr(message, field), wire, shape, None)
            scores_apart.append((field, data))
    for field in OTHER_FIELDS[loss]:
        fill(getattr(message, field), inputs[field], field)
    for keyword, option in _ANY_LOSS_OPTIONS.items():
        value = rest.pop(keyword, None)
        if value is None:
            continue
        if keyword not in LOSS_OPTIONS[loss]:
            raise TypeError(f"{loss} takes no option {keyword!r}")
        if option.tensor:
            fill(getattr(message, option.field), value, keyword)
        elif option.enum_prefix is not None:
            setattr(message, option.field, enum_value(option.enum_prefix, value))
        else:
            setattr(message, option.field, value)

    reduction = rest.pop("reduction", None)
    if reduction is not None:
        request.reduction = enum_value("REDUCTION_", reduction)  # type: ignore[assignment]
    gradient_format = rest.pop("gradient_format", None)
    if gradient_format is not None:
        request.gradient_format = enum_value(  # type: ignore[assignment]
            "GRADIENT_FORMAT_", gradient_format
        )
    request.return_per_sample = bool(rest.pop("return_per_sample", False))
    sample_weights = rest.pop("sample_weights", None)
    if sample_weights is not None:
        fill(request.sample_weights, sample_weights, "sample_weights")
    if rest:
        raise TypeError(f"unknown option(s) for {loss}: {sorted(rest)}")

    return request, _input_kind(loss, inputs, request, wires)


def _input_kind(
    loss: str, inputs: Mapping[str, Any], request: pb.ComputeRequest, wires: Mapping[str, int]
) -> InputKind:
    """What the caller passed (so results come back alike), and what the answer must be."""
    first = inputs[SCORE_FIELDS[loss][0]]
    message = getattr(request, loss)
    true_classes = None
    if request.gradient_format == pb.GRADIENT_FORMAT_FACTORED and "targets" in inputs:
        ignore_index = None
        if loss == "multiclass_hinge" and message.HasField("ignore_index"):
            ignore_index = message.ignore_index
        true_classes = _true_classes(inputs["targets"], ignore_index)
    torch_input = _is_torch(first)
    return InputKind(
        is_torch=torch_input,
        device=first.device if torch_input else None,
        dtype=first.dtype if torch_input else None,
        scores=tuple(SentScores(f, _shape(inputs[f]), wires[f]) for f in SCORE_FIELDS[loss]),
        request_id=request.request_id,
        gradient_format=request.gradient_format,
        per_sample_asked=request.return_per_sample or request.reduction == pb.REDUCTION_NONE,
        loss=loss,
        per_sample_sets=PER_SAMPLE_SETS.get(loss, 1),
        tie_break=message.tie_break if loss == "crammer_singer" else 0,
        true_classes=true_classes,
    )


def _true_classes(targets: Any, ignore_index: int | None) -> Any:
    """The column of each row's true class, as the server's kernels see it: ignored rows, 0."""
    if _is_torch(targets):
        classes = targets.detach().long()
        return classes if ignore_index is None else classes.masked_fill(classes == ignore_index, 0)
    classes = np.asarray(targets).astype(np.int64)
    return classes if ignore_index is None else np.where(classes == ignore_index, 0, classes)
