"""Messages passed between the servicer, the batcher and the workers (plain dataclasses)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class LossKind(enum.StrEnum):
    """The losses, named as the request's `loss` oneof fields."""

    BINARY_HINGE = "binary_hinge"
    MULTICLASS_HINGE = "multiclass_hinge"
    CRAMMER_SINGER = "crammer_singer"
    GAN_DISCRIMINATOR = "gan_discriminator"
    GAN_GENERATOR = "gan_generator"
    MARGIN_RANKING = "margin_ranking"


class Reduction(enum.StrEnum):
    MEAN = "mean"
    SUM = "sum"
    NONE = "none"
    WEIGHTED_MEAN = "weighted_mean"


class GradientFormat(enum.StrEnum):
    DENSE = "dense"
    ROW_SPARSE = "row_sparse"
    NONE = "none"
    FACTORED = "factored"

    @property
    def dense(self) -> bool:
        """Whether the job's gradient is read from the dense gradient (whole or rows)."""
        return self in (GradientFormat.DENSE, GradientFormat.ROW_SPARSE)


@dataclass(frozen=True)
class LossParams:
    """Options that must be equal for two requests to share a batch."""

    kind: LossKind
    margin: float = 1.0
    power: int = 1
    kink_one: bool = False
    divide_by_num_classes: bool = False
    split_ties: bool = False
    # Raw bytes of the class weights (float64), so that equal weights compare equal.
    class_weights: bytes | None = None


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys are computed together in one kernel call."""

    params: LossParams
    # The dtype the callers sent, which their answers come back in.
    dtype: torch.dtype
    trailing_shape: tuple[int, ...]


@dataclass(frozen=True)
class RequestOptions:
    """Per-request options that do not affect batching."""

    reduction: Reduction = Reduction.MEAN
    gradient_format: GradientFormat = GradientFormat.DENSE
    return_per_sample: bool = False
    label_zero_one: bool = False
    ignore_index: int | None = None
    pooled_mean: bool = False


@dataclass(eq=False)
class LossJob:
    """One decoded request: structurally valid, data not yet inspected.

    Tensors are zero-copy CPU views of the request's bytes.
    """

    request_id: str
    key: BatchKey
    options: RequestOptions
    # Score inputs in declaration order (e.g. (scores,), (real, fake), (a, b)).
    inputs: tuple[torch.Tensor, ...]
    # Names of the fields of `inputs`, for gradients and error messages.
    input_fields: tuple[str, ...]
    labels: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    class_weights: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    rows: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class WireArray:
    """A tensor ready for the response: its dtype, shape and little-endian bytes.

    `data` views the result tensor's own memory (no copy); it keeps the tensor alive.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    data: memoryview


@dataclass(frozen=True)
class SparseRows:
    """The non-zero rows of a gradient."""

    dense_shape: tuple[int, ...]
    indices: WireArray
    values: WireArray


@dataclass(frozen=True)
class FactoredRows:
    """A power-1 multi-class gradient as a packed mask and row values (hingeloss._factored).

    `mask` is uint8 (rows, ceil(C / 8)); `values` are in the compute dtype; `dtype` is
    the dtype of the dense gradient they stand for.
    """

    dense_shape: tuple[int, ...]
    dtype: torch.dtype
    mask: memoryview
    values: WireArray


@dataclass(frozen=True)
class BatchInfo:
    """Facts about the batch a request was computed in."""

    rows: int
    requests: int
    # From the upload to the answers' arrival on the host (their split per job excluded).
    compute_s: float
    device: str


@dataclass(frozen=True)
class JobResult:
    """The answer to one job."""

    loss: float
    grads: tuple[WireArray | SparseRows | FactoredRows, ...]
    per_sample: tuple[WireArray, ...]
    samples: int
    active: int
    batch: BatchInfo
    # Seconds between arrival in the queue and a worker taking the batch; set on delivery.
    queue_s: float = 0.0
    compute_dtype: torch.dtype = field(default=torch.float32)
    # Keeps the pinned host block that `grads` and `per_sample` view from being reused
    # while this answer is alive (staging.HostLease); None where they own their memory.
    host_lease: object | None = None
