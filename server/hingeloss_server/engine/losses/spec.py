"""LossSpec: one loss declared once, as plain data and torch hooks the engine iterates over.

A loss module (binary.py, weston_watkins.py, ...) holds its closed-form kernel and
one LossSpec: its inputs (names, sample sets, dimensions, dtype rules), what its
options change (kink, margin and power of a hinge, factored gradients, how MEAN
combines sample sets), the kernel adapter, the margins it reports for the metric,
its fused kernel where one exists, and its warm-up requests. Validation, compute,
answers and warm-up read the spec instead of branching per loss.

Nothing here knows the wire. The transport layer (transport/loss_codecs.py) reads
the declared input names and dtype rules to decode a request message, and keeps
per loss the proto enums of its options and how they are echoed as resolved.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hingeloss_server.engine.fused import FusedOutput
from hingeloss_server.engine.jobs import LossKind, LossParams
from hingeloss_server.engine.losses.common import LossOutput


class Aux(enum.StrEnum):
    """A non-differentiable input beside the scores, named as its request field.

    It has the rows of the first score input. LABELS take any integer or float
    dtype (the values are checked later: +-1, or 0/1); TARGETS are int32 or int64
    class indices.
    """

    LABELS = "labels"
    TARGETS = "targets"


@dataclass(frozen=True)
class ScoreInput:
    """A differentiable input: its request field, sample set and dimensions.

    Inputs of one sample set share their rows (margin ranking's scores_b has the
    samples of scores_a); each set of a loss with several (the GAN discriminator's
    real and fake) has rows of its own. A 2-D input is (rows, classes), classes >= 2.
    All score inputs of a loss share one float dtype.
    """

    name: str
    sample_set: int = 0
    ndim: int = 1


@dataclass(frozen=True)
class DeviceBatch:
    """A batch's inputs as uploaded: scores in the wire dtype, the rest ready for kernels."""

    params: LossParams
    # The compute dtype, and the wire dtype the callers sent.
    dtype: torch.dtype
    wire: torch.dtype
    inputs: tuple[Tensor, ...]
    scales: tuple[Tensor, ...]
    # +-1 as int8.
    labels: Tensor | None
    targets: Tensor | None
    ignore_mask: Tensor | None
    class_weights: Tensor | None
    # Some job reads the dense gradient (DENSE, ROW_SPARSE); some reads it factored.
    need_grad: bool
    need_factors: bool
    host_reads_free: bool


@dataclass(frozen=True)
class KernelBatch:
    """What an eager kernel adapter takes: scores and labels in the compute dtype."""

    params: LossParams
    inputs: tuple[Tensor, ...]
    labels: Tensor | None
    targets: Tensor | None
    ignore_mask: Tensor | None
    class_weights: Tensor | None
    scales: tuple[Tensor, ...]
    need_grad: bool
    need_factors: bool


@dataclass(frozen=True)
class FusedKernel:
    """A Triton kernel (fused.py) that serves the loss on CUDA.

    `run` takes the uploaded batch and the margin as a one-element device tensor.
    Inputs of fewer than `min_classes` columns stay with the eager kernel.
    """

    run: Callable[[DeviceBatch, Tensor], FusedOutput]
    min_classes: int = 0


# Warm-up scores of a shape, linearly spaced in [-2, 2] in the warm-up dtype.
ScoresFactory = Callable[..., Any]


@dataclass(frozen=True)
class WarmUp:
    """The requests each worker runs before SERVING (warmup.py builds them).

    `inputs(scores, rows, classes)` gives small inputs by field name, with rows on
    both sides of the margin and exactly on it; `variants` are the SDK's keyword
    options of every code path ({} is the default). warmup.py fills placeholders:
    class_weights="weights", and ignore_index and label_encoding="zero_one" rewrite
    the targets and labels.
    """

    inputs: Callable[[ScoresFactory, int, int], dict[str, Any]]
    variants: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class LossSpec:
    """Everything the engine knows about one loss.

    Attributes:
        kind: The loss.
        scores: Differentiable inputs in declaration order: gradients come back in it.
        aux: Non-differentiable inputs, after the scores in the SDK's positional order.
        kernel: Runs the eager kernel on a batch.
        margins: Signed margins (positive: on the right side) of the first rows of a
            batch, for the margin histogram.
        warm_up: The requests that reach its code paths before SERVING.
        hinge: It has a kink, a margin and a power (echoed as resolved options).
        factorable: Its power-1 gradient may travel factored (GRADIENT_FORMAT_FACTORED).
        sums_set_means: Under MEAN each sample set is averaged on its own and the means
            summed, unless the request pools them (pooled_mean).
        samples_text: What the rows of all sample sets are called in errors.
        fused: Its Triton kernel, or None.
    """

    kind: LossKind
    scores: tuple[ScoreInput, ...]
    aux: tuple[Aux, ...]
    kernel: Callable[[KernelBatch], LossOutput]
    margins: Callable[[KernelBatch, int], Tensor]
    warm_up: WarmUp
    hinge: bool = True
    factorable: bool = False
    sums_set_means: bool = False
    samples_text: str = "samples"
    fused: FusedKernel | None = None

    # Derived once (cached_property): the request codec reads them for every request.
    @functools.cached_property
    def input_fields(self) -> tuple[str, ...]:
        """Names of the score inputs, for gradients and error messages."""
        return tuple(s.name for s in self.scores)

    @functools.cached_property
    def input_sets(self) -> tuple[int, ...]:
        """The sample set of each score input, in declaration order."""
        return tuple(s.sample_set for s in self.scores)

    @functools.cached_property
    def set_count(self) -> int:
        return max(self.input_sets) + 1

    @functools.cached_property
    def set_heads(self) -> tuple[int, ...]:
        """The index of each sample set's first score input, whose rows are the set's samples."""
        return tuple(self.input_sets.index(s) for s in range(self.set_count))

    @functools.cached_property
    def set_fields(self) -> tuple[str, ...]:
        """The name of each sample set's first score input."""
        return tuple(self.scores[k].name for k in self.set_heads)

    def set_rows(self, inputs: tuple[Tensor, ...]) -> list[int]:
        """Rows of each sample set of a job's score inputs."""
        return [int(inputs[k].shape[0]) for k in self.set_heads]


def signs(rows: int) -> np.ndarray[Any, Any]:
    """+1, -1, +1, ... as int64: warm-up labels."""
    return np.array([1, -1] * (rows // 2), dtype="int64")


def class_targets(rows: int, classes: int) -> np.ndarray[Any, Any]:
    """0, 1, ..., classes - 1, 0, ... as int64: warm-up targets."""
    return np.arange(rows, dtype="int64") % classes


def head(tensor: Tensor | None, rows: int) -> Tensor:
    """The first rows of an input a loss declares (labels, targets)."""
    assert tensor is not None  # guaranteed by the spec's declared inputs
    return tensor[:rows]


def present(tensor: Tensor | None) -> Tensor:
    """An input a loss declares, which validation has made present."""
    assert tensor is not None  # guaranteed by the spec's declared inputs
    return tensor
