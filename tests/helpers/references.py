"""Independent float64 numpy references for every hinge-family loss in LOSSES.md.

Written straight from the formulas, one sample at a time, for clarity rather than
speed, and free of torch so that they check the served kernels from outside.
Tests and the benchmark's result verification both use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_OPTIONS",
    "LOSS_NAMES",
    "SAMPLE_SETS",
    "SCORE_INPUTS",
    "ReferenceResult",
    "reference",
    "row_scales",
]

LOSS_NAMES = (
    "binary_hinge",
    "multiclass_hinge",
    "crammer_singer",
    "gan_discriminator",
    "gan_generator",
    "margin_ranking",
)

# The score inputs of each loss, in the order of the gradients.
SCORE_INPUTS: dict[str, tuple[str, ...]] = {
    "binary_hinge": ("scores",),
    "multiclass_hinge": ("scores",),
    "crammer_singer": ("scores",),
    "gan_discriminator": ("real_scores", "fake_scores"),
    "gan_generator": ("fake_scores",),
    "margin_ranking": ("scores_a", "scores_b"),
}

# The inputs whose rows are the samples of each sample set (per_sample, active).
SAMPLE_SETS: dict[str, tuple[str, ...]] = {
    "binary_hinge": ("scores",),
    "multiclass_hinge": ("scores",),
    "crammer_singer": ("scores",),
    "gan_discriminator": ("real_scores", "fake_scores"),
    "gan_generator": ("fake_scores",),
    "margin_ranking": ("scores_a",),
}

DEFAULT_OPTIONS: dict[str, Any] = {
    "margin": 1.0,
    "power": 1,
    "kink": "zero",
    "class_weights": None,
    "class_normalization": "sum_over_classes",
    "ignore_index": None,
    "tie_break": "first_index",
    "combine": "sum_of_means",
    "reduction": "mean",
    "sample_weights": None,
    "label_encoding": "plus_minus_one",
}


@dataclass(frozen=True)
class ReferenceResult:
    """A reference answer.

    Attributes:
        loss: The reduced loss; for reduction "none", the sum of the per-sample losses.
        per_sample: Per sample set (see SAMPLE_SETS), the losses l_i before any
            reduction (class weight and 1/D included; 0 on ignored rows).
        grads: Per score input (see SCORE_INPUTS), d(loss)/d(input); for
            reduction "none", the gradient of the sum.
        active: Per sample set, bool: the loss is non-zero (kink "zero") or its
            gradient is (kink "one"). Ignored rows are inactive.
    """

    loss: float
    per_sample: list[np.ndarray]
    grads: list[np.ndarray]
    active: list[np.ndarray]


@dataclass
class _PerSample:
    """Unreduced terms: l_i, dl_i/d(input) (row i of each array), activity, counted rows."""

    losses: list[np.ndarray]
    derivs: list[np.ndarray]
    active: list[np.ndarray]
    counted: list[np.ndarray]


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    unknown = set(options or {}) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}")
    merged = dict(DEFAULT_OPTIONS)
    merged.update(options or {})
    if merged["power"] not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {merged['power']}")
    if merged["kink"] not in ("zero", "one"):
        raise ValueError(f"kink must be 'zero' or 'one', got {merged['kink']}")
    return merged


def _hinge_term(z: float, power: int, kink: str) -> tuple[float, float, bool]:
    """max(0, z)^p, its derivative under the kink convention, and whether it is active."""
    active = z > 0 or (kink == "one" and power == 1 and z == 0)
    value = max(0.0, z) ** power
    slope = power * max(0.0, z) ** (power - 1) if active else 0.0
    return value, slope, active


def _binary_labels(labels: np.ndarray, encoding: str) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.float64)
    if encoding == "plus_minus_one":
        allowed = {-1.0: -1.0, 1.0: 1.0}
    elif encoding == "zero_one":
        allowed = {0.0: -1.0, 1.0: 1.0}
    else:
        raise ValueError(f"unknown label_encoding {encoding!r}")
    out = np.empty_like(labels)
    for i, value in enumerate(labels):
        if float(value) not in allowed:
            raise ValueError(f"labels[{i}] = {value} is not in the {encoding} encoding")
        out[i] = allowed[float(value)]
    return out


def _binary_hinge(inputs: dict[str, np.ndarray], opt: dict[str, Any]) -> _PerSample:
    f = np.asarray(inputs["scores"], dtype=np.float64)
    y = _binary_labels(inputs["labels"], opt["label_encoding"])
    n = f.shape[0]
    losses, deriv, active = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
    for i in range(n):
        z = opt["margin"] - y[i] * f[i]
        losses[i], slope, active[i] = _hinge_term(z, opt["power"], opt["kink"])
        deriv[i] = -y[i] * slope  # dz/df = -y
    return _PerSample([losses], [deriv], [active], [np.ones(n, dtype=bool)])


def _multiclass_hinge(inputs: dict[str, np.ndarray], opt: dict[str, Any]) -> _PerSample:
    f = np.asarray(inputs["scores"], dtype=np.float64)
    targets = np.asarray(inputs["targets"])
    n, c = f.shape
    w = np.ones(c) if opt["class_weights"] is None else np.asarray(opt["class_weights"], float)
    if opt["class_normalization"] == "sum_over_classes":
        d = 1.0
    elif opt["class_normalization"] == "divide_by_num_classes":
        d = float(c)
    else:
        raise ValueError(f"unknown class_normalization {opt['class_normalization']!r}")
    losses, deriv = np.zeros(n), np.zeros((n, c))
    active, counted = np.zeros(n, dtype=bool), np.ones(n, dtype=bool)
    for i in range(n):
        if opt["ignore_index"] is not None and targets[i] == opt["ignore_index"]:
            counted[i] = False
            continue
        y = int(targets[i])
        if not 0 <= y < c:
            raise ValueError(f"targets[{i}] = {y} is outside [0, {c})")
        scale = w[y] / d
        total, any_active = 0.0, False
        for j in range(c):
            if j == y:
                continue
            value, slope, term_active = _hinge_term(
                opt["margin"] - f[i, y] + f[i, j], opt["power"], opt["kink"]
            )
            total += value
            deriv[i, j] = scale * slope
            deriv[i, y] -= scale * slope
            any_active = any_active or term_active
        losses[i] = scale * total
        active[i] = any_active and scale > 0
    return _PerSample([losses], [deriv], [active], [counted])


def _crammer_singer(inputs: dict[str, np.ndarray], opt: dict[str, Any]) -> _PerSample:
    f = np.asarray(inputs["scores"], dtype=np.float64)
    targets = np.asarray(inputs["targets"])
    n, c = f.shape
    if opt["tie_break"] not in ("first_index", "split_evenly"):
        raise ValueError(f"unknown tie_break {opt['tie_break']!r}")
    losses, deriv, active = np.zeros(n), np.zeros((n, c)), np.zeros(n, dtype=bool)
    for i in range(n):
        y = int(targets[i])
        others = [j for j in range(c) if j != y]
        best = max(f[i, j] for j in others)
        tied = [j for j in others if f[i, j] == best]
        losses[i], slope, active[i] = _hinge_term(
            opt["margin"] - (f[i, y] - best), opt["power"], opt["kink"]
        )
        deriv[i, y] = -slope
        if opt["tie_break"] == "first_index":
            deriv[i, min(tied)] += slope
        else:
            for j in tied:
                deriv[i, j] += slope / len(tied)
    return _PerSample([losses], [deriv], [active], [np.ones(n, dtype=bool)])


def _gan_discriminator(inputs: dict[str, np.ndarray], opt: dict[str, Any]) -> _PerSample:
    sets = []
    # Real terms max(0, 1 - d) fall with d; fake terms max(0, 1 + d) rise with it.
    for name, sign in (("real_scores", -1.0), ("fake_scores", 1.0)):
        d = np.asarray(inputs[name], dtype=np.float64)
        losses, deriv = np.zeros(d.shape[0]), np.zeros(d.shape[0])
        active = np.zeros(d.shape[0], dtype=bool)
        for i in range(d.shape[0]):
            losses[i], slope, active[i] = _hinge_term(1.0 + sign * d[i], 1, opt["kink"])
            deriv[i] = sign * slope
        sets.append((losses, deriv, active))
    return _PerSample(
        [s[0] for s in sets],
        [s[1] for s in sets],
        [s[2] for s in sets],
        [np.ones(s[0].shape[0], dtype=bool) for s in sets],
    )


def _gan_generator(inputs: dict[str, np.ndarray], opt: dict[str, Any]) -> _PerSample:
    d = np.asarray(inputs["fake_scores"], dtype=np.float64)
    n = d.shape[0]
    return _PerSample([-d], [-np.ones(n)], [np.ones(n, dtype=bool)], [np.ones(n, dtype=bool)])


def _margin_ranking(inputs: dict[str, np.ndarray], opt: dict[str, Any]) -> _PerSample:
    a = np.asarray(inputs["scores_a"], dtype=np.float64)
    b = np.asarray(inputs["scores_b"], dtype=np.float64)
    y = _binary_labels(inputs["labels"], "plus_minus_one")
    n = a.shape[0]
    losses, da, db = np.zeros(n), np.zeros(n), np.zeros(n)
    active = np.zeros(n, dtype=bool)
    for i in range(n):
        losses[i], slope, active[i] = _hinge_term(
            opt["margin"] - y[i] * (a[i] - b[i]), 1, opt["kink"]
        )
        da[i] = -y[i] * slope
        db[i] = y[i] * slope
    return _PerSample([losses], [da, db], [active], [np.ones(n, dtype=bool)])


_PER_SAMPLE = {
    "binary_hinge": _binary_hinge,
    "multiclass_hinge": _multiclass_hinge,
    "crammer_singer": _crammer_singer,
    "gan_discriminator": _gan_discriminator,
    "gan_generator": _gan_generator,
    "margin_ranking": _margin_ranking,
}


def _sample_weights(opt: dict[str, Any], sizes: list[int]) -> list[np.ndarray]:
    """The sample weights split per sample set (real then fake for the GAN discriminator)."""
    if opt["sample_weights"] is None:
        raise ValueError("reduction 'weighted_mean' needs sample_weights")
    w = np.asarray(opt["sample_weights"], dtype=np.float64)
    if w.shape != (sum(sizes),) or np.any(w < 0):
        raise ValueError(f"sample_weights must be {sum(sizes)} non-negative values")
    return list(np.split(w, np.cumsum(sizes)[:-1]))


def _scales(loss_name: str, opt: dict[str, Any], counted: list[np.ndarray]) -> list[np.ndarray]:
    """d(reduced loss)/d(l_i) for every sample, 0 on rows that are not counted."""
    sizes = [m.shape[0] for m in counted]
    reduction = opt["reduction"]
    if reduction in ("sum", "none"):
        return [m.astype(np.float64) for m in counted]
    if reduction == "mean":
        if loss_name == "gan_discriminator" and opt["combine"] == "sum_of_means":
            return [m / m.sum() for m in counted]
        if opt["combine"] not in ("sum_of_means", "pooled_mean"):
            raise ValueError(f"unknown combine {opt['combine']!r}")
        total = sum(int(m.sum()) for m in counted)
        if total == 0:
            raise ValueError("no sample is counted")
        return [m / total for m in counted]
    if reduction == "weighted_mean":
        weights = [w * m for w, m in zip(_sample_weights(opt, sizes), counted, strict=True)]
        total_weight = sum(float(w.sum()) for w in weights)
        if total_weight <= 0:
            raise ValueError("the counted samples have zero total weight")
        return [w / total_weight for w in weights]
    raise ValueError(f"unknown reduction {reduction!r}")


def _reduce(loss_name: str, opt: dict[str, Any], terms: _PerSample) -> float:
    """The reduced loss, from its definition."""
    kept = [loss[m] for loss, m in zip(terms.losses, terms.counted, strict=True)]
    reduction = opt["reduction"]
    if reduction in ("sum", "none"):
        return float(sum(k.sum() for k in kept))
    if reduction == "mean":
        if loss_name == "gan_discriminator" and opt["combine"] == "sum_of_means":
            return float(sum(k.mean() for k in kept))
        return float(np.concatenate(kept).mean())
    sizes = [m.shape[0] for m in terms.counted]
    weights = _sample_weights(opt, sizes)
    num = sum(
        float((w * loss)[m].sum())
        for w, loss, m in zip(weights, terms.losses, terms.counted, strict=True)
    )
    den = sum(float(w[m].sum()) for w, m in zip(weights, terms.counted, strict=True))
    return num / den


def reference(
    loss_name: str, inputs: dict[str, np.ndarray], options: dict[str, Any] | None = None
) -> ReferenceResult:
    """Computes one loss, its per-sample terms and its gradients in float64.

    Args:
        loss_name: One of LOSS_NAMES.
        inputs: Arrays named as the proto fields: "scores" and "labels"
            (binary_hinge); "scores" (N, C) and integer "targets" (N,)
            (multiclass_hinge, crammer_singer); "real_scores" and "fake_scores"
            (gan_discriminator); "fake_scores" (gan_generator); "scores_a",
            "scores_b" and "labels" in {-1, +1} (margin_ranking).
        options: Any of these keys (defaults in DEFAULT_OPTIONS):
            margin (float, 1.0; binary, multiclass, crammer_singer, ranking),
            power (1 or 2; binary, multiclass, crammer_singer),
            kink ("zero" or "one": whether z == 0 is active for power 1),
            class_weights ((C,) weights of the TRUE class, or None; multiclass),
            class_normalization ("sum_over_classes" or "divide_by_num_classes"; multiclass),
            ignore_index (int or None; multiclass rows with that target are not counted),
            tie_break ("first_index" or "split_evenly"; crammer_singer),
            combine ("sum_of_means" or "pooled_mean"; gan_discriminator with "mean"),
            reduction ("mean", "sum", "none" or "weighted_mean"),
            sample_weights ((N,) non-negative, for "weighted_mean"; for
            gan_discriminator (N_r + N_f,), real first),
            label_encoding ("plus_minus_one" or "zero_one"; binary_hinge).

    Returns:
        The reduced loss, per-sample losses, gradients and activity. "mean"
        divides by the counted rows (non-ignored), "weighted_mean" is
        sum(w l) / sum(w) over counted rows (over both sets for the GAN
        discriminator, whose combine only matters for "mean").

    Raises:
        ValueError: For an unknown loss or option, or inputs LOSSES.md rejects.
    """
    if loss_name not in _PER_SAMPLE:
        raise ValueError(f"unknown loss {loss_name!r}")
    opt = _options(options)
    terms = _PER_SAMPLE[loss_name](inputs, opt)
    scales = _scales(loss_name, opt, terms.counted)
    if loss_name == "gan_discriminator":
        # Each term depends on its own score only: one sample set per input.
        grads = [s * d for s, d in zip(scales, terms.derivs, strict=True)]
    else:
        (scale,) = scales
        grads = [d * scale.reshape((-1,) + (1,) * (d.ndim - 1)) for d in terms.derivs]
    return ReferenceResult(
        loss=_reduce(loss_name, opt, terms),
        per_sample=terms.losses,
        grads=grads,
        active=[a & m for a, m in zip(terms.active, terms.counted, strict=True)],
    )


def row_scales(
    loss_name: str, inputs: dict[str, np.ndarray], options: dict[str, Any] | None = None
) -> list[np.ndarray]:
    """The per-row scales r_i that the server passes to the kernels, one array per sample set.

    1 for "sum" and "none"; 1/N for "mean" (N counting non-ignored rows; for the
    GAN discriminator 1/N_r and 1/N_f with "sum_of_means", 1/(N_r + N_f) with
    "pooled_mean"); w_i / sum(w) over non-ignored rows for "weighted_mean".
    Ignored rows get the same scale as the others: the kernel drops them.
    With these, loss = sum over sets and rows of r_i * l_i.
    """
    opt = _options(options)
    counted = [
        np.ones(np.asarray(inputs[name]).shape[0], dtype=bool) for name in SAMPLE_SETS[loss_name]
    ]
    if loss_name == "multiclass_hinge" and opt["ignore_index"] is not None:
        counted = [np.asarray(inputs["targets"]) != opt["ignore_index"]]
    reduction = opt["reduction"]
    if reduction in ("sum", "none"):
        return [np.ones(m.shape[0]) for m in counted]
    if reduction == "mean":
        if loss_name == "gan_discriminator" and opt["combine"] == "sum_of_means":
            return [np.full(m.shape[0], 1.0 / m.shape[0]) for m in counted]
        total = sum(int(m.sum()) for m in counted)
        return [np.full(m.shape[0], 1.0 / total) for m in counted]
    if reduction == "weighted_mean":
        weights = _sample_weights(opt, [m.shape[0] for m in counted])
        total_weight = sum(float(w[m].sum()) for w, m in zip(weights, counted, strict=True))
        return [w / total_weight for w in weights]
    raise ValueError(f"unknown reduction {reduction!r}")
