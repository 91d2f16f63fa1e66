"""The per-loss methods, written once for the sync client, the asyncio client and streams.

Each flavour implements `_submit` and decides what it returns: a LossResult, an
awaitable of one, or a future of one. The methods are the typed, documented public
API; each hands its inputs, in the contract's order, to `_submit_inputs`, which names them
from the proto (requests.SCORE_FIELDS and OTHER_FIELDS).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from hingeloss._requests import OTHER_FIELDS, SCORE_FIELDS

R = TypeVar("R")

_COMMON_DOC = """
        Common keyword options: reduction ("mean" | "sum" | "none" |
        "weighted_mean"), sample_weights, gradient_format ("dense" |
        "row_sparse" | "none" | "factored": multi-class losses at power 1),
        return_per_sample, request_id, timeout (seconds).
"""


class LossMethods(Generic[R]):
    """One method per loss; every option of the contract is a keyword argument."""

    def _submit(self, loss: str, inputs: dict[str, Any], options: dict[str, Any]) -> R:
        raise NotImplementedError

    def _submit_inputs(self, loss: str, inputs: tuple[Any, ...], **options: Any) -> R:
        """Submits `inputs` (in the contract's order) with the options that were given."""
        fields = SCORE_FIELDS[loss] + OTHER_FIELDS[loss]
        given = {k: v for k, v in options.items() if v is not None}
        return self._submit(loss, dict(zip(fields, inputs, strict=True)), given)

    def binary_hinge(
        self,
        scores: Any,
        labels: Any,
        *,
        margin: float | None = None,
        power: int | None = None,
        kink: str | int | None = None,
        label_encoding: str | int | None = None,
        **common: Any,
    ) -> R:
        """max(0, margin - y f)^power with y in {-1, +1} (or {0, 1} by label_encoding)."""
        return self._submit_inputs(
            "binary_hinge",
            (scores, labels),
            margin=margin,
            power=power,
            kink=kink,
            label_encoding=label_encoding,
            **common,
        )

    def multiclass_hinge(
        self,
        scores: Any,
        targets: Any,
        *,
        margin: float | None = None,
        power: int | None = None,
        kink: str | int | None = None,
        class_weights: Any = None,
        class_normalization: str | int | None = None,
        ignore_index: int | None = None,
        **common: Any,
    ) -> R:
        """Weston-Watkins; class_normalization="divide_by_num_classes" is F.multi_margin_loss."""
        return self._submit_inputs(
            "multiclass_hinge",
            (scores, targets),
            margin=margin,
            power=power,
            kink=kink,
            class_weights=class_weights,
            class_normalization=class_normalization,
            ignore_index=ignore_index,
            **common,
        )

    def crammer_singer(
        self,
        scores: Any,
        targets: Any,
        *,
        margin: float | None = None,
        power: int | None = None,
        kink: str | int | None = None,
        tie_break: str | int | None = None,
        **common: Any,
    ) -> R:
        """max(0, margin - (f_y - max_{j != y} f_j))^power."""
        return self._submit_inputs(
            "crammer_singer",
            (scores, targets),
            margin=margin,
            power=power,
            kink=kink,
            tie_break=tie_break,
            **common,
        )

    def gan_discriminator(
        self,
        real_scores: Any,
        fake_scores: Any,
        *,
        combine: str | int | None = None,
        kink: str | int | None = None,
        **common: Any,
    ) -> R:
        """mean(relu(1 - real)) + mean(relu(1 + fake)); grads for both inputs."""
        return self._submit_inputs(
            "gan_discriminator", (real_scores, fake_scores), combine=combine, kink=kink, **common
        )

    def gan_generator(self, fake_scores: Any, **common: Any) -> R:
        """-mean(fake)."""
        return self._submit_inputs("gan_generator", (fake_scores,), **common)

    def margin_ranking(
        self,
        scores_a: Any,
        scores_b: Any,
        labels: Any,
        *,
        margin: float | None = None,
        kink: str | int | None = None,
        **common: Any,
    ) -> R:
        """max(0, margin - y (a - b)); margin defaults to 1 (torch: 0)."""
        return self._submit_inputs(
            "margin_ranking", (scores_a, scores_b, labels), margin=margin, kink=kink, **common
        )

    def compute(self, loss: str, *inputs: Any, **options: Any) -> R:
        """Any loss by name, inputs positionally in the contract's order."""
        method = getattr(self, loss, None)
        if loss.startswith("_") or method is None or loss == "compute":
            raise ValueError(f"unknown loss {loss!r}")
        result: R = method(*inputs, **options)
        return result


for _method in (
    LossMethods.binary_hinge,
    LossMethods.multiclass_hinge,
    LossMethods.crammer_singer,
    LossMethods.gan_discriminator,
    LossMethods.gan_generator,
    LossMethods.margin_ranking,
):
    _method.__doc__ = (_method.__doc__ or "") + "\n" + _COMMON_DOC
