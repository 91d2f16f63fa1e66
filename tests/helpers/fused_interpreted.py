"""Compares the fused kernels, run by Triton's interpreter on the CPU, with the eager ones.

Run by tests/unit/test_fused.py in its own process: TRITON_INTERPRET must be set before
Triton compiles anything. Exits 1 and names the first case that differs.

    TRITON_INTERPRET=1 python tests/helpers/fused_interpreted.py SEED
"""

from __future__ import annotations

import itertools
import sys

import torch

from hingeloss_server.engine import fused, losses
from hingeloss_server.engine.losses import weston_watkins

# (rows, classes): one chunk, two chunks, B=1.
CASES = [(5, 300), (2, 5000), (1, 256)]


def _same_gradient(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, compiled: bool
) -> bool:
    """Bit for bit; for bfloat16 either rounding of the same float32 value.

    Compiled, Triton rounds float32 to bfloat16 to nearest even, as torch does (the
    GPU tests compare bit for bit); its interpreter truncates instead.
    """
    if compiled or dtype != torch.bfloat16:
        return torch.equal(got, want.to(dtype))
    bits = want.to(torch.float32).view(torch.int32)
    truncated = (bits & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    return bool(((got == want.to(dtype)) | (got == truncated)).all())


def _binary_mismatch(
    generator: torch.Generator, dtype: torch.dtype, power: int, kink_one: bool, compiled: bool
) -> str:
    """What differs between fused and eager binary hinge on 3000 samples (2.9 blocks)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    rows = 3000
    scores = torch.randint(-3, 4, (rows,), generator=generator).to(dtype) / 2
    labels = torch.randint(0, 2, (rows,), generator=generator).to(torch.int8) * 2 - 1
    scale = torch.rand(rows, generator=generator, dtype=compute)
    got = fused.binary_hinge(
        scores,
        labels,
        margin=torch.tensor([1.0], dtype=compute),
        power=power,
        kink_one=kink_one,
        row_scale=scale,
        grad_dtype=dtype,
        need_grad=True,
    )
    want = losses.binary_hinge(
        scores.to(compute),
        labels.to(compute),
        margin=1.0,
        power=power,
        kink_one=kink_one,
        row_scale=scale,
    )
    assert got.grad is not None
    checks = {
        "gradient (bit for bit)": _same_gradient(got.grad, want.grads[0], dtype, compiled),
        "per-sample loss (bit for bit)": torch.equal(got.per_sample, want.per_sample[0]),
        "activity": torch.equal(got.active, want.active[0]),
    }
    return ", ".join(name for name, ok in checks.items() if not ok)


def main(seed: int, device: str = "cpu") -> int:
    """Every case on `device` (CUDA: compiled; the CPU: interpreted); 0 when all agree.

    Compiled, each block size, dtype and option is a compilation: CUDA runs the sizes
    the server meets most (one and two chunks) and weights with ignored rows together.
    """
    torch.set_default_device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    cases = CASES if device == "cpu" else [(5, 1000), (2, 5000)]
    options = itertools.product(
        (torch.float32, torch.float64, torch.float16, torch.bfloat16),
        (1, 2),
        (False, True),
        (False, True),
        (False, True),
    )
    for (rows, classes), (dtype, power, kink_one, weighted, ignored) in itertools.product(
        cases, options
    ):
        if device != "cpu" and weighted != ignored:
            continue
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        # Integer scores: many entries exactly on the margin (the kink), and ties.
        scores = torch.randint(-2, 3, (rows, classes), generator=generator).to(dtype)
        targets = torch.randint(0, classes, (rows,), generator=generator)
        weights = torch.rand(classes, generator=generator, dtype=compute) if weighted else None
        ignore = torch.rand(rows, generator=generator) < 0.4 if ignored else None
        scale = torch.rand(rows, generator=generator, dtype=compute)
        factor = weston_watkins.row_factor(
            targets,
            num_classes=classes,
            dtype=compute,
            class_weights=weights,
            divide_by_num_classes=weighted,
            ignore_mask=ignore,
        )
        got = fused.weston_watkins(
            scores,
            targets,
            margin=torch.tensor([1.0], dtype=compute),
            power=power,
            kink_one=kink_one,
            factor=factor,
            row_scale=scale,
            ignore_mask=ignore,
            grad_dtype=dtype,
            need_grad=True,
        )
        x = scores.to(compute)
        if ignore is not None:
            x = x.masked_fill(ignore.unsqueeze(1), 0.0)
        want = losses.multiclass_hinge(
            x,
            targets,
            margin=1.0,
            power=power,
            kink_one=kink_one,
            class_weights=weights,
            divide_by_num_classes=weighted,
            row_scale=scale,
            ignore_mask=ignore,
        )
        case = (
            f"{rows}x{classes} {dtype} power={power} kink_one={kink_one} w={weighted} i={ignored}"
        )
        assert got.grad is not None
        checks = {
            "gradient (bit for bit)": _same_gradient(
                got.grad, want.grads[0], dtype, compiled=device != "cpu"
            ),
            "per-sample loss": torch.allclose(got.per_sample, want.per_sample[0], rtol=1e-6),
            "activity": torch.equal(got.active, want.active[0]),
            "no flags": not got.grad_not_finite.any() and not got.scores_not_finite.any(),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            print(f"MISMATCH {case}: {', '.join(failed)}")
            return 1
    for dtype, power, kink_one in itertools.product(
        (torch.float32, torch.float64, torch.float16, torch.bfloat16), (1, 2), (False, True)
    ):
        mismatch = _binary_mismatch(generator, dtype, power, kink_one, compiled=device != "cpu")
        if mismatch:
            print(f"MISMATCH binary_hinge {dtype} power={power} kink_one={kink_one}: {mismatch}")
            return 1
    # A NaN score and a gradient past float16's range are flagged on their rows.
    scores = torch.zeros((3, 300), dtype=torch.float16)
    scores[1, 7] = float("nan")
    targets = torch.zeros(3, dtype=torch.int64)
    factor = torch.ones(3)
    big = torch.tensor([1.0, 1.0, 1000.0])  # 299 active columns x 1000 > 65504
    flagged = fused.weston_watkins(
        scores,
        targets,
        margin=torch.ones(1),
        power=1,
        kink_one=False,
        factor=factor,
        row_scale=big,
        ignore_mask=None,
        grad_dtype=torch.float16,
        need_grad=True,
    )
    if flagged.scores_not_finite.tolist() != [False, True, False]:
        print(f"MISMATCH non-finite scores flagged as {flagged.scores_not_finite.tolist()}")
        return 1
    if flagged.grad_not_finite.tolist() != [False, False, True]:
        print(f"MISMATCH gradient overflow flagged as {flagged.grad_not_finite.tolist()}")
        return 1
    print("fused kernel matches eager")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), *sys.argv[2:]))
