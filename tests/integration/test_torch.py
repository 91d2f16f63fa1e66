"""torch autograd on a remote loss: `loss.backward()` gives local torch's gradients."""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from helpers.servers import ServerThread

from hingeloss import LossClient
from hingeloss.torch import RemoteHingeLoss, remote_loss
from hingeloss.v1 import loss_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(shared_server: ServerThread) -> Any:
    with LossClient(shared_server.target) as loss_client:
        yield loss_client


def test_backward_matches_multi_margin_loss(client: LossClient) -> None:
    logits = torch.randn(16, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (16,))
    weight = torch.rand(7, dtype=torch.float64) + 0.5
    local = logits.detach().clone().requires_grad_()
    criterion = RemoteHingeLoss(
        client,
        "multiclass_hinge",
        class_normalization="divide_by_num_classes",
        class_weights=weight,
        power=2,
    )
    loss = criterion(logits, targets)
    (3.0 * loss).backward()  # grad_output scaling is respected
    expected = F.multi_margin_loss(local, targets, p=2, weight=weight)
    (3.0 * expected).backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits.grad, local.grad, rtol=1e-10, atol=1e-12)
    assert "multiclass_hinge" in repr(criterion)


def test_gan_discriminator_gives_both_gradients(client: LossClient) -> None:
    real = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(9, dtype=torch.float64, requires_grad=True)
    loss = remote_loss(client, "gan_discriminator", real, fake)
    loss.backward()  # type: ignore[no-untyped-call]
    real_local = real.detach().clone().requires_grad_()
    fake_local = fake.detach().clone().requires_grad_()
    expected = F.relu(1 - real_local).mean() + F.relu(1 + fake_local).mean()
    expected.backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(real.grad, real_local.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(fake.grad, fake_local.grad, rtol=1e-12, atol=0)


def test_module_keeps_the_servers_answer(client: LossClient) -> None:
    criterion = RemoteHingeLoss(client, "gan_discriminator")
    assert criterion.last_result is None
    real = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64, requires_grad=True)
    fake = torch.tensor([-3.0, 0.0, -0.5, -1.0, 4.0], dtype=torch.float64, requires_grad=True)
    loss = criterion(real, fake)
    result = criterion.last_result
    assert result is not None
    assert result.loss == loss.item()
    # Active: real 0.5 (below 1); fake 0.0, -0.5 and 4.0 (above -1). The rest clear the margin.
    assert (result.samples, result.active_samples) == (8, 4)
    assert result.timing.batch_requests >= 1
    criterion(real[:1], fake[:1])
    assert criterion.last_result.samples == 2


@pytest.mark.parametrize("none", ["none", " NONE ", pb.REDUCTION_NONE])
def test_reduction_none_scales_rows(client: LossClient, none: str | int) -> None:
    """Every spelling the SDK takes for reduction "none" gives the per-sample vector."""
    a = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -1] * 4)
    per_sample = remote_loss(client, "margin_ranking", a, b, y, reduction=none, margin=0.5)
    upstream = torch.rand(8, dtype=torch.float64)
    per_sample.backward(upstream)  # type: ignore[no-untyped-call]
    a_local = a.detach().clone().requires_grad_()
    b_local = b.detach().clone().requires_grad_()
    expected = F.relu(0.5 - y * (a_local - b_local))
    expected.backward(upstream)  # type: ignore[no-untyped-call]
    torch.testing.assert_close(per_sample, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.grad, a_local.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.grad, b_local.grad, rtol=1e-12, atol=0)


