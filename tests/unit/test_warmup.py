"""The warm-up requests reach every loss, score dtype and option path before SERVING."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hingeloss_server.config import BatchingConfig, LimitsConfig
from hingeloss_server.engine import fused
from hingeloss_server.engine.jobs import GradientFormat, LossJob, LossKind, Reduction
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.warmup import full_size_request, gpu_warm_up_requests, warm_up_requests

HINGES = {kind for kind in LossKind if kind is not LossKind.GAN_GENERATOR}
SQUARED = {LossKind.BINARY_HINGE, LossKind.MULTICLASS_HINGE, LossKind.CRAMMER_SINGER}


def _jobs() -> list[LossJob]:
    return [decode_request(request, LimitsConfig()) for request in warm_up_requests()]


def test_every_loss_runs_in_every_score_dtype() -> None:
    seen = {(job.key.params.kind, job.key.dtype) for job in _jobs()}
    dtypes = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    assert seen == {(kind, dtype) for kind in LossKind for dtype in dtypes}


def test_every_option_path_runs_in_every_score_dtype() -> None:
    by_dtype: dict[torch.dtype, list[LossJob]] = {}
    for job in _jobs():
        by_dtype.setdefault(job.key.dtype, []).append(job)
    for jobs in by_dtype.values():

        def kinds(
            predicate: Callable[[LossJob], bool], jobs: list[LossJob] = jobs
        ) -> set[LossKind]:
            return {j.key.params.kind for j in jobs if predicate(j)}

        assert kinds(lambda j: j.key.params.power == 2) == SQUARED
        assert kinds(lambda j: j.key.params.kink_one) == HINGES
        assert kinds(lambda j: j.options.gradient_format is GradientFormat.NONE) == set(LossKind)
        assert kinds(lambda j: j.options.gradient_format is GradientFormat.ROW_SPARSE) >= {
            LossKind.BINARY_HINGE,
            LossKind.MULTICLASS_HINGE,
            LossKind.MARGIN_RANKING,
        }
        assert kinds(lambda j: j.options.gradient_format is GradientFormat.FACTORED) == {
            LossKind.MULTICLASS_HINGE,
            LossKind.CRAMMER_SINGER,
        }
        assert LossKind.MULTICLASS_HINGE in kinds(lambda j: j.class_weights is not None)
        assert LossKind.MULTICLASS_HINGE in kinds(lambda j: j.options.ignore_index is not None)
        assert LossKind.MULTICLASS_HINGE in kinds(lambda j: j.key.params.divide_by_num_classes)
        assert LossKind.CRAMMER_SINGER in kinds(lambda j: j.key.params.split_ties)
        assert LossKind.GAN_DISCRIMINATOR in kinds(lambda j: j.options.pooled_mean)
        assert kinds(lambda j: j.options.reduction is Reduction.WEIGHTED_MEAN) >= {
            LossKind.BINARY_HINGE,
            LossKind.GAN_DISCRIMINATOR,
        }
        assert kinds(lambda j: j.options.return_per_sample) >= {
            LossKind.BINARY_HINGE,
            LossKind.MULTICLASS_HINGE,
            LossKind.MARGIN_RANKING,
        }


def test_the_full_size_request_fills_the_largest_batch() -> None:
    batching = BatchingConfig(max_batch_bytes=8 << 20)
    job = decode_request(full_size_request(batching), LimitsConfig())
    assert 0.99 * batching.max_batch_bytes <= job.nbytes <= batching.max_batch_bytes
    few_rows = BatchingConfig(max_batch_rows=100)
    assert decode_request(full_size_request(few_rows), LimitsConfig()).rows == 100


def test_gpu_workers_compile_the_fused_kernel_in_every_dtype_and_option() -> None:
    jobs = [decode_request(r, LimitsConfig()) for r in gpu_warm_up_requests(BatchingConfig())]
    fusable = [
        j
        for j in jobs
        if j.key.params.kind is LossKind.MULTICLASS_HINGE
        and j.key.trailing_shape[0] >= fused.MIN_CLASSES
    ]
    dtypes = {j.key.dtype for j in fusable}
    assert dtypes == {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    paths = {
        (
            j.key.params.power,
            j.key.params.kink_one,
            j.options.ignore_index is not None,
            j.options.gradient_format is GradientFormat.NONE,
        )
        for j in fusable
    }
    assert {
        (1, False, False, False),
        (2, False, False, False),
        (1, True, True, False),
        (1, False, False, True),
        (1, True, False, True),
    } <= paths
