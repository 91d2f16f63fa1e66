"""Turns a ComputeRequest into a LossJob, checking its structure before touching any data.

Only O(1) checks happen here (enums, dtypes, shapes, byte counts, limits), so that
a request claiming a shape of 2^40 is refused before anything is allocated. The
checks that read values (NaN, label ranges, weights) run on the worker thread,
in `prepare.py`, off the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hingeloss import _tensors as tensors
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.engine.jobs import (
    FACTORED_LOSSES,
    BatchKey,
    GradientFormat,
    LossJob,
    LossKind,
    LossParams,
    Reduction,
    RequestOptions,
    set_rows,
)
from hingeloss_server.transport.request_wire import ParsedRequest

# Every input is a vector of rows or a rows x classes matrix (ServerInfo reports it).
MAX_DIMS = 2
FLOAT_WIRE_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
_INT_WIRE_DTYPES = (pb.DTYPE_INT32, pb.DTYPE_INT64)

_REDUCTIONS = {
    pb.REDUCTION_UNSPECIFIED: Reduction.MEAN,
    pb.REDUCTION_MEAN: Reduction.MEAN,
    pb.REDUCTION_SUM: Reduction.SUM,
    pb.REDUCTION_NONE: Reduction.NONE,
    pb.REDUCTION_WEIGHTED_MEAN: Reduction.WEIGHTED_MEAN,
}
_GRADIENT_FORMATS = {
    pb.GRADIENT_FORMAT_UNSPECIFIED: GradientFormat.DENSE,
    pb.GRADIENT_FORMAT_DENSE: GradientFormat.DENSE,
    pb.GRADIENT_FORMAT_ROW_SPARSE: GradientFormat.ROW_SPARSE,
    pb.GRADIENT_FORMAT_NONE: GradientFormat.NONE,
    pb.GRADIENT_FORMAT_FACTORED: GradientFormat.FACTORED,
}


def _enum(value: int, allowed: Sequence[int], field: str) -> int:
    if value not in allowed:
        raise InvalidInputError(field, f"unknown enum value {value}")
    return value


def _kink_one(value: int, field: str) -> bool:
    _enum(value, (0, pb.KINK_SUBGRADIENT_ZERO, pb.KINK_SUBGRADIENT_ONE), field)
    return value == pb.KINK_SUBGRADIENT_ONE


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


class _Decoder:
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
        allowed = FLOAT_WIRE_DTYPES if floats else FLOAT_WIRE_DTYPES + _INT_WIRE_DTYPES
        if message.dtype not in allowed:
            names = ", ".join(tensors.BY_WIRE[d].name for d in allowed)
            raise InvalidInputError(
                f"{field}.dtype", f"must be one of {names}, got {message.dtype}"
            )
        shape = list(message.shape)
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

    def same_rows(self, tensor: torch.Tensor, name: str, rows: int, rows_of: str) -> None:
        if tensor.shape[0] != rows:
            raise InvalidInputError(
                f"{self.field(name)}.shape",
                f"must have {rows} rows like {self.field(rows_of)}, got {list(tensor.shape)}",
            )


def _required(tensor: torch.Tensor | None) -> torch.Tensor:
    assert tensor is not None  # guaranteed by required=True
    return tensor


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
    reduction = _REDUCTIONS.get(request.reduction)
    if reduction is None:
        raise InvalidInputError("reduction", f"unknown enum value {request.reduction}")
    gradient_format = _GRADIENT_FORMATS.get(request.gradient_format)
    if gradient_format is None:
        raise InvalidInputError("gradient_format", f"unknown enum value {request.gradient_format}")
    kind = LossKind(loss_field)
    message = getattr(request, loss_field)
    decoder = _Decoder(limits, loss_field, parsed)
    job = _DECODERS[kind](message, decoder)
    if gradient_format is GradientFormat.FACTORED:
        _check_factorable(job.key)
    option_fields = _options(kind, message, decoder)
    options = RequestOptions(
        reduction=reduction,
        gradient_format=gradient_format,
        return_per_sample=request.return_per_sample or reduction is Reduction.NONE,
        **option_fields,
    )
    sample_weights = decoder.tensor(
        request.sample_weights,
        "sample_weights",
        ndim=1,
        floats=True,
        required=False,
        top_level=True,
    )
    rows = sum(set_rows(kind, job.inputs))
    if reduction is Reduction.WEIGHTED_MEAN and sample_weights is None:
        raise InvalidInputError("sample_weights", "is required by REDUCTION_WEIGHTED_MEAN")
    if sample_weights is not None and sample_weights.shape[0] != rows:
        what = "real plus fake samples" if kind is LossKind.GAN_DISCRIMINATOR else "samples"
        raise InvalidInputError(
            "sample_weights.shape",
            f"must have {rows} entries ({what}), got {list(sample_weights.shape)}",
        )
    if rows == 0:
        raise InvalidInputError(decoder.field(job.input_fields[0]), "the batch is empty")
    job.request_id = request.request_id
    job.options = options
    job.sample_weights = sample_weights
    job.rows = rows
    job.nbytes = decoder.nbytes  # every tensor of the request, weights included
    return job


# Counts of set mask bits are exact in float32 up to here, whatever the order of the sum.
_EXACT_FLOAT32_COUNTS = 1 << 24


def _check_factorable(key: BatchKey) -> None:
    """Only the power-1 multi-class gradients factor into a mask and row values.

    And only where a row's count of active entries is exact in the compute dtype:
    beyond 2^24 classes in float32 the server's count would depend on the order of
    its sum, which the SDK could not repeat.
    """
    params = key.params
    allowed = " or ".join(k.value for k in FACTORED_LOSSES)
    if params.kind not in FACTORED_LOSSES:
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


def _options(kind: LossKind, message: Any, decoder: _Decoder) -> dict[str, Any]:
    if kind is LossKind.BINARY_HINGE:
        encoding = _enum(
            message.label_encoding,  # type: ignore[attr-defined]
            (0, pb.LABEL_ENCODING_PLUS_MINUS_ONE, pb.LABEL_ENCODING_ZERO_ONE),
            decoder.field("label_encoding"),
        )
        return {"label_zero_one": encoding == pb.LABEL_ENCODING_ZERO_ONE}
    if kind is LossKind.MULTICLASS_HINGE and message.HasField("ignore_index"):  # type: ignore[attr-defined]
        return {"ignore_index": int(message.ignore_index)}  # type: ignore[attr-defined]
    if kind is LossKind.GAN_DISCRIMINATOR:
        combine = _enum(
            message.combine,  # type: ignore[attr-defined]
            (0, pb.GAN_COMBINE_SUM_OF_MEANS, pb.GAN_COMBINE_POOLED_MEAN),
            decoder.field("combine"),
        )
        return {"pooled_mean": combine == pb.GAN_COMBINE_POOLED_MEAN}
    return {}


def _job(
    params: LossParams,
    inputs: tuple[torch.Tensor, ...],
    input_fields: tuple[str, ...],
    **tensors_: torch.Tensor | None,
) -> LossJob:
    trailing = tuple(int(d) for d in inputs[0].shape[1:])
    return LossJob(
        request_id="",
        key=BatchKey(params=params, dtype=inputs[0].dtype, trailing_shape=trailing),
        options=RequestOptions(),
        inputs=inputs,
        input_fields=input_fields,
        **tensors_,  # type: ignore[arg-type]
    )


def _same_dtype(decoder: _Decoder, first: pb.Tensor, other: pb.Tensor, name: str, of: str) -> None:
    if other.dtype != first.dtype:
        raise InvalidInputError(
            f"{decoder.field(name)}.dtype",
            f"must equal {decoder.field(of)}.dtype ({first.dtype}), got {other.dtype}",
        )


def _binary(message: pb.BinaryHinge, decoder: _Decoder) -> LossJob:
    scores = _required(decoder.tensor(message.scores, "scores", ndim=1, floats=True))
    labels = _required(decoder.tensor(message.labels, "labels", ndim=1, floats=False))
    decoder.same_rows(labels, "labels", int(scores.shape[0]), "scores")
    params = LossParams(
        kind=LossKind.BINARY_HINGE,
        margin=_margin(message, decoder.field("margin")),
        power=_power(message, decoder.field("power")),
        kink_one=_kink_one(message.kink_subgradient, decoder.field("kink_subgradient")),
    )
    return _job(params, (scores,), ("scores",), labels=labels)


def _class_scores(
    message: pb.MulticlassHinge | pb.CrammerSinger, decoder: _Decoder
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = _required(decoder.tensor(message.scores, "scores", ndim=2, floats=True))
    if scores.shape[1] < 2:
        raise InvalidInputError(
            f"{decoder.field('scores')}.shape[1]",
            f"needs at least 2 classes, got {scores.shape[1]}",
        )
    targets = _required(decoder.tensor(message.targets, "targets", ndim=1, floats=False))
    if message.targets.dtype not in _INT_WIRE_DTYPES:
        raise InvalidInputError(f"{decoder.field('targets')}.dtype", "must be int32 or int64")
    decoder.same_rows(targets, "targets", int(scores.shape[0]), "scores")
    return scores, targets


def _multiclass(message: pb.MulticlassHinge, decoder: _Decoder) -> LossJob:
    scores, targets = _class_scores(message, decoder)
    weights = decoder.tensor(
        message.target_class_weights, "target_class_weights", ndim=1, floats=True, required=False
    )
    if weights is not None and weights.shape[0] != scores.shape[1]:
        raise InvalidInputError(
            f"{decoder.field('target_class_weights')}.shape",
            f"must have one weight per class ({scores.shape[1]}), got {list(weights.shape)}",
        )
    normalization = _enum(
        message.class_normalization,
        (
            0,
            pb.CLASS_NORMALIZATION_SUM_OVER_CLASSES,
            pb.CLASS_NORMALIZATION_DIVIDE_BY_NUM_CLASSES,
        ),
        decoder.field("class_normalization"),
    )
    weights64 = None if weights is None else weights.to(torch.float64)
    params = LossParams(
        kind=LossKind.MULTICLASS_HINGE,
        margin=_margin(message, decoder.field("margin")),
        power=_power(message, decoder.field("power")),
        kink_one=_kink_one(message.kink_subgradient, decoder.field("kink_subgradient")),
        divide_by_num_classes=normalization == pb.CLASS_NORMALIZATION_DIVIDE_BY_NUM_CLASSES,
        class_weights=None if weights64 is None else weights64.numpy().tobytes(),
    )
    return _job(
        params,
        (scores,),
        ("scores",),
        targets=targets,
        class_weights=weights64,
    )


def _crammer_singer(message: pb.CrammerSinger, decoder: _Decoder) -> LossJob:
    scores, targets = _class_scores(message, decoder)
    tie_break = _enum(
        message.tie_break,
        (0, pb.TIE_BREAK_FIRST_INDEX, pb.TIE_BREAK_SPLIT_EVENLY),
        decoder.field("tie_break"),
    )
    params = LossParams(
        kind=LossKind.CRAMMER_SINGER,
        margin=_margin(message, decoder.field("margin")),
        power=_power(message, decoder.field("power")),
        kink_one=_kink_one(message.kink_subgradient, decoder.field("kink_subgradient")),
        split_ties=tie_break == pb.TIE_BREAK_SPLIT_EVENLY,
    )
    return _job(params, (scores,), ("scores",), targets=targets)


def _gan_discriminator(message: pb.GanDiscriminator, decoder: _Decoder) -> LossJob:
    real = _required(decoder.tensor(message.real_scores, "real_scores", ndim=1, floats=True))
    fake = _required(decoder.tensor(message.fake_scores, "fake_scores", ndim=1, floats=True))
    _same_dtype(decoder, message.real_scores, message.fake_scores, "fake_scores", "real_scores")
    for tensor, name in ((real, "real_scores"), (fake, "fake_scores")):
        if tensor.shape[0] == 0:
            raise InvalidInputError(decoder.field(name), "the batch is empty")
    params = LossParams(
        kind=LossKind.GAN_DISCRIMINATOR,
        kink_one=_kink_one(message.kink_subgradient, decoder.field("kink_subgradient")),
    )
    return _job(params, (real, fake), ("real_scores", "fake_scores"))


def _gan_generator(message: pb.GanGenerator, decoder: _Decoder) -> LossJob:
    fake = _required(decoder.tensor(message.fake_scores, "fake_scores", ndim=1, floats=True))
    params = LossParams(kind=LossKind.GAN_GENERATOR)
    return _job(params, (fake,), ("fake_scores",))


def _margin_ranking(message: pb.MarginRanking, decoder: _Decoder) -> LossJob:
    a = _required(decoder.tensor(message.scores_a, "scores_a", ndim=1, floats=True))
    b = _required(decoder.tensor(message.scores_b, "scores_b", ndim=1, floats=True))
    _same_dtype(decoder, message.scores_a, message.scores_b, "scores_b", "scores_a")
    labels = _required(decoder.tensor(message.labels, "labels", ndim=1, floats=False))
    decoder.same_rows(b, "scores_b", int(a.shape[0]), "scores_a")
    decoder.same_rows(labels, "labels", int(a.shape[0]), "scores_a")
    params = LossParams(
        kind=LossKind.MARGIN_RANKING,
        margin=_margin(message, decoder.field("margin")),
        kink_one=_kink_one(message.kink_subgradient, decoder.field("kink_subgradient")),
    )
    return _job(params, (a, b), ("scores_a", "scores_b"), labels=labels)


_DECODERS: dict[LossKind, Callable[[Any, _Decoder], LossJob]] = {
    LossKind.BINARY_HINGE: _binary,
    LossKind.MULTICLASS_HINGE: _multiclass,
    LossKind.CRAMMER_SINGER: _crammer_singer,
    LossKind.GAN_DISCRIMINATOR: _gan_discriminator,
    LossKind.GAN_GENERATOR: _gan_generator,
    LossKind.MARGIN_RANKING: _margin_ranking,
}
