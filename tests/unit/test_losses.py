"""The closed-form loss kernels against torch autograd and the float64 numpy references."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from helpers.references import (
    DEFAULT_OPTIONS,
    LOSS_NAMES,
    SAMPLE_SETS,
    SCORE_INPUTS,
    ReferenceResult,
    reference,
    row_scales,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from hingeloss_server.engine import losses
from hingeloss_server.engine.losses import LossOutput

REDUCTIONS = ("mean", "sum", "none", "weighted_mean")
IGNORE_INDEX = -100
F64 = {"rtol": 1e-10, "atol": 1e-12}

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# -------------------------------- inputs


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh randomness every run; HINGELOSS_TEST_SEED replays a failure."""
    seed = int(os.environ.get("HINGELOSS_TEST_SEED", secrets.randbits(32)))
    print(f"HINGELOSS_TEST_SEED={seed}")  # pytest shows it when the test fails
    return np.random.default_rng(seed)


def draw_scores(rng: np.random.Generator, shape: tuple[int, ...], style: str) -> np.ndarray:
    """Scores of one of three kinds.

    "grid": half-integers in [-2, 2], exact in every float type, so that ties and
    hinge arguments of exactly 0 are common; "random": continuous; "large": ~1e6.
    """
    if style == "grid":
        return rng.integers(-4, 5, size=shape) / 2.0
    if style == "random":
        return rng.normal(0.0, 1.5, size=shape)
    if style == "large":
        return rng.normal(0.0, 1e6, size=shape)
    raise ValueError(style)


def draw_margin(rng: np.random.Generator, style: str) -> float:
    # Grid margins keep z on the grid, so z == 0 happens for both kink conventions.
    if style == "grid":
        return float(rng.choice([1.0, 0.5, 2.0]))
    return float(rng.uniform(0.1, 3.0))


def draw_weights(rng: np.random.Generator, n: int) -> np.ndarray:
    w = rng.uniform(0.0, 2.0, size=n)
    if n > 2:
        w[rng.integers(n)] = 0.0  # a zero weight must not disturb anything
    return w


