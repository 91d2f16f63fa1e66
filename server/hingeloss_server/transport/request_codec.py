"""Turns a ComputeRequest into a LossJob, checking its structure before touching any data.

Only O(1) checks happen here (enums, dtypes, shapes, byte counts, limits), so that
a request claiming a shape of 2^40 is refused before anything is allocated. The
checks that read values (NaN, label ranges, weights) run on the worker thread,
in `engine/validation.py`, off the event loop.

Every loss is decoded by the same code: its inputs from its LossSpec
(engine/losses/), its options from its entry in loss_codecs.py. The checks run in
one order for every loss (inputs, the loss's own option fields, its batch switches,
margin, power, kink, the gradient format, its per-request switches, sample
weights), so that a request with several faults is refused for the first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.engine.jobs import (
    BatchKey,
    GradientFormat,
    LossJob,
    LossKind,
    LossParams,
    Reduction,
    RequestOptions,
)
from hingeloss_server.engine.losses import SPECS, LossSpec
from hingeloss_server.engine.losses.spec import Aux
from hingeloss_server.transport.loss_codecs import CODECS, KINK, NO_EXTRAS, Extras, LossCodec
from hingeloss_server.transport.request_wire import ParsedRequest
from hingeloss_server.transport.tensor_decoder import (
    FLOAT_WIRE_DTYPES,
    INT_WIRE_DTYPES,
    MAX_DIMS,
    TensorDecoder,
)

__all__ = ["FLOAT_WIRE_DTYPES", "MAX_DIMS", "decode_request"]

_E = TypeVar("_E", Reduction, GradientFormat)


def _hinge_fields(kind: LossKind) -> frozenset[str]:
    """Which of the hinge options (margin, power, the kink convention) a loss message has."""
    message: Any = pb.ComputeRequest.DESCRIPTOR.fields_by_name[kind.value].message_type
    return frozenset({"margin", "power", KINK.field} & set(message.fields_by_name))


_HINGE_FIELDS = {kind: _hinge_fields(kind) for kind in LossKind}

_REDUCTIONS: dict[int, Reduction] = {
    pb.REDUCTION_UNSPECIFIED: Reduction.MEAN,
    pb.REDUCTION_MEAN: Reduction.MEAN,
    pb.REDUCTION_SUM: Reduction.SUM,
    pb.REDUCTION_NONE: Reduction.NONE,
    pb.REDUCTION_WEIGHTED_MEAN: Reduction.WEIGHTED_MEAN,
}
_GRADIENT_FORMATS: dict[int, GradientFormat] = {
    pb.GRADIENT_FORMAT_UNSPECIFIED: GradientFormat.DENSE,
    pb.GRADIENT_FORMAT_DENSE: GradientFormat.DENSE,
    pb.GRADIENT_FORMAT_ROW_SPARSE: GradientFormat.ROW_SPARSE,
    pb.GRADIENT_FORMAT_NONE: GradientFormat.NONE,
    pb.GRADIENT_FORMAT_FACTORED: GradientFormat.FACTORED,
}


def _margin(message: object, field: str) -> float:
    if not message.HasField("margin"):  # type: ignore[attr-defined]
        return 1.0
    margin = float(message.margin)  # type: ignore[attr-defined]
    if not math.isfinite(margin):
        raise InvalidInputError(field, f"must be finite, got {margin}")
    return margin


def _power(message: object, field: str) -> int:
    if not message.HasField("power"):  # type: ignore[attr-defined]
        return 1
    power = int(message.power)  # type: ignore[attr-defined]
    if power not in (1, 2):
        raise InvalidInputError(field, f"must be 1 or 2, got {power}")
    return power


def _enum(values: Mapping[int, _E], value: int, field: str) -> _E:
    """The engine's value of a request-level enum field."""
    if value not in values:
        raise InvalidInputError(field, f"unknown enum value {value}")
    return values[value]


def decode_request(request: pb.ComputeRequest | ParsedRequest, limits: LimitsConfig) -> LossJob:
    """Checks a request's structure and wraps its tensors without copying them.

    Raises:
        InvalidInputError: naming the first offending field.
    """
    parsed = request if isinstance(request, ParsedRequest) else ParsedRequest(request, 0)
    request = parsed.message
    loss_field = request.WhichOneof("loss")
    if loss_field is None:
        raise InvalidInputError("loss", "one loss must be set")
    reduction = _enum(_REDUCTIONS, request.reduction, "reduction")
    gradient_format = _enum(_GRADIENT_FORMATS, request.gradient_format, "gradient_format")
    kind = LossKind(loss_field)
    spec, codec = SPECS[kind], CODECS[kind]
    message = getattr(request, loss_field)
    decoder = TensorDecoder(limits, loss_field, parsed)
    inputs = _decode_inputs(spec, message, decoder)
    scores = inputs.scores
    extras = codec.extras(message, decoder, scores[0]) if codec.extras else NO_EXTRAS
    key = BatchKey(
        params=_loss_params(spec, codec, message, decoder, extras),
        dtype=scores[0].dtype,
        trailing_shape=tuple(scores[0].shape[1:]),
    )
    if gradient_format is GradientFormat.FACTORED:
        _check_factorable(spec, key)
    flags = {s.flag: s.decode(message, decoder) for s in codec.request_switches}
    options = RequestOptions(
        reduction=reduction,
        gradient_format=gradient_format,
        return_per_sample=request.return_per_sample or reduction is Reduction.NONE,
        **extras.options,
        **flags,
    )
    sample_weights = decoder.tensor(
        request.sample_weights,
        "sample_weights",
        ndim=1,
        floats=True,
        required=False,
        top_level=True,
    )
    rows = sum(spec.set_rows(scores))
    _check_sample_weights(spec, reduction, sample_weights, rows)
    if rows == 0:
        raise InvalidInputError(decoder.field(spec.input_fields[0]), "the batch is empty")
    return LossJob(
        request_id=request.request_id,
        key=key,
        options=options,
        inputs=scores,
        input_fields=spec.input_fields,
        labels=inputs.aux.get(Aux.LABELS),
        targets=inputs.aux.get(Aux.TARGETS),
        class_weights=extras.class_weights,
        sample_weights=sample_weights,
        rows=rows,
        nbytes=decoder.nbytes,  # every tensor of the request, weights included
    )


