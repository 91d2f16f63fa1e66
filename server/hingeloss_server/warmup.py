"""Requests run once on each worker before the server says SERVING.

Every loss in every score dtype, with each option that takes its own code path
(squared hinge, kink ONE, class weights, ignore_index, split ties, pooled GAN
means, weighted means, row-sparse and no gradients, per-sample losses), so that
health SERVING means every kernel has run. GPU workers also compile the fused
Weston-Watkins kernel's variants and run one batch of the largest size the batcher
forms, so that the caching allocator holds its memory before the first caller.

Each loss's warm-up inputs and option sets are declared in its LossSpec
(engine/losses/); this module fills them into requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hingeloss._requests import build_request
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import BatchingConfig
from hingeloss_server.engine.jobs import LossKind
from hingeloss_server.engine.losses import SPECS, LossSpec

WARM_UP_DTYPES = ("float16", "bfloat16", "float32", "float64")
ROWS = 8
CLASSES = 3
# Classes of the full-size warm-up batch (rows fill the batch byte limit).
FULL_SIZE_CLASSES = 1000


def _scores_factory(dtype: str) -> Any:
    """Scores of a shape, linearly spaced in [-2, 2], in `dtype`."""

    def scores(*shape: int) -> Any:
        values = np.linspace(-2, 2, int(np.prod(shape))).reshape(shape)
        if dtype in ("float16", "bfloat16"):  # numpy has no bfloat16: torch tensors travel
            return torch.from_numpy(values).to(getattr(torch, dtype))
        return values.astype(dtype)

    return scores


def _request(
    spec: LossSpec, variant: Mapping[str, Any], dtype: str, classes: int = CLASSES
) -> pb.ComputeRequest:
    """One warm-up request: the spec's inputs, the variant's options with placeholders filled."""
    inputs = spec.warm_up.inputs(_scores_factory(dtype), ROWS, classes)
    options = dict(variant)
    if options.get("class_weights") == "weights":
        options["class_weights"] = np.linspace(0.5, 2.0, classes)
    if options.get("ignore_index") is not None:
        inputs["targets"] = inputs["targets"].copy()
        inputs["targets"][-1] = options["ignore_index"]
    if options.get("label_encoding") == "zero_one":
        inputs["labels"] = (inputs["labels"] > 0).astype("int64")
    if options.get("reduction") == "weighted_mean":
        samples = sum(len(inputs[name]) for name in spec.set_fields)
        options["sample_weights"] = np.linspace(0.5, 1.5, samples)
    return build_request(spec.kind.value, inputs, options)[0]


def warm_up_requests() -> list[pb.ComputeRequest]:
    """Every loss x score dtype x option path, each a small request."""
    return [
        _request(spec, variant, dtype)
        for dtype in WARM_UP_DTYPES
        for spec in SPECS.values()
        for variant in spec.warm_up.variants
    ]


def gpu_warm_up_requests(batching: BatchingConfig) -> list[pb.ComputeRequest]:
    """What GPU workers run besides: the fused Weston-Watkins kernel's variants, compiled
    once per dtype and option path (fused.py), then one batch of the largest size."""
    spec = SPECS[LossKind.MULTICLASS_HINGE]
    requests = [
        _request(spec, variant, dtype, FULL_SIZE_CLASSES)
        for dtype in WARM_UP_DTYPES
        for variant in spec.warm_up.variants
    ]
    return [*requests, full_size_request(batching)]


def full_size_request(batching: BatchingConfig) -> pb.ComputeRequest:
    """One float32 Weston-Watkins request as large as the largest batch the batcher forms."""
    row_bytes = FULL_SIZE_CLASSES * 4 + 8  # scores and an int64 target
    rows = max(1, min(batching.max_batch_rows, batching.max_batch_bytes // row_bytes))
    scores = np.linspace(-2, 2, rows * FULL_SIZE_CLASSES, dtype="float32")
    targets = np.arange(rows, dtype="int64") % FULL_SIZE_CLASSES
    inputs = {"scores": scores.reshape(rows, FULL_SIZE_CLASSES), "targets": targets}
    return build_request("multiclass_hinge", inputs, {})[0]