def test_reduction_none_scales_each_sample_set_by_its_own_rows(client: LossClient) -> None:
    """The GAN discriminator's per-sample losses are real then fake: each input its part."""
    real = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(9, dtype=torch.float64, requires_grad=True)
    per_sample = remote_loss(client, "gan_discriminator", real, fake, reduction="none")
    upstream = torch.rand(14, dtype=torch.float64)
    per_sample.backward(upstream)  # type: ignore[no-untyped-call]
    real_local = real.detach().clone().requires_grad_()
    fake_local = fake.detach().clone().requires_grad_()
    expected = torch.cat([F.relu(1 - real_local), F.relu(1 + fake_local)])
    expected.backward(upstream)  # type: ignore[no-untyped-call]
    torch.testing.assert_close(per_sample, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(real.grad, real_local.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(fake.grad, fake_local.grad, rtol=1e-12, atol=0)


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### torch autograd", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


def test_readme_training_loop_matches_local_torch(shared_server: ServerThread) -> None:
    """The README's example, run as written, reaches the parameters of the local loss."""
    code = _readme_example().replace("localhost:50051", shared_server.target)
    torch.manual_seed(1234)
    remote: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), remote)  # noqa: S102 - our own README

    local_code = re.sub(
        r"criterion = RemoteHingeLoss\(.*\)",
        "criterion = lambda out, y: torch.nn.functional.multi_margin_loss(out, y)",
        code,
    )
    assert local_code != code
    torch.manual_seed(1234)
    local: dict[str, Any] = {}
    exec(compile(local_code, "README.md (local)", "exec"), local)  # noqa: S102
    for (name, p_remote), p_local in zip(
        remote["model"].named_parameters(), local["model"].parameters(), strict=True
    ):
        torch.testing.assert_close(p_remote, p_local, rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.equal(remote["model"].weight, _initial_weight())


def _initial_weight() -> torch.Tensor:
    torch.manual_seed(1234)
    return torch.nn.Linear(20, 5).double().weight.detach()


def _ddp_rank(rank: int, world: int, target: str, init_file: str) -> None:
    """One rank of a gloo job: remote loss, DDP all-reduce, compare with local torch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ddp = None
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4).double()
        reference = torch.nn.Linear(6, 4).double()
        reference.load_state_dict(model.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        data = []
        for r in range(world):
            generator = torch.Generator().manual_seed(100 + r)
            data.append(
                (
                    torch.randn(10, 6, dtype=torch.float64, generator=generator),
                    torch.randint(0, 4, (10,), generator=generator),
                )
            )
        with LossClient(target) as client:
            criterion = RemoteHingeLoss(client, "crammer_singer", margin=0.5)
            for _step in range(2):
                ddp.zero_grad()
                x, y = data[rank]
                criterion(ddp(x), y).backward()  # DDP averages the gradients across ranks
                reference.zero_grad()
                for xs, ys in data:
                    scores = reference(xs)
                    true = scores.gather(1, ys[:, None]).squeeze(1)
                    others = scores.scatter(1, ys[:, None], float("-inf")).amax(1)
                    (F.relu(0.5 - (true - others)).mean() / world).backward()  # type: ignore[no-untyped-call]
                for p_ddp, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
                    torch.testing.assert_close(p_ddp.grad, p_ref.grad, rtol=1e-10, atol=1e-12)
                with torch.no_grad():
                    for p_ddp, p_ref in zip(
                        model.parameters(), reference.parameters(), strict=True
                    ):
                        assert p_ddp.grad is not None
                        assert p_ref.grad is not None
                        # torch's stubs type in-place ops as returning Tensor, not the Parameter.
                        p_ddp -= 0.1 * p_ddp.grad  # type: ignore[misc]
                        p_ref -= 0.1 * p_ref.grad  # type: ignore[misc]
        dist.barrier()  # neither rank leaves while the other still talks to it
    finally:
        # DDP's reducer holds the group and gloo's threads: released here, before the
        # group, not during the interpreter's exit (where gloo can abort the process).
        del ddp
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel_gloo(shared_server: ServerThread, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(  # type: ignore[attr-defined, no-untyped-call]
        _ddp_rank, args=(2, shared_server.target, str(tmp_path / "rendezvous")), nprocs=2, join=True
    )
