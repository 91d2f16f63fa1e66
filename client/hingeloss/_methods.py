"""The per-loss methods, written once for the sync client, the asyncio client and streams.

Each flavour implements `_submit` and decides what it returns: a LossResult, an
awaitable of one, or a future of one.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

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

    @staticmethod
    def _options(**options: Any) -> dict[str, Any]:
        return {k: v for k, v in options.items() if v is not None}

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
        options = self._options(
            margin=margin, power=power, kink=kink, label_encoding=label_encoding, **common
        )
        return self._submit("binary_hinge", {"scores": scores, "labels": labels}, options)

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
        options = self._options(
            margin=margin,
            power=power,
            kink=kink,
            class_weights=class_weights,
            class_normalization=class_normalization,
            ignore_index=ignore_index,
            **common,
        )
        return self._submit("multiclass_hinge", {"scores": scores, "targets": targets}, options)

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
        options = self._options(
            margin=margin, power=power, kink=kink, tie_break=tie_break, **common
        )
        return self._submit("crammer_singer", {"scores": scores, "targets": targets}, options)

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
        options = self._options(combine=combine, kink=kink, **common)
        inputs = {"real_scores": real_scores, "fake_scores": fake_scores}
        return self._submit("gan_discriminator", inputs, options)

    def gan_generator(self, fake_scores: Any, **common: Any) -> R:
        """-mean(fake)."""
        return self._submit("gan_generator", {"fake_scores": fake_scores}, self._options(**common))

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
        options = self._options(margin=margin, kink=kink, **common)
        inputs = {"scores_a": scores_a, "scores_b": scores_b, "labels": labels}
        return self._submit("margin_ranking", inputs, options)

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
