"""What a batch moves between host and device, and how often the host waits for it.

Each test runs on the CPU and, where CUDA is present, on the GPU: on the CPU every
read of a tensor's value into Python (bool, item, tolist, numpy, ...) before the
batch's one wait is counted, since on a device each would be a synchronisation;
on the GPU torch's own sync debug mode turns any implicit one into an error.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from helpers.cases import random_inputs
from torch.overrides import TorchFunctionMode

from hingeloss._requests import build_request
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.compute import compute_batch
from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.engine.figures import Downloads, pack_figures
from hingeloss_server.engine.jobs import JobResult, LossKind
from hingeloss_server.engine.row_flags import not_finite_rows
from hingeloss_server.engine.staging import DeviceStaging
from hingeloss_server.engine.validation import PreparedJob, prepare
from hingeloss_server.transport.request_codec import decode_request

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]

# Tensor methods that read a value into Python: on a device each waits for it.
HOST_READS = {
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.nonzero,
    torch.nonzero,
}


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(os.environ.get("HINGELOSS_TEST_SEED", secrets.randbits(32)))
    print(f"HINGELOSS_TEST_SEED={seed}")
    return np.random.default_rng(seed)


class HostReads(TorchFunctionMode):
    """Records the host reads of tensor values, and where the batch's wait fell."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in HOST_READS:
            self.events.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class CountingStaging(DeviceStaging):
    """The worker's staging, noting each wait in the event log of a HostReads."""

    def __init__(self, device: torch.device, reads: HostReads) -> None:
        super().__init__(device, 8 << 20)
        # On the CPU too, the path a device takes: no shortcut through a host read.
        self.host_reads_free = False
        self.reads = reads
        self.uploads: list[tuple[torch.dtype, int]] = []

    def upload(self, parts: Any) -> torch.Tensor:
        self.uploads += [(p.dtype, p.numel()) for p in parts]
        return super().upload(parts)

    def wait(self) -> None:
        self.reads.events.append("WAIT")
        super().wait()


