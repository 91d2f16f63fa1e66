"""Random inputs for every loss, shaped as the SDK and the references take them, or
decoded into the engine's job."""

from __future__ import annotations

from typing import Any

import numpy as np

from hingeloss._requests import OTHER_FIELDS, SCORE_FIELDS


def random_inputs(
    loss: str,
    rng: np.random.Generator,
    rows: int,
    classes: int = 5,
    *,
    fake_rows: int | None = None,
    integer_scores: bool = False,
) -> dict[str, np.ndarray]:
    """Fresh float64 inputs for `loss`; integer scores put many samples exactly on the margin."""

    def scores(shape: tuple[int, ...]) -> np.ndarray:
        if integer_scores:
            return rng.integers(-2, 3, size=shape).astype(np.float64)
        return rng.normal(scale=1.5, size=shape)

    signs = rng.choice(np.array([-1, 1]), size=rows).astype(np.int64)
    if loss == "binary_hinge":
        return {"scores": scores((rows,)), "labels": signs}
    if loss in ("multiclass_hinge", "crammer_singer"):
        return {
            "scores": scores((rows, classes)),
            "targets": rng.integers(0, classes, size=rows).astype(np.int64),
        }
    if loss == "gan_discriminator":
        return {
            "real_scores": scores((rows,)),
            "fake_scores": scores((fake_rows if fake_rows is not None else rows,)),
        }
    if loss == "gan_generator":
        return {"fake_scores": scores((rows,))}
    if loss == "margin_ranking":
        return {"scores_a": scores((rows,)), "scores_b": scores((rows,)), "labels": signs}
    raise ValueError(loss)


def random_job(
    loss: str, rng: np.random.Generator, rows: int, classes: int = 5, **options: Any
) -> Any:
    """`random_inputs` as the server's engine takes them: a decoded LossJob."""
    from hingeloss._requests import build_request
    from hingeloss_server.config import LimitsConfig
    from hingeloss_server.transport.request_codec import decode_request

    request, _ = build_request(loss, random_inputs(loss, rng, rows, classes=classes), options)
    return decode_request(request, LimitsConfig())


def positional(loss: str, inputs: dict[str, Any]) -> list[Any]:
    """The inputs in the SDK's positional order."""
    return [inputs[name] for name in SCORE_FIELDS[loss] + OTHER_FIELDS[loss]]


def sample_count(loss: str, inputs: dict[str, np.ndarray]) -> int:
    first = inputs[SCORE_FIELDS[loss][0]].shape[0]
    if loss == "gan_discriminator":
        return int(first + inputs["fake_scores"].shape[0])
    return int(first)
