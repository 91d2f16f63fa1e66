"""A hinge-loss GAN on scikit-learn's 8x8 digits whose losses a hingeloss server computes.

SNGAN-style (Miyato et al. 2018): a spectral-normalised MLP discriminator, Adam
with beta1 = 0 and beta2 = 0.9, the hinge discriminator loss
mean(relu(1 - D(real))) + mean(relu(1 + D(fake))) and the generator loss
-mean(D(fake)), real and fake batches of different sizes. Both losses and their
gradients come from the server through `RemoteHingeLoss`. By default a twin is
trained in lockstep on the same data and noise with the same formulas in local
torch, to show that nothing but the place of the computation changed.

Every step also records the share of the discriminator's samples whose loss is
non-zero, read from the server's answer: hinge loss's defining property is that
a sample beyond the margin (a real digit scored above 1, a fake one below -1)
gives no gradient at all.

    make serve                      # in another shell
    python examples/gan_digits.py --out docs/gan_digits.png
    python examples/gan_digits.py --local     # no server: the local losses alone
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from hingeloss import LossClient
from hingeloss.torch import RemoteHingeLoss

NOISE_DIM = 16
PIXELS = 64
HIDDEN = 128
# float64 end to end: the server computes float64 scores in float64, so the remote and
# local twins can be held to 1e-9 (on the CPU they come out bit-identical).
DTYPE = torch.float64


@dataclass(frozen=True)
class Options:
    """What one training run does."""

    target: str = "localhost:50051"
    steps: int = 4000
    real_batch: int = 64
    fake_batch: int = 128
    lr: float = 1e-3
    seed: int = 0
    remote: bool = True
    local: bool = True
    out: Path = Path("gan_digits.png")
    log_every: int = 250

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.real_batch < 1 or self.fake_batch < 1:
            raise ValueError("real_batch and fake_batch must be >= 1")
        if not (self.remote or self.local):
            raise ValueError("train at least one of the remote and the local model")


def load_images() -> torch.Tensor:
    """The 1,797 digits, flattened to 64 pixels scaled from [0, 16] to [-1, 1]."""
    images = torch.from_numpy(load_digits().data).to(DTYPE)
    return images / 8.0 - 1.0


def make_generator() -> nn.Module:
    return nn.Sequential(
        nn.Linear(NOISE_DIM, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, PIXELS),
        nn.Tanh(),
    ).to(DTYPE)


def make_discriminator() -> nn.Module:
    """Spectral norm bounds each layer's Lipschitz constant, as in SNGAN."""
    return nn.Sequential(
        spectral_norm(nn.Linear(PIXELS, HIDDEN)),
        nn.LeakyReLU(0.1),
        spectral_norm(nn.Linear(HIDDEN, HIDDEN)),
        nn.LeakyReLU(0.1),
        spectral_norm(nn.Linear(HIDDEN, 1)),
    ).to(DTYPE)


class GanLosses(Protocol):
    """The two hinge GAN losses; the discriminator's also says which share was active."""

    def discriminator(
        self, real_scores: torch.Tensor, fake_scores: torch.Tensor
    ) -> tuple[torch.Tensor, float]: ...

    def generator(self, fake_scores: torch.Tensor) -> torch.Tensor: ...