def make_case(
    loss_name: str,
    rng: np.random.Generator,
    style: str,
    *,
    n: int = 24,
    c: int = 7,
    n_fake: int | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Random inputs for loss_name, and its options with a margin and sample weights drawn."""
    opt = dict(options or {})
    inputs: dict[str, np.ndarray] = {}
    if loss_name == "binary_hinge":
        inputs["scores"] = draw_scores(rng, (n,), style)
        low = 0 if opt.get("label_encoding") == "zero_one" else -1
        inputs["labels"] = rng.choice([low, 1], size=n).astype(np.float64)
    elif loss_name in ("multiclass_hinge", "crammer_singer"):
        inputs["scores"] = draw_scores(rng, (n, c), style)
        targets = rng.integers(0, c, size=n)
        if opt.get("ignore_index") is not None and n > 1:
            ignored = rng.random(n) < 0.3
            ignored[rng.integers(n)] = False  # never every row
            targets[ignored] = opt["ignore_index"]
        inputs["targets"] = targets
    elif loss_name == "gan_discriminator":
        inputs["real_scores"] = draw_scores(rng, (n,), style)
        inputs["fake_scores"] = draw_scores(rng, (n if n_fake is None else n_fake,), style)
    elif loss_name == "gan_generator":
        inputs["fake_scores"] = draw_scores(rng, (n,), style)
    elif loss_name == "margin_ranking":
        inputs["scores_a"] = draw_scores(rng, (n,), style)
        inputs["scores_b"] = draw_scores(rng, (n,), style)
        inputs["labels"] = rng.choice([-1.0, 1.0], size=n)
    else:
        raise ValueError(loss_name)
    if loss_name in ("binary_hinge", "multiclass_hinge", "crammer_singer", "margin_ranking"):
        opt.setdefault("margin", draw_margin(rng, style))
    if opt.get("reduction") == "weighted_mean":
        total = sum(inputs[name].shape[0] for name in SAMPLE_SETS[loss_name])
        opt.setdefault("sample_weights", draw_weights(rng, total))
    return inputs, opt


# -------------------------------- the kernels, called like the server


def prepare_kernel(
    loss_name: str,
    inputs: dict[str, np.ndarray],
    options: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    input_dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], Callable[[bool], LossOutput]]:
    """Puts the arguments on the device as the server does; returns the row scales and a call.

    input_dtype: the dtype the scores arrive in (e.g. float16), up-cast to dtype.
    """
    opt = {**DEFAULT_OPTIONS, **options}
    scales = [
        torch.as_tensor(s, dtype=dtype, device=device) for s in row_scales(loss_name, inputs, opt)
    ]

    def score(name: str) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(inputs[name], dtype=np.float64))
        if input_dtype is not None:
            t = t.to(input_dtype)
        return t.to(device=device, dtype=dtype)

    def labels() -> torch.Tensor:
        y = np.asarray(inputs["labels"], dtype=np.float64)
        if opt["label_encoding"] == "zero_one":
            y = 2.0 * y - 1.0
        return torch.as_tensor(y, dtype=dtype, device=device)

    kink_one = opt["kink"] == "one"
    if loss_name == "binary_hinge":
        scores, y = score("scores"), labels()
        return scales, lambda need_grad: losses.binary_hinge(
            scores,
            y,
            margin=opt["margin"],
            power=opt["power"],
            kink_one=kink_one,
            row_scale=scales[0],
            need_grad=need_grad,
        )
    if loss_name == "multiclass_hinge":
        scores = score("scores")
        targets = torch.as_tensor(inputs["targets"], dtype=torch.int64, device=device)
        ignore_mask = None
        if opt["ignore_index"] is not None:
            ignore_mask = targets == opt["ignore_index"]
            targets = targets.masked_fill(ignore_mask, 0)
        weights = None
        if opt["class_weights"] is not None:
            weights = torch.as_tensor(opt["class_weights"], dtype=dtype, device=device)
        divide = opt["class_normalization"] == "divide_by_num_classes"
        return scales, lambda need_grad: losses.multiclass_hinge(
            scores,
            targets,
            margin=opt["margin"],
            power=opt["power"],
            kink_one=kink_one,
            class_weights=weights,
            divide_by_num_classes=divide,
            row_scale=scales[0],
            ignore_mask=ignore_mask,
            need_grad=need_grad,
        )
    if loss_name == "crammer_singer":
        scores = score("scores")
        targets = torch.as_tensor(inputs["targets"], dtype=torch.int64, device=device)
        split = opt["tie_break"] == "split_evenly"
        return scales, lambda need_grad: losses.crammer_singer(
            scores,
            targets,
            margin=opt["margin"],
            power=opt["power"],
            kink_one=kink_one,
            split_ties=split,
            row_scale=scales[0],
            need_grad=need_grad,
        )
    if loss_name == "gan_discriminator":
        real, fake = score("real_scores"), score("fake_scores")
        return scales, lambda need_grad: losses.gan_discriminator(
            real,
            fake,
            kink_one=kink_one,
            real_scale=scales[0],
            fake_scale=scales[1],
            need_grad=need_grad,
        )
    if loss_name == "gan_generator":
        fake = score("fake_scores")
        return scales, lambda need_grad: losses.gan_generator(
            fake, row_scale=scales[0], need_grad=need_grad
        )
    if loss_name == "margin_ranking":
        a, b, y = score("scores_a"), score("scores_b"), labels()
        return scales, lambda need_grad: losses.margin_ranking(
            a,
            b,
            y,
            margin=opt["margin"],
            kink_one=kink_one,
            row_scale=scales[0],
            need_grad=need_grad,
        )
    raise ValueError(loss_name)


def reduced(scales: list[torch.Tensor], out: LossOutput) -> float:
    """The request's loss as the server forms it: sum over sets and rows of r_i * l_i."""
    return sum(
        float((s.double() * p.double()).sum()) for s, p in zip(scales, out.per_sample, strict=True)
    )


def call_kernel(
    loss_name: str,
    inputs: dict[str, np.ndarray],
    options: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    need_grad: bool = True,
    input_dtype: torch.dtype | None = None,
) -> tuple[float, LossOutput]:
    """Runs the kernel as the server does; returns the reduced loss (float64) and the output."""
    scales, run = prepare_kernel(
        loss_name, inputs, options, dtype=dtype, device=device, input_dtype=input_dtype
    )
    out = run(need_grad)
    return reduced(scales, out), out


# -------------------------------- torch autograd composites


def _hinge(z: torch.Tensor, power: int, kink: str) -> torch.Tensor:
    # relu's backward is 0 at 0 (kink ZERO); clamp_min's is 1 there (kink ONE).
    base = torch.clamp_min(z, 0.0) if kink == "one" else torch.relu(z)
    return base**power


def autograd_composite(
    loss_name: str, inputs: dict[str, np.ndarray], options: dict[str, Any]
) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """The loss as a composite of torch ops, differentiated by autograd (float64)."""
    opt = {**DEFAULT_OPTIONS, **options}
    leaves = {
        name: torch.tensor(np.asarray(inputs[name], dtype=np.float64), requires_grad=True)
        for name in SCORE_INPUTS[loss_name]
    }
    power, kink, margin = opt["power"], opt["kink"], opt["margin"]
    counted: list[torch.Tensor] | None = None
    if loss_name in ("binary_hinge", "margin_ranking"):
        y = torch.tensor(np.asarray(inputs["labels"], dtype=np.float64))
        if opt["label_encoding"] == "zero_one" and loss_name == "binary_hinge":
            y = 2 * y - 1
        if loss_name == "binary_hinge":
            per = [_hinge(margin - y * leaves["scores"], power, kink)]
        else:
            per = [_hinge(margin - y * (leaves["scores_a"] - leaves["scores_b"]), 1, kink)]
    elif loss_name == "multiclass_hinge":
        f = leaves["scores"]
        t = torch.tensor(inputs["targets"], dtype=torch.int64)
        keep = torch.ones_like(t, dtype=torch.bool)
        if opt["ignore_index"] is not None:
            keep = t != opt["ignore_index"]
            t = torch.where(keep, t, 0)
        z = margin - f.gather(1, t[:, None]) + f
        others = torch.ones_like(f).scatter(1, t[:, None], 0.0)
        row = (_hinge(z, power, kink) * others).sum(1)
        if opt["class_weights"] is not None:
            row = row * torch.tensor(opt["class_weights"], dtype=torch.float64)[t]
        if opt["class_normalization"] == "divide_by_num_classes":
            row = row / f.shape[1]
        per = [torch.where(keep, row, 0.0)]
        counted = [keep]
    elif loss_name == "crammer_singer":
        f = leaves["scores"]
        t = torch.tensor(inputs["targets"], dtype=torch.int64)
        masked = f.masked_fill(F.one_hot(t, f.shape[1]).bool(), float("-inf"))
        # max(dim)'s backward goes to the index it returns (the first); amax's is shared.
        best = masked.max(1).values if opt["tie_break"] == "first_index" else masked.amax(1)
        per = [_hinge(margin - (f.gather(1, t[:, None]).squeeze(1) - best), power, kink)]
    elif loss_name == "gan_discriminator":
        per = [
            _hinge(1 - leaves["real_scores"], 1, kink),
            _hinge(1 + leaves["fake_scores"], 1, kink),
        ]
    elif loss_name == "gan_generator":
        per = [-leaves["fake_scores"]]
    else:
        raise ValueError(loss_name)
    if counted is None:
        counted = [torch.ones(p.shape[0], dtype=torch.bool) for p in per]

    reduction = opt["reduction"]
    if reduction in ("sum", "none"):
        loss = sum((p[k].sum() for p, k in zip(per, counted, strict=True)), torch.zeros(()))
    elif reduction == "mean":
        if loss_name == "gan_discriminator" and opt["combine"] == "sum_of_means":
            loss = per[0].mean() + per[1].mean()
        else:
            loss = torch.cat([p[k] for p, k in zip(per, counted, strict=True)]).mean()
    else:
        w = torch.tensor(opt["sample_weights"], dtype=torch.float64) * torch.cat(counted)
        loss = (w * torch.cat(per)).sum() / w.sum()
    loss.backward()  # type: ignore[no-untyped-call]
    grads = [leaf.grad for leaf in leaves.values()]
    assert all(g is not None for g in grads)
    return float(loss.detach()), [p.detach() for p in per], [g for g in grads if g is not None]


# -------------------------------- comparisons


def close(actual: torch.Tensor | float, expected: Any, *, rtol: float, atol: float) -> None:
    if isinstance(actual, float):
        actual = torch.tensor(actual, dtype=torch.float64)  # a Python float is float64
    actual_t = actual.detach().cpu().double()
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual_t, expected_t, rtol=rtol, atol=atol)


