"""Requests run once on each worker before the server says SERVING.

Every loss in every score dtype, with each option that takes its own code path
(squared hinge, kink ONE, class weights, ignore_index, split ties, pooled GAN
means, weighted means, row-sparse and no gradients, per-sample losses), so that
health SERVING means every kernel has run. GPU workers also compile the fused
Weston-Watkins kernel's variants and run one batch of the largest size the batcher
forms, so that the caching allocator holds its memory before the first caller.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hingeloss._requests import build_request
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import BatchingConfig

WARM_UP_DTYPES = ("float16", "bfloat16", "float32", "float64")
ROWS = 8
CLASSES = 3
# Classes of the full-size warm-up batch (rows fill the batch byte limit).
FULL_SIZE_CLASSES = 1000

# Each loss's option sets that take different code paths; {} is the default.
_VARIANTS: dict[str, list[dict[str, Any]]] = {
    "binary_hinge": [
        {},
        {"power": 2, "label_encoding": "zero_one", "reduction": "sum", "return_per_sample": True},
        {"kink": "one", "gradient_format": "none"},
        {"reduction": "weighted_mean", "gradient_format": "row_sparse"},
    ],
    "multiclass_hinge": [
        {},
        {"power": 2, "class_normalization": "divide_by_num_classes"},
        {"kink": "one", "class_weights": "weights", "ignore_index": -100},
        {"gradient_format": "none", "class_weights": "weights"},
        {"kink": "one", "gradient_format": "none"},
        {"power": 2, "gradient_format": "row_sparse", "return_per_sample": True},
        {"gradient_format": "factored", "ignore_index": -100},
    ],
    "crammer_singer": [
        {},
        {"tie_break": "split_evenly"},
        {"power": 2, "kink": "one"},
        {"gradient_format": "none"},
        {"gradient_format": "factored"},
        {"gradient_format": "factored", "tie_break": "split_evenly"},
    ],
    "gan_discriminator": [
        {},
        {"combine": "pooled_mean", "kink": "one"},
        {"reduction": "weighted_mean", "gradient_format": "none"},
    ],
    "gan_generator": [{}, {"gradient_format": "none"}],
    "margin_ranking": [
        {"gradient_format": "row_sparse"},
        {"kink": "one", "margin": 0.5, "return_per_sample": True},
        {"gradient_format": "none"},
    ],
}


def _inputs(loss: str, dtype: str, classes: int = CLASSES) -> dict[str, np.ndarray]:
    """Small inputs with rows on both sides of the margin and exactly on it."""

    def scores(*shape: int) -> Any:
        values = np.linspace(-2, 2, int(np.prod(shape))).reshape(shape)
        if dtype in ("float16", "bfloat16"):  # numpy has no bfloat16: torch tensors travel
            return torch.from_numpy(values).to(getattr(torch, dtype))
        return values.astype(dtype)

    signs = np.array([1, -1] * (ROWS // 2), dtype="int64")
    if loss == "binary_hinge":
        return {"scores": scores(ROWS), "labels": signs}
    if loss in ("multiclass_hinge", "crammer_singer"):
        targets = np.arange(ROWS, dtype="int64") % classes
        return {"scores": scores(ROWS, classes), "targets": targets}
    if loss == "gan_discriminator":
        return {"real_scores": scores(ROWS), "fake_scores": scores(ROWS)[:5]}
    if loss == "gan_generator":
        return {"fake_scores": scores(ROWS)}
    return {"scores_a": scores(ROWS), "scores_b": -scores(ROWS) / 2, "labels": signs}


def _options(
    loss: str, variant: dict[str, Any], inputs: dict[str, Any], classes: int = CLASSES
) -> dict[str, Any]:
    options = dict(variant)
    if options.get("class_weights") == "weights":
        options["class_weights"] = np.linspace(0.5, 2.0, classes)
    if options.get("ignore_index") is not None:
        inputs["targets"] = inputs["targets"].copy()
        inputs["targets"][-1] = options["ignore_index"]
    if options.get("label_encoding") == "zero_one":
        inputs["labels"] = (inputs["labels"] > 0).astype("int64")
    if options.get("reduction") == "weighted_mean":
        samples = ROWS + 5 if loss == "gan_discriminator" else ROWS
        options["sample_weights"] = np.linspace(0.5, 1.5, samples)
    return options


def warm_up_requests() -> list[pb.ComputeRequest]:
    """Every loss x score dtype x option path, each a small request."""
    requests = []
    for dtype in WARM_UP_DTYPES:
        for loss, variants in _VARIANTS.items():
            for variant in variants:
                inputs = _inputs(loss, dtype)
                options = _options(loss, variant, inputs)
                requests.append(build_request(loss, inputs, options)[0])
    return requests


def gpu_warm_up_requests(batching: BatchingConfig) -> list[pb.ComputeRequest]:
    """What GPU workers run besides: the fused Weston-Watkins kernel's variants, compiled
    once per dtype and option path (fused.py), then one batch of the largest size."""
    requests = []
    for dtype in WARM_UP_DTYPES:
        for variant in _VARIANTS["multiclass_hinge"]:
            inputs = _inputs("multiclass_hinge", dtype, classes=FULL_SIZE_CLASSES)
            options = _options("multiclass_hinge", variant, inputs, FULL_SIZE_CLASSES)
            requests.append(build_request("multiclass_hinge", inputs, options)[0])
    return [*requests, full_size_request(batching)]


def full_size_request(batching: BatchingConfig) -> pb.ComputeRequest:
    """One float32 Weston-Watkins request as large as the largest batch the batcher forms."""
    row_bytes = FULL_SIZE_CLASSES * 4 + 8  # scores and an int64 target
    rows = max(1, min(batching.max_batch_rows, batching.max_batch_bytes // row_bytes))
    scores = np.linspace(-2, 2, rows * FULL_SIZE_CLASSES, dtype="float32")
    targets = np.arange(rows, dtype="int64") % FULL_SIZE_CLASSES
    inputs = {"scores": scores.reshape(rows, FULL_SIZE_CLASSES), "targets": targets}
    return build_request("multiclass_hinge", inputs, {})[0]