def _check_sample_weights(
    spec: LossSpec, reduction: Reduction, sample_weights: torch.Tensor | None, rows: int
) -> None:
    if reduction is Reduction.WEIGHTED_MEAN and sample_weights is None:
        raise InvalidInputError("sample_weights", "is required by REDUCTION_WEIGHTED_MEAN")
    if sample_weights is not None and sample_weights.shape[0] != rows:
        raise InvalidInputError(
            "sample_weights.shape",
            f"must have {rows} entries ({spec.samples_text}), got {list(sample_weights.shape)}",
        )


@dataclass(slots=True)
class _Inputs:
    """A request's score inputs in declaration order, and its labels or targets."""

    scores: tuple[torch.Tensor, ...]
    aux: dict[Aux, torch.Tensor]


def _decode_inputs(spec: LossSpec, message: Any, decoder: TensorDecoder) -> _Inputs:
    """The inputs the spec declares, each checked when it is read, then their rows."""
    first = spec.scores[0]
    scores = []
    for score in spec.scores:
        tensor = decoder.required(
            getattr(message, score.name), score.name, ndim=score.ndim, floats=True
        )
        if score is not first:
            decoder.same_dtype(
                getattr(message, first.name), getattr(message, score.name), score.name, first.name
            )
        if score.ndim == 2 and tensor.shape[1] < 2:
            raise InvalidInputError(
                f"{decoder.field(score.name)}.shape[1]",
                f"needs at least 2 classes, got {tensor.shape[1]}",
            )
        scores.append(tensor)
    aux = {}
    for name in spec.aux:
        aux[name] = decoder.required(getattr(message, name), name, ndim=1, floats=False)
        if name is Aux.TARGETS and getattr(message, name).dtype not in INT_WIRE_DTYPES:
            raise InvalidInputError(f"{decoder.field(name)}.dtype", "must be int32 or int64")
    rows = int(scores[0].shape[0])
    for score, tensor in zip(spec.scores[1:], scores[1:], strict=True):
        if score.sample_set == first.sample_set:
            decoder.same_rows(tensor, score.name, rows, first.name)
    for name, tensor in aux.items():
        decoder.same_rows(tensor, name, rows, first.name)
    if spec.set_count > 1:
        for score, tensor in zip(spec.scores, scores, strict=True):
            if tensor.shape[0] == 0:
                raise InvalidInputError(decoder.field(score.name), "the batch is empty")
    return _Inputs(tuple(scores), aux)


def _loss_params(
    spec: LossSpec, codec: LossCodec, message: Any, decoder: TensorDecoder, extras: Extras
) -> LossParams:
    """The batch parameters: the loss's own switches, then margin, power and kink."""
    params = dict(extras.params)
    for switch in codec.batch_switches:
        params[switch.flag] = switch.decode(message, decoder)
    fields = _HINGE_FIELDS[spec.kind]
    if "margin" in fields:
        params["margin"] = _margin(message, decoder.field("margin"))
    if "power" in fields:
        params["power"] = _power(message, decoder.field("power"))
    if KINK.field in fields:
        params["kink_one"] = KINK.decode(message, decoder)
    return LossParams(kind=spec.kind, **params)


# Counts of set mask bits are exact in float32 up to here, whatever the order of the sum.
_EXACT_FLOAT32_COUNTS = 1 << 24


def _check_factorable(spec: LossSpec, key: BatchKey) -> None:
    """Only the power-1 multi-class gradients factor into a mask and row values.

    And only where a row's count of active entries is exact in the compute dtype:
    beyond 2^24 classes in float32 the server's count would depend on the order of
    its sum, which the SDK could not repeat.
    """
    params = key.params
    allowed = " or ".join(kind.value for kind, s in SPECS.items() if s.factorable)
    if not spec.factorable:
        got = params.kind.value
    elif params.power != 1:
        got = f"{params.kind.value} with power {params.power}"
    elif key.dtype != torch.float64 and key.trailing_shape[0] > _EXACT_FLOAT32_COUNTS:
        raise InvalidInputError(
            "gradient_format",
            f"GRADIENT_FORMAT_FACTORED needs at most {_EXACT_FLOAT32_COUNTS} classes below "
            f"float64 scores, got {key.trailing_shape[0]}",
        )
    else:
        return
    raise InvalidInputError(
        "gradient_format", f"GRADIENT_FORMAT_FACTORED needs {allowed} with power 1, got {got}"
    )