def assert_reference(total: float, out: LossOutput, ref: ReferenceResult) -> None:
    close(total, ref.loss, **F64)
    assert len(out.per_sample) == len(ref.per_sample)
    for got, want in zip(out.per_sample, ref.per_sample, strict=True):
        close(got, want, **F64)
    assert len(out.grads) == len(ref.grads)
    for got, want in zip(out.grads, ref.grads, strict=True):
        close(got, want, **F64)
    for got, want in zip(out.active, ref.active, strict=True):
        assert got.dtype == torch.bool
        np.testing.assert_array_equal(got.cpu().numpy(), want)
        assert int(got.sum()) == int(want.sum())


def check_case(
    loss_name: str,
    inputs: dict[str, np.ndarray],
    options: dict[str, Any],
    *,
    exact_in_float32: bool,
) -> None:
    """Kernel == reference == autograd in float64; need_grad=False; float32 vs float64."""
    ref = reference(loss_name, inputs, options)
    total, out = call_kernel(loss_name, inputs, options)
    assert_reference(total, out, ref)
    for tensor in (*out.per_sample, *out.grads):
        assert tensor.dtype == torch.float64
    for got, name in zip(out.grads, SCORE_INPUTS[loss_name], strict=True):
        assert got.shape == inputs[name].shape

    ag_loss, ag_per, ag_grads = autograd_composite(loss_name, inputs, options)
    close(total, ag_loss, **F64)
    for got, want in zip(out.per_sample, ag_per, strict=True):
        close(got, want, **F64)
    for got, want in zip(out.grads, ag_grads, strict=True):
        close(got, want, **F64)

    total_ng, out_ng = call_kernel(loss_name, inputs, options, need_grad=False)
    assert out_ng.grads == ()
    assert total_ng == total
    for a, b in zip(out_ng.per_sample, out.per_sample, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(out_ng.active, out.active, strict=True):
        assert torch.equal(a, b)

    total32, out32 = call_kernel(loss_name, inputs, options, dtype=torch.float32)
    scale = 1.0 + max(float(np.abs(inputs[name]).max()) for name in SCORE_INPUTS[loss_name])
    for tensor in (*out32.per_sample, *out32.grads):
        assert tensor.dtype == torch.float32
    if exact_in_float32:
        # Same hinge arguments bit for bit: only the sums round differently.
        close(total32, total, rtol=1e-5, atol=1e-6 * scale)
        for got, want in zip(out32.per_sample, out.per_sample, strict=True):
            close(got, want, rtol=1e-5, atol=1e-6 * scale)
        for got, want in zip(out32.grads, out.grads, strict=True):
            close(got, want, rtol=1e-5, atol=1e-7)
        for got, want in zip(out32.active, out.active, strict=True):
            assert torch.equal(got, want)
    else:
        # Rounded scores move each hinge argument by ~1e-7 * scale; the losses are
        # continuous in them (the gradients are not, at the kinks).
        width = inputs["scores"].shape[1] if inputs.get("scores", np.zeros(1)).ndim == 2 else 1
        atol = 1e-6 * scale * width * scale ** (options.get("power", 1) - 1)
        for got, want in zip(out32.per_sample, out.per_sample, strict=True):
            close(got, want, rtol=1e-5, atol=atol)


def option_cases(
    loss_name: str, rng: np.random.Generator, base: dict[str, Any], **shape: int
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any], str]]:
    """Every reduction crossed with every kind of scores."""
    for reduction in REDUCTIONS:
        for style in ("grid", "random", "large"):
            inputs, opt = make_case(
                loss_name, rng, style, options={**base, "reduction": reduction}, **shape
            )
            yield inputs, opt, style