@contextmanager
def no_implicit_sync(device: str) -> Iterator[None]:
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def prepared(
    loss: str, rng: np.random.Generator, rows: int, classes: int = 5, **options: Any
) -> PreparedJob:
    inputs = random_inputs(loss, rng, rows, classes, fake_rows=rows + 1)
    request, _ = build_request(loss, inputs, options)
    return prepare(decode_request(request, LimitsConfig()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("loss", "classes"),
    [(kind.value, 5) for kind in LossKind] + [("multiclass_hinge", 300)],  # 300: fused on CUDA
)
def test_a_batch_reads_nothing_before_its_one_wait(
    device: str, loss: str, classes: int, rng: np.random.Generator
) -> None:
    """Losses, activity, overflow flags and margins come back together, after one wait."""
    jobs = [
        prepared(loss, rng, 5, classes),
        prepared(loss, rng, 3, classes, return_per_sample=True, gradient_format="row_sparse"),
        prepared(loss, rng, 4, classes, gradient_format="none"),
    ]
    reads = HostReads()
    staging = CountingStaging(torch.device(device), reads)
    with torch.inference_mode(), no_implicit_sync(device), reads:
        output = compute_batch(jobs, torch.device(device), 4, staging)
    assert all(isinstance(r, JobResult) for r in output.results), output.results
    assert reads.events.count("WAIT") == 1, reads.events
    before_wait = reads.events[: reads.events.index("WAIT")]
    assert before_wait == [], f"host reads before the batch's wait: {before_wait}"


@pytest.mark.parametrize("device", DEVICES)
def test_binary_hinge_uploads_five_bytes_a_row_at_float32(
    device: str, rng: np.random.Generator
) -> None:
    """Scores (4 bytes) and int8 labels (1) per row; the mean's scale travels once a request."""
    rows = 1000
    jobs = [
        prepare(
            decode_request(
                build_request(
                    "binary_hinge",
                    {
                        "scores": rng.normal(size=rows).astype(np.float32),
                        "labels": rng.choice([-1, 1], size=rows),
                    },
                    {},
                )[0],
                LimitsConfig(),
            )
        )
        for _ in range(3)
    ]
    staging = CountingStaging(torch.device(device), HostReads())
    with torch.inference_mode():
        compute_batch(jobs, torch.device(device), 0, staging)
    per_row = sum(d.itemsize * n for d, n in staging.uploads if n == rows)
    assert per_row == 3 * rows * 5, staging.uploads
    # Besides: one float32 scale and one int64 row count per request (and, where the
    # fused kernel runs, the margin, once per worker).
    others = sum(d.itemsize * n for d, n in staging.uploads if n != rows)
    assert others <= 3 * (4 + 8) + 4, staging.uploads


@pytest.mark.parametrize("device", DEVICES)
def test_class_weights_travel_once_per_batch_key(device: str, rng: np.random.Generator) -> None:
    weights = rng.uniform(0.5, 2.0, size=7)
    staging = CountingStaging(torch.device(device), HostReads())
    for _ in range(3):
        jobs = [prepared("multiclass_hinge", rng, 4, 7, class_weights=weights)]
        with torch.inference_mode():
            compute_batch(jobs, torch.device(device), 0, staging)
    sent = [count for dtype, count in staging.uploads if count == weights.size]
    assert sent == [weights.size], staging.uploads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ignored", [False, True], ids=["counted-row", "ignored-row"])
def test_scores_checked_on_the_device_give_the_host_error(device: str, ignored: bool) -> None:
    """A NaN found after the upload fails its request with the host check's very error."""
    scores = np.array([[0.5, 1.0, 2.0], [1.0, np.inf, 0.0], [0.0, 0.0, 0.0]])
    targets = np.array([0, -100 if ignored else 1, 2])
    request, _ = build_request(
        "multiclass_hinge", {"scores": scores, "targets": targets}, {"ignore_index": -100}
    )
    job = decode_request(request, LimitsConfig())
    with pytest.raises(InvalidInputError) as on_host:
        prepare(job)
    fine = prepared("multiclass_hinge", np.random.default_rng(0), 4, 3)
    with torch.inference_mode():
        output = compute_batch(
            [fine, prepare(job, check_scores=False)],
            torch.device(device),
            0,
            DeviceStaging(torch.device(device)),
            scores_checked=False,
        )
    assert isinstance(output.results[0], JobResult)
    error = output.results[1]
    assert isinstance(error, InvalidInputError)
    assert (error.field, error.description) == (on_host.value.field, on_host.value.description)
    assert error.field == "multiclass_hinge.scores[1][1]"


def test_packed_figures_read_back_as_computed(rng: np.random.Generator) -> None:
    """The one buffer a GPU batch downloads: losses, margins, activity and flags intact."""
    sizes = [7, 3]
    per_sample = [torch.from_numpy(rng.normal(size=n)).float() for n in sizes]
    active = [torch.from_numpy(rng.random(n) < 0.5) for n in sizes]
    flags = [torch.from_numpy(rng.integers(0, 16, size=n).astype(np.uint8)) for n in sizes]
    margins = torch.from_numpy(rng.normal(size=4)).float()
    packed = pack_figures(per_sample, active, flags, margins)
    assert packed.numel() == 4 * (10 + 4) + 10  # 4-byte values, then one byte a row
    figures = Downloads([packed], sizes, torch.float32, (), (), None).read_figures()
    for s in range(2):
        np.testing.assert_array_equal(figures.per_sample[s], per_sample[s].numpy())
        np.testing.assert_array_equal(figures.active[s], active[s].numpy())
        np.testing.assert_array_equal(figures.flags[s] & 15, flags[s].numpy())
        # The activity bit is not among the flags: an active row is not a flagged one.
        np.testing.assert_array_equal(figures.flags[s], flags[s].numpy())
    assert torch.equal(figures.margins, margins)


def test_rows_summing_past_the_range_are_not_flagged_on_the_cpu() -> None:
    """The CPU's shortcut (row sums) rechecks exactly: finite rows stay unflagged."""
    grad = torch.tensor([[3e38, 3e38], [1.0, float("nan")], [float("-inf"), 0.0], [1.0, 2.0]])
    for reads_free in (True, False):
        flagged = not_finite_rows(grad, reads_free=reads_free)
        assert flagged.tolist() == [False, True, True, False]
