"""The wire side of each loss: its enum options, how they decode, how they are echoed.

The engine's LossSpec (engine/losses/) declares a loss's inputs as plain data and
knows no protobuf. This table, keyed by the same LossKind, holds one small entry
per loss with what only the wire knows: the loss message's two-valued enum
options (the value that is the default, and the one that sets a flag of
LossParams or RequestOptions), the ResolvedOptions field each is echoed in, and
the decoding of any other option field (Weston-Watkins' class weights and
ignore_index). The request codec decodes every loss with the same code from the
spec and this entry; the response codec echoes from them.

The hinges' margin, power and kink convention are decoded wherever the loss
message has the field, and echoed for every loss whose spec is a hinge.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.engine.jobs import LossJob, LossKind, LossParams

if TYPE_CHECKING:  # tensor_decoder imports, through request_wire, the response codec
    from hingeloss_server.transport.tensor_decoder import TensorDecoder

# Flags that are LossParams fields (they split batches); the rest are RequestOptions.
_PARAM_FLAGS = frozenset(f.name for f in dataclasses.fields(LossParams))


@dataclass(frozen=True)
class Switch:
    """A two-valued enum option: `off` (also what 0 means) or `on`, which sets `flag`.

    Attributes:
        field: The field of the loss's request message.
        flag: The LossParams or RequestOptions field it sets.
        off: The documented default.
        on: The value that sets the flag.
        echo: The ResolvedOptions field it is echoed in; `field` when empty.
    """

    field: str
    flag: str
    off: int
    on: int
    echo: str = ""

    @property
    def splits_batches(self) -> bool:
        """Whether the flag is a batch parameter (decoded before the gradient format)."""
        return self.flag in _PARAM_FLAGS

    def decode(self, message: Any, decoder: TensorDecoder) -> bool:
        value = getattr(message, self.field)
        if value not in (0, self.off, self.on):
            raise InvalidInputError(decoder.field(self.field), f"unknown enum value {value}")
        return bool(value == self.on)

    def resolved(self, job: LossJob) -> int:
        """The value the server applied to a job: the flag's value as the enum."""
        params = job.key.params
        owner = params if self.splits_batches else job.options
        return self.on if getattr(owner, self.flag) else self.off


KINK = Switch("kink_subgradient", "kink_one", pb.KINK_SUBGRADIENT_ZERO, pb.KINK_SUBGRADIENT_ONE)


@dataclass(frozen=True)
class Extras:
    """Options decoded by a loss's own hook: flags, and class weights for the job."""

    params: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    class_weights: torch.Tensor | None = None


NO_EXTRAS = Extras()


@dataclass(frozen=True)
class LossCodec:
    """What the wire adds to a loss's LossSpec.

    Attributes:
        switches: Its two-valued enum options besides the kink convention.
        extras: Decodes its other option fields after its inputs (given the decoder
            and the first score input), before any switch.
    """

    switches: tuple[Switch, ...] = ()
    extras: Callable[[Any, TensorDecoder, torch.Tensor], Extras] | None = None

    @functools.cached_property
    def batch_switches(self) -> tuple[Switch, ...]:
        """The switches that set LossParams flags (decoded before the gradient format)."""
        return tuple(s for s in self.switches if s.splits_batches)

    @functools.cached_property
    def request_switches(self) -> tuple[Switch, ...]:
        """The switches that set RequestOptions flags."""
        return tuple(s for s in self.switches if not s.splits_batches)


def _class_weights_and_ignore_index(
    message: pb.MulticlassHinge, decoder: TensorDecoder, scores: torch.Tensor
) -> Extras:
    """Weston-Watkins: one non-negative weight per true class, and the ignored target."""
    weights = decoder.tensor(
        message.target_class_weights, "target_class_weights", ndim=1, floats=True, required=False
    )
    params, options = {}, {}
    if weights is not None:
        if weights.shape[0] != scores.shape[1]:
            raise InvalidInputError(
                f"{decoder.field('target_class_weights')}.shape",
                f"must have one weight per class ({scores.shape[1]}), got {list(weights.shape)}",
            )
        weights = weights.to(torch.float64)
        # Raw bytes, so that equal weights give equal batch keys.
        params["class_weights"] = weights.numpy().tobytes()
    if message.HasField("ignore_index"):
        options["ignore_index"] = int(message.ignore_index)
    return Extras(params, options, weights)


CODECS: dict[LossKind, LossCodec] = {
    LossKind.BINARY_HINGE: LossCodec(
        switches=(
            Switch(
                "label_encoding",
                "label_zero_one",
                pb.LABEL_ENCODING_PLUS_MINUS_ONE,
                pb.LABEL_ENCODING_ZERO_ONE,
            ),
        )
    ),
    LossKind.MULTICLASS_HINGE: LossCodec(
        switches=(
            Switch(
                "class_normalization",
                "divide_by_num_classes",
                pb.CLASS_NORMALIZATION_SUM_OVER_CLASSES,
                pb.CLASS_NORMALIZATION_DIVIDE_BY_NUM_CLASSES,
            ),
        ),
        extras=_class_weights_and_ignore_index,
    ),
    LossKind.CRAMMER_SINGER: LossCodec(
        switches=(
            Switch("tie_break", "split_ties", pb.TIE_BREAK_FIRST_INDEX, pb.TIE_BREAK_SPLIT_EVENLY),
        )
    ),
    LossKind.GAN_DISCRIMINATOR: LossCodec(
        switches=(
            Switch(
                "combine",
                "pooled_mean",
                pb.GAN_COMBINE_SUM_OF_MEANS,
                pb.GAN_COMBINE_POOLED_MEAN,
                echo="gan_combine",
            ),
        )
    ),
    LossKind.GAN_GENERATOR: LossCodec(),
    LossKind.MARGIN_RANKING: LossCodec(),
}
assert set(CODECS) == set(LossKind), "every loss needs a codec entry"
