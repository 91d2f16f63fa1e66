"""What a benchmark sends: inputs of a given loss, shape, dtype and sparsity, serialized once.

Scores are drawn on a coarse binary grid (multiples of 2**-6, or 2**-4 for bfloat16)
so that every hinge argument the server computes is exact in float32: the server
and the float64 reference then agree on which terms are active, even on the kink.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hingeloss._requests import OTHER_FIELDS, SCORE_FIELDS, InputKind, build_request
from hingeloss.v1 import loss_service_pb2 as pb

LOSSES = tuple(SCORE_FIELDS)
DTYPES = ("float32", "float64", "float16", "bfloat16")
GRADIENT_FORMATS = ("dense", "row_sparse", "none", "factored")
_TWO_D = ("multiclass_hinge", "crammer_singer")
# Requests held in memory per workload, at most this many bytes of them in all.
_VARIANT_BYTES = 64 << 20
_MAX_VARIANTS = 4
# Inactive samples clear the margin by this much, so that they stay inactive under
# either kink convention and in every dtype.
_SLACK = 0.5


def parse_shape(text: str) -> tuple[int, int | None]:
    """'256x1000' -> (256, 1000); '4096' -> (4096, None)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"shape must look like 256x1000 or 4096, got {text!r}") from None
    if len(dims) not in (1, 2) or any(d < 1 for d in dims):
        raise ValueError(f"shape must be one or two positive sizes, got {text!r}")
    return dims[0], dims[1] if len(dims) == 2 else None


@dataclass(frozen=True)
class WorkloadSpec:
    """One kind of request.

    Attributes:
        loss: a loss name, e.g. "multiclass_hinge".
        batch: samples per request (B).
        classes: classes per sample (C) for multi-class losses; ignored by the others.
        dtype: wire dtype of the scores.
        sparsity: share of samples with a zero loss; None leaves the random draw as is.
        gradient_format: "dense", "row_sparse", "none" or "factored" (multi-class
            losses at power 1; the load generator decodes each answer with the SDK).
        options: loss options as the SDK takes them (margin, power, kink, ...).
        seed: the inputs depend on nothing else.
    """

    loss: str = "multiclass_hinge"
    batch: int = 256
    classes: int = 1000
    dtype: str = "float32"
    sparsity: float | None = None
    gradient_format: str = "dense"
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.gradient_format not in GRADIENT_FORMATS:
            raise ValueError(
                f"gradient_format must be one of {', '.join(GRADIENT_FORMATS)}, "
                f"got {self.gradient_format!r}"
            )
        if self.gradient_format == "factored" and (
            self.loss not in _TWO_D or int(self.options.get("power", 1)) != 1
        ):
            raise ValueError(
                f"gradient_format factored needs {' or '.join(_TWO_D)} with power 1, "
                f"got {self.loss}"
            )
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.loss in _TWO_D and self.classes < 2:
            raise ValueError(f"classes must be >= 2 for {self.loss}, got {self.classes}")
        if self.sparsity is not None and not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")
        if self.sparsity is not None and self.loss == "gan_generator":
            raise ValueError("gan_generator is linear: it has no inactive samples")

    @property
    def shape_text(self) -> str:
        return f"{self.batch}x{self.classes}" if self.loss in _TWO_D else str(self.batch)

    @property
    def margin(self) -> float:
        return float(self.options.get("margin", 1.0))


@dataclass(frozen=True)
class Variant:
    """One prebuilt request and the exact values it carries (float64, for the reference)."""

    payload: bytes
    inputs: dict[str, np.ndarray[Any, Any]]
    # What the SDK needs to decode the answer as it would its own request's.
    kind: InputKind


