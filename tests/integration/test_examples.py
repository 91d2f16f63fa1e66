"""The examples/ trainers, each run in a short form against a real server."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from helpers.servers import ServerThread

from hingeloss import LossClient

pytest.importorskip("sklearn", reason="the examples extra is not installed")
pytest.importorskip("matplotlib", reason="the examples extra is not installed")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gan_digits = _example("gan_digits")
svm_digits = _example("svm_digits")
ddp_trainer = _example("ddp_trainer")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The examples' own setting: one intra-op thread beside the server on the same cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def client(shared_server: ServerThread) -> Iterator[LossClient]:
    with LossClient(shared_server.target) as loss_client:
        yield loss_client


def test_gan_remote_and_local_twins_agree(
    client: LossClient, one_thread: None, tmp_path: Path
) -> None:
    options = gan_digits.Options(steps=12, log_every=0, out=tmp_path / "gan.png")
    gans = gan_digits.train(options, client)
    remote, local = gans["remote"], gans["local"]

    fresh = gan_digits.Gan(gan_digits.LocalLosses(), options.seed, options.lr)
    assert not torch.equal(remote.generator[0].weight, fresh.generator[0].weight)
    weight = "0.parametrizations.weight.original"
    assert not torch.equal(
        remote.discriminator.state_dict()[weight], fresh.discriminator.state_dict()[weight]
    )
    for net in ("generator", "discriminator"):
        remote_state = getattr(remote, net).state_dict()
        local_state = getattr(local, net).state_dict()
        assert remote_state.keys() == local_state.keys()
        for name, tensor in remote_state.items():
            assert tensor.dtype == torch.float64
            torch.testing.assert_close(tensor, local_state[name], rtol=1e-9, atol=1e-9, msg=name)
    # The active share came from the server's answers; the local twin computed its own.
    assert remote.history.active == pytest.approx(local.history.active, abs=1e-12)
    assert remote.history.d_loss == pytest.approx(local.history.d_loss, rel=1e-9)
    assert min(remote.history.active) < 1.0  # D cleared the margin for some samples

    noise = torch.randn(16, gan_digits.NOISE_DIM, dtype=torch.float64)
    gan_digits.plot(gans, noise, options.out)
    assert options.out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert options.out.stat().st_size > 10_000


def test_gan_command_without_a_server(
    one_thread: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "local.png"
    assert gan_digits.main(["--local", "--steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "local: share of D's samples with non-zero loss" in printed
    assert "remote" not in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_svm_command_prints_both_accuracies(
    shared_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--target", shared_server.target, "--loss", "crammer-singer", "--iterations", "5"]
    assert svm_digits.main(argv) == 0
    printed = capsys.readouterr().out
    assert "crammer-singer (lbfgs, " in printed
    assert "scikit-learn LinearSVC: " in printed
    assert "support vectors" in printed


@pytest.mark.parametrize(
    ("loss", "optimizer"),
    [("weston-watkins", "lbfgs"), ("crammer-singer", "lbfgs"), ("crammer-singer", "sgd")],
)
def test_svm_within_two_points_of_linear_svc(client: LossClient, loss: str, optimizer: str) -> None:
    options = svm_digits.Options(loss=loss, optimizer=optimizer, iterations=100)
    outcome = svm_digits.run(options, client)
    assert outcome.accuracy >= outcome.sklearn_accuracy - 0.02, outcome
    assert outcome.sklearn_accuracy > 0.9
    assert 0.0 < outcome.support_fraction < 1.0, outcome  # some samples clear the margin


@pytest.mark.slow
def test_ddp_ranks_get_the_local_gradient(shared_server: ServerThread, tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        str(EXAMPLES / "ddp_trainer.py"),
        *("--target", shared_server.target, "--steps", "3", "--record", str(tmp_path)),
    ]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "requests per server batch, over 6 answers to 2 trainers" in completed.stdout
    assert "hingeloss_batch_requests_sum" in completed.stdout

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [len(steps) for steps in ranks] == [3, 3]
    reference = ddp_trainer.build_model()
    for step in range(3):
        records = [steps[step] for steps in ranks]
        reference.load_state_dict(records[0]["params"])
        reference.zero_grad()
        for record in records:  # DDP's average of each rank's mean loss
            loss = F.multi_margin_loss(reference(record["x"]), record["y"]) / len(records)
            loss.backward()  # type: ignore[no-untyped-call]
        assert not torch.equal(records[0]["y"], records[1]["y"])  # different shards
        for record in records:
            for name, parameter in reference.named_parameters():
                torch.testing.assert_close(
                    record["params"][name], parameter.detach(), rtol=0, atol=0, msg=name
                )
                torch.testing.assert_close(
                    record["grads"][name], parameter.grad, rtol=1e-10, atol=1e-12, msg=name
                )
