"""Builds ComputeRequests from arrays and keyword options; shared by every client flavour.

Options take plain strings ("divide_by_num_classes", "one") or the proto enum values.
Inputs are numpy arrays, torch tensors (any device) or anything `numpy.asarray` takes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hingeloss import _tensors as tensors
from hingeloss.v1 import loss_service_pb2 as pb

# Score inputs of each loss, in declaration order: gradients come back in this order.
SCORE_FIELDS: dict[str, tuple[str, ...]] = {
    "binary_hinge": ("scores",),
    "multiclass_hinge": ("scores",),
    "crammer_singer": ("scores",),
    "gan_discriminator": ("real_scores", "fake_scores"),
    "gan_generator": ("fake_scores",),
    "margin_ranking": ("scores_a", "scores_b"),
}
# Non-differentiable inputs (labels, targets) of each loss.
OTHER_FIELDS: dict[str, tuple[str, ...]] = {
    "binary_hinge": ("labels",),
    "multiclass_hinge": ("targets",),
    "crammer_singer": ("targets",),
    "gan_discriminator": (),
    "gan_generator": (),
    "margin_ranking": ("labels",),
}
_MESSAGES = {
    "binary_hinge": pb.BinaryHinge,
    "multiclass_hinge": pb.MulticlassHinge,
    "crammer_singer": pb.CrammerSinger,
    "gan_discriminator": pb.GanDiscriminator,
    "gan_generator": pb.GanGenerator,
    "margin_ranking": pb.MarginRanking,
}
# Keyword option -> (proto field, enum prefix or None for plain values).
_LOSS_OPTIONS: dict[str, tuple[str, str | None]] = {
    "margin": ("margin", None),
    "power": ("power", None),
    "kink": ("kink_subgradient", "KINK_SUBGRADIENT_"),
    "label_encoding": ("label_encoding", "LABEL_ENCODING_"),
    "class_normalization": ("class_normalization", "CLASS_NORMALIZATION_"),
    "ignore_index": ("ignore_index", None),
    "tie_break": ("tie_break", "TIE_BREAK_"),
    "combine": ("combine", "GAN_COMBINE_"),
}
_ENUM_TYPES = {
    "KINK_SUBGRADIENT_": pb.KinkSubgradient,
    "LABEL_ENCODING_": pb.LabelEncoding,
    "CLASS_NORMALIZATION_": pb.ClassNormalization,
    "TIE_BREAK_": pb.TieBreak,
    "GAN_COMBINE_": pb.GanCombine,
    "REDUCTION_": pb.Reduction,
    "GRADIENT_FORMAT_": pb.GradientFormat,
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
class InputKind:
    """What the caller passed, so that results come back as the same type."""

    is_torch: bool
    device: Any = None
    dtype: Any = None
    shapes: tuple[tuple[int, ...], ...] = ()
    # With a factored gradient: each row's true-class column (0 where ignored), int64,
    # as the caller's targets were (numpy, or torch on their device).
    true_classes: Any = None


def _is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _shape(value: Any) -> tuple[int, ...]:
    shape = value.shape if hasattr(value, "shape") else np.shape(value)
    return tuple(int(d) for d in shape)


def fill(message: pb.Tensor, value: Any, name: str) -> None:
    """Writes one input into its Tensor field of a request, in place."""
    if _is_torch(value):
        tensors.fill_from_torch(message, value)
        return
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype == np.bool_:
        raise TypeError(f"{name}: boolean arrays are not accepted; use integers or floats")
    tensors.fill_from_numpy(message, array)


def encode(value: Any, name: str) -> pb.Tensor:
    """Encodes one input for the wire as a new Tensor message."""
    message = pb.Tensor()
    fill(message, value, name)
    return message


def build_request(
    loss: str,
    inputs: Mapping[str, Any],
    options: Mapping[str, Any],
) -> tuple[pb.ComputeRequest, InputKind]:
    """Builds one request; returns it with what the results must be converted back to.

    Args:
        loss: a loss name, e.g. "multiclass_hinge".
        inputs: arrays by proto field name (scores, targets, ...).
        options: margin, power, kink, label_encoding, class_weights,
            class_normalization, ignore_index, tie_break, combine, reduction,
            gradient_format, return_per_sample, sample_weights, request_id.
    """
    if loss not in _MESSAGES:
        raise ValueError(f"unknown loss {loss!r}; choose from {sorted(_MESSAGES)}")
    first = inputs[SCORE_FIELDS[loss][0]]
    rest = dict(options)
    # Every field is written where it lives in the request: a Tensor built apart and
    # then CopyFrom'd into its parent would copy its bytes again at each level.
    request = pb.ComputeRequest(request_id=str(rest.pop("request_id", None) or uuid.uuid4().hex))
    message = getattr(request, loss)
    message.SetInParent()
    for field in SCORE_FIELDS[loss] + OTHER_FIELDS[loss]:
        fill(getattr(message, field), inputs[field], field)
    class_weights = rest.pop("class_weights", None)
    if class_weights is not None:
        fill(message.target_class_weights, class_weights, "class_weights")
    for option, (field, prefix) in _LOSS_OPTIONS.items():
        value = rest.pop(option, None)
        if value is None:
            continue
        if field not in message.DESCRIPTOR.fields_by_name:
            raise TypeError(f"{loss} takes no option {option!r}")
        setattr(message, field, enum_value(prefix, value) if prefix else value)

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

    shapes = tuple(_shape(inputs[f]) for f in SCORE_FIELDS[loss])
    true_classes = None
    if request.gradient_format == pb.GRADIENT_FORMAT_FACTORED and "targets" in inputs:
        ignore_index = None
        if loss == "multiclass_hinge" and message.HasField("ignore_index"):
            ignore_index = message.ignore_index
        true_classes = _true_classes(inputs["targets"], ignore_index)
    if _is_torch(first):
        kind = InputKind(
            is_torch=True,
            device=first.device,
            dtype=first.dtype,
            shapes=shapes,
            true_classes=true_classes,
        )
    else:
        kind = InputKind(is_torch=False, shapes=shapes, true_classes=true_classes)
    return request, kind


def _true_classes(targets: Any, ignore_index: int | None) -> Any:
    """The column of each row's true class, as the server's kernels see it: ignored rows, 0."""
    if _is_torch(targets):
        classes = targets.detach().long()
        return classes if ignore_index is None else classes.masked_fill(classes == ignore_index, 0)
    classes = np.asarray(targets).astype(np.int64)
    return classes if ignore_index is None else np.where(classes == ignore_index, 0, classes)
