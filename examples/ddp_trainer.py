"""Data-parallel trainers (torchrun, gloo, CPU), each rank's loss computed by one hingeloss server.

Every rank trains the same MLP on its own shard of scikit-learn's digits and,
every step, sends its scores to the server through one target; DDP then
averages the gradients across ranks as usual. Because the ranks reach their
loss at about the same moment, the server can put their requests into one
batch: each answer says how many requests its batch held
(`timing.batch_requests`), and rank 0 prints what the ranks saw, with the
PromQL that shows the same live in Grafana.

    make serve                      # in another shell
    torchrun --standalone --nproc-per-node 2 examples/ddp_trainer.py

A server started with `--max-batch-delay-us 2000` waits up to 2 ms for more
requests before it computes a batch that is not full; the default (0) takes
only what is already queued.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hingeloss import LossClient
from hingeloss.torch import RemoteHingeLoss

# Weston-Watkins divided by the number of classes: exactly F.multi_margin_loss.
LOSS = "multiclass_hinge"
LOSS_OPTIONS = {"class_normalization": "divide_by_num_classes"}
DTYPE = torch.float64

PROMQL = """\
# requests per server batch, mean over the last minute (Grafana: "Batch size (requests)")
sum(rate(hingeloss_batch_requests_sum[1m])) / sum(rate(hingeloss_batch_requests_count[1m]))
# share of batches that held requests of more than one trainer
1 - sum(rate(hingeloss_batch_requests_bucket{le="1.0"}[1m]))
  / sum(rate(hingeloss_batch_requests_count[1m]))"""


@dataclass(frozen=True)
class Options:
    """What one training run does (the same on every rank)."""

    target: str = "localhost:50051"
    steps: int = 300
    batch: int = 64
    lr: float = 0.05
    seed: int = 0
    record: Path | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got {self.steps}, {self.batch}")


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(DTYPE)


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    return torch.from_numpy(digits.data / 16.0).to(DTYPE), torch.from_numpy(digits.target)


def train(options: Options, rank: int, world: int) -> list[int]:
    """Trains on this rank's shard; returns the requests per server batch of each step."""
    torch.manual_seed(options.seed)  # every rank starts from the same weights
    model = build_model()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=options.lr, momentum=0.9)
    x_all, y_all = load_data()
    shard = torch.arange(rank, len(y_all), world)
    sampler = torch.Generator().manual_seed(options.seed * 1000 + rank)
    batch_requests: list[int] = []
    records: list[dict[str, object]] = []
    with LossClient(options.target) as client:
        criterion = RemoteHingeLoss(client, LOSS, **LOSS_OPTIONS)
        for _step in range(options.steps):
            rows = shard[torch.randint(0, len(shard), (options.batch,), generator=sampler)]
            x, y = x_all[rows], y_all[rows]
            optimizer.zero_grad()
            loss = criterion(ddp(x), y)
            loss.backward()  # the server's gradient, then DDP's all-reduce
            assert criterion.last_result is not None
            batch_requests.append(criterion.last_result.timing.batch_requests)
            if options.record is not None:
                records.append(_snapshot(model, x, y))
            optimizer.step()
    if options.record is not None:
        options.record.mkdir(parents=True, exist_ok=True)
        torch.save(records, options.record / f"rank{rank}.pt")
    if rank == 0:
        with torch.no_grad():
            accuracy = (model(x_all).argmax(1) == y_all).double().mean()
        print(f"training accuracy after {options.steps} steps: {accuracy:.1%}")
    return batch_requests


def _snapshot(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    """This step's batch, the weights it met and the gradient DDP averaged."""
    return {
        "x": x,
        "y": y,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
    }


def report(per_rank: Sequence[Sequence[int]]) -> str:
    """How many requests the server's batches held, as the ranks' answers said."""
    counts = Counter(size for sizes in per_rank for size in sizes)
    total = sum(counts.values())
    lines = [f"requests per server batch, over {total} answers to {len(per_rank)} trainers:"]
    for size in sorted(counts):
        lines.append(f"  {size:3d}: {counts[size]:6d} answers ({counts[size] / total:.0%})")
    lines.append("live, in Prometheus or Grafana:")
    lines.append(PROMQL)
    return "\n".join(lines)


def parse_options(argv: Sequence[str] | None = None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=defaults.target, help="hingeloss server address")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch, help="samples per rank")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        help="write each rank's batches, weights and gradients of every step here",
    )
    return Options(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    if "RANK" not in os.environ:
        print(
            f"start me with torchrun, e.g. torchrun --standalone --nproc-per-node 2 {sys.argv[0]}",
            file=sys.stderr,
        )
        return 2
    # Layers this small gain nothing from more threads; idle OpenMP threads would
    # only spin on the cores that the other ranks and a local server need.
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = train(options, rank, world)
        gathered: list[list[int] | None] = [None] * world if rank == 0 else []
        dist.gather_object(sizes, gathered if rank == 0 else None, dst=0)
        if rank == 0:
            print(report([s for s in gathered if s is not None]))
        dist.barrier()  # no rank tears down while another still uses the group
    finally:
        # DDP's reducer holds the process group and sits in reference cycles: left
        # to the interpreter's exit, gloo's threads are torn down too late and the
        # process aborts ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
