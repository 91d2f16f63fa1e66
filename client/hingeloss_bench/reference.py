"""Float64 numpy answers for the benchmark's requests, and the check of a served response.

Vectorised, so that a sampled 4096x1000 response is checked in a fraction of a
second; the reduction is always "mean" (what the benchmark sends). Written from
docs/LOSSES.md and independent of the server's torch kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hingeloss import _tensors as tensors
from hingeloss._requests import LOSS_OPTIONS, InputKind
from hingeloss._results import decode_response
from hingeloss.v1 import loss_service_pb2 as pb

Array = np.ndarray[Any, Any]

# Options the reference understands, with their defaults.
SUPPORTED_OPTIONS: dict[str, Any] = {
    "margin": 1.0,
    "power": 1,
    "kink": "zero",
    "class_normalization": "sum_over_classes",
    "tie_break": "first_index",
    "combine": "sum_of_means",
}
# The options each loss takes, of those above (its request message's, as the SDK reads them).
APPLICABLE: dict[str, frozenset[str]] = {
    loss: frozenset(SUPPORTED_OPTIONS).intersection(options)
    for loss, options in LOSS_OPTIONS.items()
}
# Relative tolerance of a gradient element by wire dtype (the answer's dtype), and of the loss.
GRAD_RTOL = {"float64": 1e-9, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
LOSS_RTOL = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-4, "bfloat16": 1e-4}


@dataclass(frozen=True)
class Answer:
    """The mean-reduced loss and d(loss)/d(input) per score input."""

    loss: float
    grads: tuple[Array, ...]


def check_options(options: Mapping[str, Any], loss: str | None = None) -> dict[str, Any]:
    """The options with defaults filled in.

    Raises:
        ValueError: for an option the reference cannot verify or the loss does not take.
    """
    unknown = sorted(set(options) - set(SUPPORTED_OPTIONS))
    if unknown:
        raise ValueError(
            f"cannot verify option(s) {unknown}; supported: {sorted(SUPPORTED_OPTIONS)}"
        )
    if loss is not None:
        foreign = sorted(set(options) - APPLICABLE[loss])
        if foreign:
            raise ValueError(f"{loss} takes no option(s) {foreign}")
    resolved = dict(SUPPORTED_OPTIONS)
    resolved.update(options)
    resolved["margin"] = float(resolved["margin"])
    resolved["power"] = int(resolved["power"])
    if resolved["power"] not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {resolved['power']}")
    return resolved


def _hinge(z: Array, power: int, kink: str) -> tuple[Array, Array]:
    """Terms max(0, z)^power and their derivative d/dz."""
    positive = np.maximum(z, 0.0)
    if power == 2:
        return positive**2, 2.0 * positive
    active = z >= 0 if kink == "one" else z > 0
    return positive, active.astype(np.float64)


def answer(loss: str, inputs: Mapping[str, Array], options: Mapping[str, Any]) -> Answer:
    """The float64 answer of one request."""
    opt = check_options(options, loss)
    margin, power, kink = opt["margin"], opt["power"], opt["kink"]
    if loss in ("multiclass_hinge", "crammer_singer"):
        scores = np.asarray(inputs["scores"], dtype=np.float64)
        targets = np.asarray(inputs["targets"], dtype=np.int64)
        batch, classes = scores.shape
        rows = np.arange(batch)
        true = scores[rows, targets]
        if loss == "multiclass_hinge":
            z = scores - true[:, None] + margin
            terms, slope = _hinge(z, power, kink)
            terms[rows, targets] = 0.0
            slope[rows, targets] = 0.0
            factor = 1.0 / classes if opt["class_normalization"] == "divide_by_num_classes" else 1.0
            grad = slope * (factor / batch)
            grad[rows, targets] = -slope.sum(axis=1) * (factor / batch)
            return Answer(float(terms.sum() * factor / batch), (grad,))
        others = scores.copy()
        others[rows, targets] = -np.inf
        best = others.max(axis=1)
        term, slope = _hinge(margin - true + best, power, kink)
        tied = others == best[:, None]
        if opt["tie_break"] == "split_evenly":
            share = tied / tied.sum(axis=1, keepdims=True)
        else:
            share = np.zeros_like(scores)
            share[rows, tied.argmax(axis=1)] = 1.0
        grad = share * (slope / batch)[:, None]
        grad[rows, targets] = -slope / batch
        return Answer(float(term.sum() / batch), (grad,))
    if loss == "binary_hinge":
        scores = np.asarray(inputs["scores"], dtype=np.float64)
        labels = np.asarray(inputs["labels"], dtype=np.float64)
        term, slope = _hinge(margin - labels * scores, power, kink)
        return Answer(float(term.mean()), (-labels * slope / scores.size,))
    if loss == "margin_ranking":
        a = np.asarray(inputs["scores_a"], dtype=np.float64)
        b = np.asarray(inputs["scores_b"], dtype=np.float64)
        labels = np.asarray(inputs["labels"], dtype=np.float64)
        term, slope = _hinge(margin - labels * (a - b), 1, kink)
        grad_a = -labels * slope / a.size
        return Answer(float(term.mean()), (grad_a, -grad_a))
    if loss == "gan_discriminator":
        real = np.asarray(inputs["real_scores"], dtype=np.float64)
        fake = np.asarray(inputs["fake_scores"], dtype=np.float64)
        real_term, real_slope = _hinge(1.0 - real, 1, kink)
        fake_term, fake_slope = _hinge(1.0 + fake, 1, kink)
        if opt["combine"] == "pooled_mean":
            total = real.size + fake.size
            value = (real_term.sum() + fake_term.sum()) / total
            return Answer(float(value), (-real_slope / total, fake_slope / total))
        value = real_term.mean() + fake_term.mean()
        return Answer(float(value), (-real_slope / real.size, fake_slope / fake.size))
    if loss == "gan_generator":
        fake = np.asarray(inputs["fake_scores"], dtype=np.float64)
        return Answer(float(-fake.mean()), (np.full(fake.shape, -1.0 / fake.size),))
    raise ValueError(f"unknown loss {loss!r}")


def _dense(gradient: pb.Gradient) -> Array:
    if gradient.WhichOneof("value") == "row_sparse":
        sparse = gradient.row_sparse
        values = tensors.to_numpy(sparse.values).astype(np.float64)
        indices = tensors.to_numpy(sparse.indices)
        dense = np.zeros(tuple(sparse.dense_shape), dtype=np.float64)
        dense[indices] = values
        return dense
    return tensors.to_numpy(gradient.dense).astype(np.float64)


def check_response(
    loss: str,
    inputs: Mapping[str, Array],
    options: Mapping[str, Any],
    dtype: str,
    gradient_format: str,
    payload: bytes,
) -> str | None:
    """Compares a serialized response with the reference; returns what differs, or None."""
    response = pb.ComputeResponse.FromString(payload)
    expected = answer(loss, inputs, options)
    loss_tol = LOSS_RTOL[dtype] * max(1.0, abs(expected.loss))
    if not abs(response.loss - expected.loss) <= loss_tol:
        return f"loss {response.loss!r} != {expected.loss!r}"
    if gradient_format == "none":
        return None if not response.gradients else "gradients sent with gradient_format none"
    if len(response.gradients) != len(expected.grads):
        return f"{len(response.gradients)} gradients, expected {len(expected.grads)}"
    rtol = GRAD_RTOL[dtype]
    if gradient_format == "factored":
        # The SDK's expansion; the benchmark sends no ignore_index: the targets are the columns.
        kind = InputKind(is_torch=False, true_classes=inputs["targets"])
        served = [np.asarray(g, dtype=np.float64) for g in decode_response(response, kind).grads]
    else:
        served = [_dense(gradient) for gradient in response.gradients]
    for gradient, got, want in zip(response.gradients, served, expected.grads, strict=True):
        if got.shape != want.shape:
            return f"gradient {gradient.input!r} has shape {got.shape}, expected {want.shape}"
        atol = rtol * float(np.abs(want).max(initial=0.0))
        bad = np.abs(got - want) > atol + rtol * np.abs(want)
        if bad.any():
            index = tuple(int(i) for i in np.unravel_index(int(bad.argmax()), bad.shape))
            return (
                f"gradient {gradient.input!r}{list(index)} = {got[index]!r}, expected "
                f"{want[index]!r} ({int(bad.sum())} element(s) differ)"
            )
    return None