class RemoteLosses:
    """Losses and gradients from a hingeloss server; the active share from its answer."""

    def __init__(self, client: LossClient) -> None:
        self._discriminator = RemoteHingeLoss(client, "gan_discriminator")
        self._generator = RemoteHingeLoss(client, "gan_generator")

    def discriminator(
        self, real_scores: torch.Tensor, fake_scores: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        loss = self._discriminator(real_scores, fake_scores)
        assert self._discriminator.last_result is not None
        return loss, self._discriminator.last_result.active_fraction

    def generator(self, fake_scores: torch.Tensor) -> torch.Tensor:
        return self._generator(fake_scores)


class LocalLosses:
    """The same losses in local torch (docs/LOSSES.md, as BigGAN's loss_hinge_dis/gen)."""

    def discriminator(
        self, real_scores: torch.Tensor, fake_scores: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        real_terms = F.relu(1.0 - real_scores)
        fake_terms = F.relu(1.0 + fake_scores)
        active = int((real_terms > 0).sum() + (fake_terms > 0).sum())
        share = active / (real_scores.numel() + fake_scores.numel())
        return real_terms.mean() + fake_terms.mean(), share

    def generator(self, fake_scores: torch.Tensor) -> torch.Tensor:
        return -fake_scores.mean()


@dataclass
class History:
    """Per step: discriminator loss, generator loss, share of D's samples active."""

    d_loss: list[float] = field(default_factory=list)
    g_loss: list[float] = field(default_factory=list)
    active: list[float] = field(default_factory=list)


class Gan:
    """A generator, a discriminator and their optimizers, trained with one set of losses."""

    def __init__(self, losses: GanLosses, seed: int, lr: float) -> None:
        torch.manual_seed(seed)  # the twins start from the same weights
        self.generator = make_generator()
        self.discriminator = make_discriminator()
        betas = (0.0, 0.9)
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        self.losses = losses
        self.history = History()

    def step(self, real: torch.Tensor, d_noise: torch.Tensor, g_noise: torch.Tensor) -> None:
        """One discriminator update, then one generator update."""
        with torch.no_grad():
            fake = self.generator(d_noise)
        # One forward over both batches: one power iteration of each spectral norm.
        scores = self.discriminator(torch.cat([real, fake])).squeeze(1)
        real_scores, fake_scores = scores[: len(real)], scores[len(real) :]
        d_loss, active = self.losses.discriminator(real_scores, fake_scores)
        self.d_optimizer.zero_grad()
        d_loss.backward()
        self.d_optimizer.step()

        g_loss = self.losses.generator(self.discriminator(self.generator(g_noise)).squeeze(1))
        self.g_optimizer.zero_grad()
        g_loss.backward()
        self.g_optimizer.step()

        self.history.d_loss.append(d_loss.item())
        self.history.g_loss.append(g_loss.item())
        self.history.active.append(active)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.generator(noise)


def train(options: Options, client: LossClient | None) -> dict[str, Gan]:
    """Trains the remote and/or local GAN in lockstep on the same batches and noise."""
    gans: dict[str, Gan] = {}
    if options.remote:
        if client is None:
            raise ValueError("the remote model needs a client")
        gans["remote"] = Gan(RemoteLosses(client), options.seed, options.lr)
    if options.local:
        gans["local"] = Gan(LocalLosses(), options.seed, options.lr)
    images = load_images()
    data = torch.Generator().manual_seed(options.seed + 1)
    started = time.perf_counter()
    for step in range(1, options.steps + 1):
        real = images[torch.randint(0, len(images), (options.real_batch,), generator=data)]
        d_noise = torch.randn(options.fake_batch, NOISE_DIM, generator=data, dtype=DTYPE)
        g_noise = torch.randn(options.fake_batch, NOISE_DIM, generator=data, dtype=DTYPE)
        for gan in gans.values():
            gan.step(real, d_noise, g_noise)
        if options.log_every and (step % options.log_every == 0 or step == options.steps):
            line = "  ".join(
                f"{name}: D {gan.history.d_loss[-1]:.3f} G {gan.history.g_loss[-1]:+.3f} "
                f"active {gan.history.active[-1]:.2f}"
                for name, gan in gans.items()
            )
            print(f"step {step:5d}  {time.perf_counter() - started:6.1f} s  {line}", flush=True)
    return gans


def max_parameter_difference(a: Gan, b: Gan) -> float:
    """Largest absolute difference over every weight and spectral-norm vector of both nets."""
    worst = 0.0
    for net_a, net_b in ((a.generator, b.generator), (a.discriminator, b.discriminator)):
        state_b = net_b.state_dict()
        for name, tensor in net_a.state_dict().items():
            worst = max(worst, float((tensor - state_b[name]).abs().max()))
    return worst


def _lowest(values: Sequence[float]) -> int:
    """Index of the smallest value (the first of equals)."""
    return min(range(len(values)), key=values.__getitem__)


def _smooth(values: Sequence[float], window: int) -> torch.Tensor:
    """Trailing mean over `window` steps (shorter at the start)."""
    series = torch.tensor(values, dtype=torch.float64)
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), series.cumsum(0)])
    ends = torch.arange(1, len(series) + 1)
    starts = (ends - window).clamp(min=0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _tile(digits: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """A square grid of 8x8 digits (ink in [0, 1]) with `gap` blank pixels between them."""
    side = int(len(digits) ** 0.5)
    cell = 8 + gap
    padded = torch.zeros(side, side, cell, cell, dtype=digits.dtype)
    padded[:, :, :8, :8] = digits[: side * side].reshape(side, side, 8, 8)
    size = side * cell - gap
    return padded.permute(0, 2, 1, 3).reshape(side * cell, side * cell)[:size, :size]


def plot(gans: dict[str, Gan], noise: torch.Tensor, out: Path) -> None:
    """Generated digits beside the loss and active-share curves of every model trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = gans.get("remote") or gans["local"]
    grid = _tile((shown.sample(noise) + 1.0) / 2.0)

    figure = plt.figure(figsize=(12, 6), layout="constrained")
    left, right = figure.subfigures(1, 2, width_ratios=[1, 1.25])
    image_axes = left.subplots()
    image_axes.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
    steps = len(shown.history.d_loss)
    which = "remote" if "remote" in gans else "local"
    image_axes.set_title(f"generated digits after {steps} steps ({which} losses)")
    image_axes.axis("off")

    window = max(1, steps // 100)
    panels = right.subplots(3, 1, sharex=True)
    series = (
        ("d_loss", "D loss"),
        ("g_loss", "G loss"),
        ("active", "share of D's samples\nwith non-zero loss"),
    )
    styles = {"remote": {"linestyle": "-"}, "local": {"linestyle": "--"}}
    colors = {"remote": "tab:blue", "local": "tab:orange"}
    x = range(1, steps + 1)
    for axes, (attribute, label) in zip(panels, series, strict=True):
        for name, gan in gans.items():
            values = getattr(gan.history, attribute)
            axes.plot(x, values, color=colors[name], alpha=0.15, linewidth=0.5)
            axes.plot(x, _smooth(values, window), color=colors[name], label=name, **styles[name])
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    panels[0].legend(loc="upper right")
    panels[0].set_title(f"each step (faint) and the mean of the last {window} steps")
    lowest = _lowest(shown.history.active)
    panels[2].annotate(
        f"lowest {shown.history.active[lowest]:.2f}, step {lowest + 1}",
        xy=(lowest + 1, shown.history.active[lowest]),
        xytext=(0.25, 0.3),
        textcoords="axes fraction",
        arrowprops={"arrowstyle": "->", "color": "gray"},
    )
    panels[2].set_ylim(0.5, 1.02)
    panels[2].set_xlabel("step")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)


def parse_options(argv: Sequence[str] | None = None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=defaults.target, help="hingeloss server address")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument("--real-batch", type=int, default=defaults.real_batch)
    parser.add_argument("--fake-batch", type=int, default=defaults.fake_batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--local",
        action="store_true",
        help="train with local torch losses only (no server); default: remote and local twins",
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help="the PNG to write")
    args = parser.parse_args(argv)
    return Options(
        target=args.target,
        steps=args.steps,
        real_batch=args.real_batch,
        fake_batch=args.fake_batch,
        lr=args.lr,
        seed=args.seed,
        remote=not args.local,
        local=True,
        out=args.out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    # Layers this small gain nothing from more threads; idle OpenMP threads would
    # only spin on the cores that a local server needs.
    torch.set_num_threads(1)
    client = LossClient(options.target) if options.remote else None
    try:
        gans = train(options, client)
    finally:
        if client is not None:
            client.close()
    noise = torch.randn(64, NOISE_DIM, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    plot(gans, noise, options.out)
    for name, gan in gans.items():
        active = gan.history.active
        head, tail = active[: max(1, len(active) // 20)], active[-max(1, len(active) // 10) :]
        lowest = _lowest(active)
        print(
            f"{name}: share of D's samples with non-zero loss: "
            f"{sum(head) / len(head):.3f} over the first {len(head)} steps, "
            f"{sum(tail) / len(tail):.3f} over the last {len(tail)}, "
            f"lowest {active[lowest]:.2f} at step {lowest + 1}"
        )
    if "remote" in gans and "local" in gans:
        difference = max_parameter_difference(gans["remote"], gans["local"])
        print(f"largest |remote - local| parameter difference: {difference:.3g}")
    print(f"wrote {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