@dataclass(frozen=True)
class Workload:
    """A few request variants of one spec; the load loop cycles through them."""

    spec: WorkloadSpec
    variants: tuple[Variant, ...]
    rows: int
    request_bytes: int

    @staticmethod
    def build(spec: WorkloadSpec) -> Workload:
        """Draws the inputs and serializes the requests (deterministic in spec.seed)."""
        first = _variant(spec, 0)
        count = max(1, min(_MAX_VARIANTS, _VARIANT_BYTES // max(1, len(first.payload))))
        variants = [first] + [_variant(spec, i) for i in range(1, count)]
        return Workload(
            spec=spec, variants=tuple(variants), rows=spec.batch, request_bytes=len(first.payload)
        )


def _grid_step(dtype: str) -> float:
    return 2.0**-4 if dtype == "bfloat16" else 2.0**-6


def _on_grid(values: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    """Rounds to the grid and clips to [-8, 8): exact in every wire dtype."""
    step = _grid_step(dtype)
    return np.clip(np.round(values / step) * step, -8.0, 8.0 - step)


def _inactive_rows(
    rng: np.random.Generator, batch: int, sparsity: float | None
) -> np.ndarray[Any, Any]:
    mask = np.zeros(batch, dtype=bool)
    if sparsity is not None:
        mask[rng.permutation(batch)[: int(round(sparsity * batch))]] = True
    return mask


def _clear(margin: float, dtype: str) -> float:
    """A score offset on the grid that clears the margin with slack."""
    step = _grid_step(dtype)
    return math.ceil((margin + _SLACK) / step) * step


def _below(limit: np.ndarray[Any, Any] | float, dtype: str) -> np.ndarray[Any, Any]:
    """The largest grid value strictly below `limit`."""
    step = _grid_step(dtype)
    return np.asarray((np.ceil(np.asarray(limit) / step) - 1) * step)


def generate_inputs(spec: WorkloadSpec, index: int) -> dict[str, np.ndarray[Any, Any]]:
    """Float64 inputs on the grid (scores) and integer labels or targets, for variant `index`."""
    rng = np.random.default_rng([spec.seed, index])
    inputs = _draw(spec, rng)
    for name in SCORE_FIELDS[spec.loss]:
        if np.abs(inputs[name]).max(initial=0.0) >= 16:
            raise ValueError("the margin is too large for exact benchmark scores")
    return inputs


def _draw(spec: WorkloadSpec, rng: np.random.Generator) -> dict[str, np.ndarray[Any, Any]]:
    batch, margin, dtype = spec.batch, spec.margin, spec.dtype
    inactive = _inactive_rows(rng, batch, spec.sparsity)
    clear = _clear(margin, dtype)
    step = _grid_step(dtype)
    draw = rng.standard_normal

    if spec.loss in _TWO_D:
        classes = spec.classes
        scores = _on_grid(draw((batch, classes)), dtype)
        targets = rng.integers(0, classes, batch)
        if spec.sparsity is not None:
            rows = np.arange(batch)
            others = scores.copy()
            others[rows, targets] = -np.inf
            best = others.max(axis=1)
            # Inactive: the target beats every other class by margin + slack.
            # Active: the best other class violates the margin.
            scores[rows, targets] = np.where(
                inactive,
                best + clear,
                np.minimum(scores[rows, targets], _below(best + margin, dtype)),
            )
        return {"scores": scores, "targets": targets.astype(np.int64)}

    scores = _on_grid(draw(batch), dtype)
    labels = rng.choice(np.array([-1, 1]), batch)
    if spec.loss == "binary_hinge":
        if spec.sparsity is not None:
            # Inactive: y f >= margin + slack. Active: y f < margin.
            extra = _on_grid(np.abs(draw(batch)), dtype)
            active_side = np.minimum(scores * labels, _below(margin, dtype))
            scores = labels * np.where(inactive, clear + extra, active_side)
        return {"scores": scores, "labels": labels.astype(np.int64)}
    if spec.loss == "margin_ranking":
        other = _on_grid(draw(batch), dtype)
        if spec.sparsity is not None:
            # y (a - b) is margin + slack (inactive) or just below the margin (active).
            gap = np.where(inactive, clear, _below(margin, dtype))
            scores = other + labels * gap
        return {"scores_a": scores, "scores_b": other, "labels": labels.astype(np.int64)}
    if spec.loss == "gan_discriminator":
        fake = _on_grid(draw(batch), dtype)
        if spec.sparsity is not None:
            inactive_fake = _inactive_rows(rng, batch, spec.sparsity)
            scores = np.where(inactive, 1.0 + _SLACK, np.minimum(scores, 1.0 - step))
            fake = np.where(inactive_fake, -1.0 - _SLACK, np.maximum(fake, -1.0 + step))
        return {"real_scores": scores, "fake_scores": fake}
    return {"fake_scores": scores}  # gan_generator


def encode_scores(values: np.ndarray[Any, Any], dtype: str) -> pb.Tensor:
    """The wire tensor of grid values in `dtype` (bfloat16 by truncating float32: exact here)."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16
        return pb.Tensor(
            dtype=pb.DTYPE_BFLOAT16,
            shape=values.shape,
            data=bits.astype("<u2").tobytes(),
        )
    array = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    wire = pb.DTYPE_FLOAT64 if dtype == "float64" else pb.DTYPE_FLOAT32
    if dtype == "float16":
        wire = pb.DTYPE_FLOAT16
    return pb.Tensor(dtype=wire, shape=array.shape, data=array.tobytes())


def _variant(spec: WorkloadSpec, index: int) -> Variant:
    inputs = generate_inputs(spec, index)
    options = dict(spec.options)
    options["gradient_format"] = spec.gradient_format
    options["request_id"] = f"bench-{spec.seed}-{index}"
    # Build with float64 placeholders, then put the scores in their wire dtype.
    request, kind = build_request(spec.loss, inputs, options)
    message = getattr(request, spec.loss)
    for name in SCORE_FIELDS[spec.loss]:
        getattr(message, name).CopyFrom(encode_scores(inputs[name], spec.dtype))
    for name in OTHER_FIELDS[spec.loss]:
        assert inputs[name].dtype == np.int64
    # The answer comes in the scores' wire dtype, not the placeholders'.
    sent = tuple(replace(s, wire=getattr(message, s.name).dtype) for s in kind.scores)
    kind = replace(kind, scores=sent)
    return Variant(payload=request.SerializeToString(), inputs=inputs, kind=kind)