# -------------------------------- every loss and option


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("kink", ["zero", "one"])
@pytest.mark.parametrize("label_encoding", ["plus_minus_one", "zero_one"])
def test_binary_hinge(rng: np.random.Generator, power: int, kink: str, label_encoding: str) -> None:
    base = {"power": power, "kink": kink, "label_encoding": label_encoding}
    for inputs, opt, style in option_cases("binary_hinge", rng, base, n=40):
        check_case("binary_hinge", inputs, opt, exact_in_float32=style == "grid")


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("kink", ["zero", "one"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("normalization", ["sum_over_classes", "divide_by_num_classes"])
@pytest.mark.parametrize("ignore_index", [None, IGNORE_INDEX])
def test_multiclass_hinge(
    rng: np.random.Generator,
    power: int,
    kink: str,
    weighted: bool,
    normalization: str,
    ignore_index: int | None,
) -> None:
    c = int(rng.integers(2, 9))
    base: dict[str, Any] = {
        "power": power,
        "kink": kink,
        "class_normalization": normalization,
        "ignore_index": ignore_index,
    }
    if weighted:
        base["class_weights"] = draw_weights(rng, c)
    for inputs, opt, style in option_cases("multiclass_hinge", rng, base, n=20, c=c):
        check_case("multiclass_hinge", inputs, opt, exact_in_float32=style == "grid")


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("kink", ["zero", "one"])
@pytest.mark.parametrize("tie_break", ["first_index", "split_evenly"])
def test_crammer_singer(rng: np.random.Generator, power: int, kink: str, tie_break: str) -> None:
    base = {"power": power, "kink": kink, "tie_break": tie_break}
    for inputs, opt, style in option_cases("crammer_singer", rng, base, n=30, c=6):
        check_case("crammer_singer", inputs, opt, exact_in_float32=style == "grid")


@pytest.mark.parametrize("kink", ["zero", "one"])
@pytest.mark.parametrize("combine", ["sum_of_means", "pooled_mean"])
@pytest.mark.parametrize(("n_real", "n_fake"), [(3, 64), (16, 16), (1, 2)])
def test_gan_discriminator(
    rng: np.random.Generator, kink: str, combine: str, n_real: int, n_fake: int
) -> None:
    base = {"kink": kink, "combine": combine}
    for inputs, opt, style in option_cases("gan_discriminator", rng, base, n=n_real, n_fake=n_fake):
        check_case("gan_discriminator", inputs, opt, exact_in_float32=style == "grid")


def test_gan_generator(rng: np.random.Generator) -> None:
    for inputs, opt, style in option_cases("gan_generator", rng, {}, n=33):
        check_case("gan_generator", inputs, opt, exact_in_float32=style == "grid")
        _, out = call_kernel("gan_generator", inputs, opt)
        assert bool(out.active[0].all())


@pytest.mark.parametrize("kink", ["zero", "one"])
def test_margin_ranking(rng: np.random.Generator, kink: str) -> None:
    for inputs, opt, style in option_cases("margin_ranking", rng, {"kink": kink}, n=40):
        check_case("margin_ranking", inputs, opt, exact_in_float32=style == "grid")


# -------------------------------- torch's own functions


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("style", ["grid", "random"])
def test_multi_margin_loss_is_divide_by_num_classes(
    rng: np.random.Generator, power: int, weighted: bool, reduction: str, style: str
) -> None:
    """F.multi_margin_loss == DIVIDE_BY_NUM_CLASSES with kink ZERO (torch eager: z > 0)."""
    c = 5
    inputs, opt = make_case("multiclass_hinge", rng, style, n=32, c=c)
    opt.update(
        power=power, kink="zero", class_normalization="divide_by_num_classes", reduction=reduction
    )
    weight = None
    if weighted:
        opt["class_weights"] = draw_weights(rng, c)
        weight = torch.tensor(opt["class_weights"])
    scores = torch.tensor(inputs["scores"], requires_grad=True)
    torch_loss = F.multi_margin_loss(
        scores,
        torch.tensor(inputs["targets"]),
        p=power,
        margin=opt["margin"],
        weight=weight,
        reduction=reduction,
    )
    torch_loss.sum().backward()  # type: ignore[no-untyped-call]
    total, out = call_kernel("multiclass_hinge", inputs, opt)
    if reduction == "none":
        close(out.per_sample[0], torch_loss.detach(), **F64)
    else:
        close(total, torch_loss.detach(), **F64)
    assert scores.grad is not None
    close(out.grads[0], scores.grad, **F64)


@pytest.mark.parametrize("margin", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_margin_ranking_loss_is_kink_one(
    rng: np.random.Generator, margin: float, reduction: str
) -> None:
    """F.margin_ranking_loss (a clamp_min composite) is our margin ranking with kink ONE."""
    inputs, opt = make_case(
        "margin_ranking", rng, "grid", n=64, options={"margin": margin, "reduction": reduction}
    )
    a = torch.tensor(inputs["scores_a"], requires_grad=True)
    b = torch.tensor(inputs["scores_b"], requires_grad=True)
    torch_loss = F.margin_ranking_loss(
        a, b, torch.tensor(inputs["labels"]), margin=margin, reduction=reduction
    )
    torch_loss.sum().backward()  # type: ignore[no-untyped-call]
    assert a.grad is not None
    assert b.grad is not None
    total_one, out_one = call_kernel("margin_ranking", inputs, {**opt, "kink": "one"})
    if reduction == "none":
        close(out_one.per_sample[0], torch_loss.detach(), **F64)
    else:
        close(total_one, torch_loss.detach(), **F64)
    close(out_one.grads[0], a.grad, **F64)
    close(out_one.grads[1], b.grad, **F64)
    # Where some z == 0 exactly, our default kink ZERO differs from torch.
    z = margin - inputs["labels"] * (inputs["scores_a"] - inputs["scores_b"])
    _, out_zero = call_kernel("margin_ranking", inputs, {**opt, "kink": "zero"})
    on_kink = torch.as_tensor(z == 0)
    assert torch.equal(out_zero.grads[0] != a.grad, on_kink)


# -------------------------------- documented conventions


def test_gan_combine_differs_when_set_sizes_differ() -> None:
    """LOSSES.md: N_r = 3, N_f = 64 gives 2.89 (SUM_OF_MEANS) vs 1.30 (POOLED_MEAN)."""
    inputs = {"real_scores": np.full(3, -0.6), "fake_scores": np.full(64, 0.29)}
    sum_of_means, _ = call_kernel("gan_discriminator", inputs, {"combine": "sum_of_means"})
    pooled, out = call_kernel("gan_discriminator", inputs, {"combine": "pooled_mean"})
    assert round(sum_of_means, 2) == 2.89
    assert round(pooled, 2) == 1.30
    close(out.grads[0], np.full(3, -1 / 67), **F64)
    close(out.grads[1], np.full(64, 1 / 67), **F64)


def test_gan_pooled_mean_is_half_when_sizes_match(rng: np.random.Generator) -> None:
    inputs, _ = make_case("gan_discriminator", rng, "random", n=16, n_fake=16)
    sum_of_means, _ = call_kernel("gan_discriminator", inputs, {"combine": "sum_of_means"})
    pooled, _ = call_kernel("gan_discriminator", inputs, {"combine": "pooled_mean"})
    close(pooled, sum_of_means / 2, **F64)


def test_kink_conventions_on_the_margin() -> None:
    """z == 0: loss 0; ZERO gives no gradient and an inactive sample, ONE the reverse."""
    row = {"reduction": "sum"}
    cases: list[tuple[str, dict[str, np.ndarray], dict[str, Any], Callable[[LossOutput], float]]]
    cases = [
        (
            "binary_hinge",
            {"scores": np.array([1.0]), "labels": np.array([1.0])},
            {},
            lambda o: float(o.grads[0][0]),
        ),
        (
            "margin_ranking",
            {"scores_a": np.array([2.0]), "scores_b": np.array([1.0]), "labels": np.array([1.0])},
            {},
            lambda o: float(o.grads[0][0]),
        ),
        (
            "multiclass_hinge",
            {"scores": np.array([[3.0, 2.0, -5.0]]), "targets": np.array([0])},
            {},
            lambda o: float(o.grads[0][0, 1]),
        ),
        (
            "crammer_singer",
            {"scores": np.array([[3.0, 2.0, -5.0]]), "targets": np.array([0])},
            {},
            lambda o: float(o.grads[0][0, 1]),
        ),
        (
            "gan_discriminator",
            {"real_scores": np.array([1.0]), "fake_scores": np.array([-1.0])},
            {},
            lambda o: float(o.grads[1][0]),
        ),
    ]
    for loss_name, inputs, opt, grad_on_kink in cases:
        for power in (1, 2):
            if power == 2 and loss_name in ("margin_ranking", "gan_discriminator"):
                continue
            extra = {"power": power} if power == 2 else {}
            _, zero = call_kernel(loss_name, inputs, {**row, **opt, **extra, "kink": "zero"})
            _, one = call_kernel(loss_name, inputs, {**row, **opt, **extra, "kink": "one"})
            assert float(zero.per_sample[-1].sum()) == 0.0 == float(one.per_sample[-1].sum())
            assert grad_on_kink(zero) == 0.0
            assert not bool(zero.active[-1].any())
            # The squared hinge has derivative 2z = 0 on the kink under both conventions.
            assert (grad_on_kink(one) != 0.0) == (power == 1)
            assert bool(one.active[-1].any()) == (power == 1)
            for got, want in zip(
                one.active,
                reference(loss_name, inputs, {**row, **opt, **extra, "kink": "one"}).active,
                strict=True,
            ):
                np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("tie_break", ["first_index", "split_evenly"])
def test_crammer_singer_ties(tie_break: str) -> None:
    scores = np.array([[3.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 5.0, 1.0]])
    targets = np.array([2, 0, 1])
    inputs = {"scores": scores, "targets": targets}
    _, out = call_kernel("crammer_singer", inputs, {"tie_break": tie_break, "reduction": "sum"})
    # Row 0: z = 1 - (1 - 3) = 3, maxima at 0, 1, 3; row 1: z = 1, maxima at 1, 2, 3;
    # row 2: the target ties with the maximum (index 2): z = 1.
    expected: list[list[float]]
    if tie_break == "first_index":
        expected = [[1, 0, -1, 0], [-1, 1, 0, 0], [0, -1, 1, 0]]
    else:
        third = 1 / 3
        expected = [[third, third, -1, third], [-1, third, third, third], [0, -1, 1, 0]]
    close(out.grads[0], expected, **F64)
    close(out.per_sample[0], [3.0, 1.0, 1.0], **F64)


def test_zero_class_weight_and_ignored_rows_are_inactive() -> None:
    scores = np.zeros((6, 4))  # every z = margin: every counted row with w[y] > 0 is active
    targets = np.array([0, 0, 1, IGNORE_INDEX, 2, IGNORE_INDEX])
    opt = {
        "class_weights": np.array([0.0, 1.0, 2.0, 1.0]),
        "ignore_index": IGNORE_INDEX,
        "reduction": "sum",
    }
    _, out = call_kernel("multiclass_hinge", {"scores": scores, "targets": targets}, opt)
    assert out.active[0].tolist() == [False, False, True, False, True, False]
    assert (out.per_sample[0][[0, 1, 3, 5]] == 0).all()
    assert (out.grads[0][[0, 1, 3, 5]] == 0).all()


def test_class_weight_is_the_true_class_and_mean_divides_by_n() -> None:
    """torch semantics: w[y_i] scales sample i; a weighted MEAN still divides by N."""
    inputs = {"scores": np.array([[0.0, 0.0], [0.0, 0.0]]), "targets": np.array([0, 1])}
    opt = {"class_weights": np.array([3.0, 5.0]), "reduction": "mean"}
    total, out = call_kernel("multiclass_hinge", inputs, opt)
    close(out.per_sample[0], [3.0, 5.0], **F64)
    close(total, 4.0, **F64)


def test_mean_with_ignore_index_counts_kept_rows(rng: np.random.Generator) -> None:
    inputs, opt = make_case(
        "multiclass_hinge",
        rng,
        "random",
        n=10,
        c=4,
        options={"ignore_index": IGNORE_INDEX, "reduction": "mean"},
    )
    kept = inputs["targets"] != IGNORE_INDEX
    total, out = call_kernel("multiclass_hinge", inputs, opt)
    close(total, float(out.per_sample[0].numpy()[kept].sum()) / kept.sum(), **F64)


# -------------------------------- shapes and magnitudes


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("style", ["grid", "random"])
def test_single_sample(rng: np.random.Generator, loss_name: str, style: str) -> None:
    for reduction in REDUCTIONS:
        inputs, opt = make_case(
            loss_name, rng, style, n=1, c=3, n_fake=1, options={"reduction": reduction}
        )
        check_case(loss_name, inputs, opt, exact_in_float32=style == "grid")


@pytest.mark.parametrize("loss_name", ["multiclass_hinge", "crammer_singer"])
@pytest.mark.parametrize("c", [2, 10000])
@pytest.mark.parametrize("power", [1, 2])
def test_class_counts(rng: np.random.Generator, loss_name: str, c: int, power: int) -> None:
    n = 3 if c > 100 else 16
    for kink in ("zero", "one"):
        for style in ("grid", "random"):
            inputs, opt = make_case(
                loss_name,
                rng,
                style,
                n=n,
                c=c,
                options={
                    "power": power,
                    "kink": kink,
                    "tie_break": str(rng.choice(["first_index", "split_evenly"])),
                },
            )
            check_case(loss_name, inputs, opt, exact_in_float32=style == "grid")


def test_large_batch_without_loops_matches_reference(rng: np.random.Generator) -> None:
    """A wider batch than the option sweeps use, through the vectorised paths."""
    for loss_name in ("multiclass_hinge", "crammer_singer"):
        inputs, opt = make_case(
            loss_name,
            rng,
            "grid",
            n=256,
            c=40,
            options={"reduction": "weighted_mean", "kink": "one"},
        )
        ref = reference(loss_name, inputs, opt)
        total, out = call_kernel(loss_name, inputs, opt)
        assert_reference(total, out, ref)


# -------------------------------- dtypes


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_match_float32(
    rng: np.random.Generator, loss_name: str, half: torch.dtype
) -> None:
    """float16/bfloat16 scores, up-cast to float32, give the float32 answer to their precision."""
    unit = 2.0**-11 if half == torch.float16 else 2.0**-8  # unit roundoff
    power = 2 if loss_name in ("binary_hinge", "multiclass_hinge", "crammer_singer") else 1
    for style in ("grid", "random"):
        inputs, opt = make_case(
            loss_name,
            rng,
            style,
            n=32,
            c=6,
            n_fake=20,
            options={"power": power, "reduction": "sum"},
        )
        _, out32 = call_kernel(loss_name, inputs, opt, dtype=torch.float32)
        _, outh = call_kernel(loss_name, inputs, opt, dtype=torch.float32, input_dtype=half)
        for tensor in (*outh.per_sample, *outh.grads):
            assert tensor.dtype == torch.float32
        if style == "grid":  # representable: exactly the float32 answer
            for a, b in zip(
                (*outh.per_sample, *outh.grads), (*out32.per_sample, *out32.grads), strict=True
            ):
                assert torch.equal(a, b)
            continue
        # Each hinge argument moves by at most 2 * unit * max|score| (two scores in it).
        biggest = max(float(np.abs(inputs[name]).max()) for name in SCORE_INPUTS[loss_name])
        dz = 2 * unit * biggest * 1.01
        zmax = (opt.get("margin", 1.0) + 2 * biggest) if power == 2 else 1.0
        terms = 5 if loss_name == "multiclass_hinge" else 1
        for a, b in zip(outh.per_sample, out32.per_sample, strict=True):
            close(a, b, rtol=0.0, atol=terms * power * zmax * dz + 1e-5)


def test_float64_and_float32_outputs_keep_dtype_and_device(rng: np.random.Generator) -> None:
    for loss_name in LOSS_NAMES:
        inputs, opt = make_case(loss_name, rng, "random", n=5, c=3, n_fake=4)
        for dtype in (torch.float32, torch.float64):
            _, out = call_kernel(loss_name, inputs, opt, dtype=dtype)
            for tensor in (*out.per_sample, *out.grads):
                assert tensor.dtype == dtype
                assert tensor.device.type == "cpu"
            for active in out.active:
                assert active.dtype == torch.bool


# -------------------------------- safety of the kernels


def test_inputs_are_not_modified(rng: np.random.Generator) -> None:
    scores = torch.tensor(draw_scores(rng, (8, 5), "grid"))
    targets = torch.tensor(rng.integers(0, 5, size=8))
    labels = torch.tensor(rng.choice([-1.0, 1.0], size=8))
    vec = torch.tensor(draw_scores(rng, (8,), "grid"))
    vec2 = torch.tensor(draw_scores(rng, (8,), "grid"))
    weights = torch.tensor(draw_weights(rng, 5))
    ignore = torch.tensor(rng.random(8) < 0.3)
    r = torch.full((8,), 0.125, dtype=torch.float64)
    snapshot = [t.clone() for t in (scores, targets, labels, vec, vec2, weights, ignore, r)]
    for power in (1, 2):
        for kink_one in (False, True):
            losses.binary_hinge(
                vec, labels, margin=1.0, power=power, kink_one=kink_one, row_scale=r
            )
            losses.multiclass_hinge(
                scores,
                targets,
                margin=1.0,
                power=power,
                kink_one=kink_one,
                class_weights=weights,
                divide_by_num_classes=True,
                row_scale=r,
                ignore_mask=ignore,
            )
            for split in (False, True):
                losses.crammer_singer(
                    scores,
                    targets,
                    margin=1.0,
                    power=power,
                    kink_one=kink_one,
                    split_ties=split,
                    row_scale=r,
                )
        losses.gan_discriminator(vec, vec2, kink_one=bool(power - 1), real_scale=r, fake_scale=r)
        losses.margin_ranking(vec, vec2, labels, margin=1.0, kink_one=bool(power - 1), row_scale=r)
        losses.gan_generator(vec, row_scale=r)
    for before, after in zip(
        snapshot, (scores, targets, labels, vec, vec2, weights, ignore, r), strict=True
    ):
        assert torch.equal(before, after)


def test_autograd_inputs_give_detached_outputs(rng: np.random.Generator) -> None:
    scores = torch.tensor(draw_scores(rng, (4, 3), "random"), requires_grad=True)
    out = losses.multiclass_hinge(
        scores,
        torch.tensor([0, 1, 2, 0]),
        margin=1.0,
        power=1,
        kink_one=False,
        class_weights=None,
        divide_by_num_classes=False,
        row_scale=torch.ones(4, dtype=torch.float64),
    )
    assert not out.per_sample[0].requires_grad
    assert not out.grads[0].requires_grad


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 6),
    c=st.integers(2, 6),
    power=st.sampled_from([1, 2]),
    kink=st.sampled_from(["zero", "one"]),
    loss_name=st.sampled_from(["multiclass_hinge", "crammer_singer"]),
    tie_break=st.sampled_from(["first_index", "split_evenly"]),
)
def test_multiclass_integer_scores_property(
    data: st.DataObject, n: int, c: int, power: int, kink: str, loss_name: str, tie_break: str
) -> None:
    """Small integer scores: ties and z == 0 everywhere; kernel == reference exactly."""
    scores = np.array(
        data.draw(st.lists(st.integers(-2, 2), min_size=n * c, max_size=n * c)), dtype=np.float64
    ).reshape(n, c)
    targets = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    opt = {
        "power": power,
        "kink": kink,
        "tie_break": tie_break,
        "reduction": "sum",
        "margin": float(data.draw(st.sampled_from([0.0, 1.0, 2.0]))),
    }
    inputs = {"scores": scores, "targets": targets}
    total, out = call_kernel(loss_name, inputs, opt)
    assert_reference(total, out, reference(loss_name, inputs, opt))


# -------------------------------- CUDA


@pytest.mark.gpu
@gpu
def test_cuda_matches_reference_without_host_syncs() -> None:
    """Every loss on CUDA, float64 and float32, equals the reference; no kernel syncs the host."""
    rng = np.random.default_rng(secrets.randbits(32))
    for loss_name in LOSS_NAMES:
        for reduction in REDUCTIONS:
            for power in (1, 2):
                for kink in ("zero", "one"):
                    base: dict[str, Any] = {"reduction": reduction, "kink": kink}
                    if loss_name in ("binary_hinge", "multiclass_hinge", "crammer_singer"):
                        base["power"] = power
                    elif power == 2:
                        continue
                    if loss_name == "multiclass_hinge":
                        base.update(
                            class_weights=draw_weights(rng, 7),
                            ignore_index=IGNORE_INDEX,
                            class_normalization="divide_by_num_classes",
                        )
                    if loss_name == "crammer_singer":
                        base["tie_break"] = str(rng.choice(["first_index", "split_evenly"]))
                    inputs, opt = make_case(
                        loss_name, rng, "grid", n=64, c=7, n_fake=9, options=base
                    )
                    ref = reference(loss_name, inputs, opt)
                    scales64, run64 = prepare_kernel(loss_name, inputs, opt, device="cuda")
                    _, run32 = prepare_kernel(
                        loss_name, inputs, opt, device="cuda", dtype=torch.float32
                    )
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        out64, out32 = run64(True), run32(True)
                        run64(False)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                    assert_reference(reduced(scales64, out64), out64, ref)
                    for got, want in zip(out32.grads, ref.grads, strict=True):
                        assert got.device.type == "cuda"
                        close(got, want, rtol=1e-5, atol=1e-7)
                    for got, want in zip(out32.active, ref.active, strict=True):
                        np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.gpu
@gpu
def test_cuda_large_classes() -> None:
    rng = np.random.default_rng(secrets.randbits(32))
    for loss_name in ("multiclass_hinge", "crammer_singer"):
        inputs, opt = make_case(
            loss_name,
            rng,
            "grid",
            n=4,
            c=10000,
            options={"tie_break": "first_index", "reduction": "mean"},
        )
        total, out = call_kernel(loss_name, inputs, opt, device="cuda")
        assert_reference(total, out, reference(loss_name, inputs, opt))
