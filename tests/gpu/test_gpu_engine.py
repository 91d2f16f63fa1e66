"""The GPU engine: batching invisible to one ulp, pinned buffers reused safely, faults.

Every test here needs CUDA; they skip without it.
"""

from __future__ import annotations

import gc
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import torch
from helpers.cases import random_inputs
from helpers.servers import ServerProcess, server_config
from prometheus_client import CollectorRegistry

from hingeloss import NO_RETRY, LossClient, UnavailableError
from hingeloss._health import check
from hingeloss._requests import build_request
from hingeloss_server.config import BatchingConfig, LimitsConfig, WorkerConfig
from hingeloss_server.engine import device_worker
from hingeloss_server.engine.compute import compute_batch
from hingeloss_server.engine.jobs import JobResult, LossKind
from hingeloss_server.engine.staging import DOWNLOAD_BLOCKS, DeviceStaging
from hingeloss_server.engine.validation import PreparedJob, prepare
from hingeloss_server.transport.request_codec import decode_request

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
DEVICE = torch.device("cuda", 0)
ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(os.environ.get("HINGELOSS_TEST_SEED", secrets.randbits(32)))
    print(f"HINGELOSS_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def prepared(loss: str, inputs: dict[str, Any], **options: Any) -> PreparedJob:
    request, _ = build_request(loss, inputs, {"return_per_sample": True, **options})
    return prepare(decode_request(request, LimitsConfig()))


def computed(jobs: list[PreparedJob], staging: DeviceStaging) -> list[JobResult]:
    with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream(DEVICE)):  # type: ignore[no-untyped-call]
        results = compute_batch(jobs, DEVICE, 0, staging).results
    assert all(isinstance(r, JobResult) for r in results), results
    return results  # type: ignore[return-value]


def as_array(wire: Any, dtype: npt.DTypeLike) -> np.ndarray:
    return np.frombuffer(wire.data, dtype=dtype).reshape(wire.shape)


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("loss", [kind.value for kind in LossKind])
def test_batched_equals_alone_on_cuda(loss: str, power: int, rng: np.random.Generator) -> None:
    """Rows 1, 7 and 300 of 1000 classes, float32: alone and batched agree.

    Gradients of the hinge (p = 1) are elementwise or exact counts: equal bit for bit.
    Row sums (per-sample losses, the squared hinge's true class) accumulate in float64
    on CUDA, so the two agree to one float32 ulp however CUDA splits the rows.
    """
    options = (
        {"power": power} if loss in ("binary_hinge", "multiclass_hinge", "crammer_singer") else {}
    )
    if power == 2 and not options:
        pytest.skip("no squared variant")
    sizes = (1, 7, 300)
    inputs = [
        {
            k: v.astype(np.float32) if v.dtype == np.float64 else v
            for k, v in random_inputs(loss, rng, n, 1000, fake_rows=n + 2).items()
        }
        for n in sizes
    ]
    staging = DeviceStaging(DEVICE, 64 * MIB)
    batched = computed([prepared(loss, x, **options) for x in inputs], staging)
    alone = [computed([prepared(loss, x, **options)], staging)[0] for x in inputs]
    for together, single in zip(batched, alone, strict=True):
        for a, b in zip(together.grads, single.grads, strict=True):
            got, want = as_array(a, np.float32), as_array(b, np.float32)
            if power == 1:
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=2**-23, atol=0)
        for a, b in zip(together.per_sample, single.per_sample, strict=True):
            np.testing.assert_allclose(
                as_array(a, np.float32), as_array(b, np.float32), rtol=2**-23, atol=0
            )
        assert together.loss == pytest.approx(single.loss, rel=2**-22, abs=0)
        assert together.active == single.active


def test_answers_keep_their_pinned_block_until_dropped(rng: np.random.Generator) -> None:
    """While answers hold both download blocks, a third batch goes pageable; none is overwritten."""
    staging = DeviceStaging(DEVICE, 8 * MIB)
    inputs = [random_inputs("multiclass_hinge", rng, 64, 100) for _ in range(DOWNLOAD_BLOCKS + 1)]
    held = [computed([prepared("multiclass_hinge", x)], staging)[0] for x in inputs]
    first = bytes(held[0].grads[0].data)  # type: ignore[union-attr]
    leases = [r.host_lease for r in held]
    assert leases[0] is not None
    assert leases[1] is not None
    assert leases[0] != leases[1]
    assert leases[2] is None  # both blocks were taken: pageable
    again = computed([prepared("multiclass_hinge", inputs[0])], staging)[0]
    assert again.host_lease is None
    assert bytes(held[0].grads[0].data) == first  # type: ignore[union-attr]
    assert bytes(again.grads[0].data) == first  # type: ignore[union-attr]
    del held, leases, again
    gc.collect()
    reused = computed([prepared("multiclass_hinge", inputs[1])], staging)[0]
    assert reused.host_lease is not None


def test_an_oversized_request_goes_through_pageable_memory(rng: np.random.Generator) -> None:
    staging = DeviceStaging(DEVICE, 1 * MIB)
    inputs = random_inputs("multiclass_hinge", rng, 2048, 1000)  # 16 MiB of float64 scores
    result = computed([prepared("multiclass_hinge", inputs)], staging)[0]
    assert result.host_lease is None
    reference = computed([prepared("multiclass_hinge", inputs)], DeviceStaging(DEVICE, 64 * MIB))
    assert bytes(result.grads[0].data) == bytes(reference[0].grads[0].data)  # type: ignore[union-attr]


def test_pinned_memory_is_reported_per_device(make_server: Any) -> None:
    registry = CollectorRegistry()
    batching = BatchingConfig(max_batch_bytes=16 * MIB, max_batch_rows=4096)
    server = make_server(
        server_config(workers=WorkerConfig(devices=("cuda:0", "cpu")), batching=batching),
        registry=registry,
    )
    expected = (1 + DOWNLOAD_BLOCKS) * device_worker.staging_bytes(batching)
    gauge = "hingeloss_pinned_host_bytes"
    pinned = registry.get_sample_value(gauge, {"device": "cuda:0"})
    assert pinned is not None
    assert pinned >= expected
    assert registry.get_sample_value(gauge, {"device": "cpu"}) == 0
    assert server.server.pool.workers[0].staging.pinned_bytes >= expected


def test_the_full_size_warm_up_leaves_the_memory_reserved(make_server: Any) -> None:
    torch.cuda.empty_cache()
    batching = BatchingConfig(max_batch_bytes=64 * MIB)
    make_server(server_config(workers=WorkerConfig(devices=("cuda:0",)), batching=batching))
    assert torch.cuda.memory_reserved(DEVICE) >= 64 * MIB


def test_a_failed_pinned_allocation_counts_as_out_of_memory() -> None:
    with pytest.raises(RuntimeError) as failed:
        torch.empty(1 << 50, dtype=torch.uint8, pin_memory=True)
    assert device_worker._out_of_memory(failed.value), str(failed.value)


def test_a_sticky_device_fault_turns_health_not_serving(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """After a device-side assert the worker fails every call UNAVAILABLE and health says so."""
    pythonpath = [str(ROOT / "client"), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")]
    server = ServerProcess(
        [sys.executable, str(ROOT / "tests" / "gpu" / "poisoned_server.py")],
        tmp_path,
        env={"PYTHONPATH": os.pathsep.join(pythonpath)},
    ).start()
    try:
        server.wait_ready(60)
        target = server.target
        inputs = random_inputs("binary_hinge", rng, 8)
        with LossClient(target, retry=NO_RETRY) as client:
            client.binary_hinge(inputs["scores"], inputs["labels"])  # serving
            for request_id in ("poison", "after"):
                with pytest.raises(UnavailableError) as failed:
                    client.binary_hinge(inputs["scores"], inputs["labels"], request_id=request_id)
                assert failed.value.code == grpc.StatusCode.UNAVAILABLE
                assert failed.value.reason == "DEVICE_FAILED"
        deadline = time.monotonic() + 10
        while check(target) != "NOT_SERVING":
            assert time.monotonic() < deadline, "health still SERVING after the device failed"
            time.sleep(0.1)
    finally:
        server.kill()


@pytest.mark.timeout(240)  # compiles about 64 variants of the kernel
def test_the_fused_kernel_matches_eager_bit_for_bit_on_cuda() -> None:
    """Compiled, every dtype and option: the gradient equals eager's bit for bit."""
    fused_interpreted = pytest.importorskip("helpers.fused_interpreted")
    pytest.importorskip("triton")
    try:
        assert fused_interpreted.main(secrets.randbits(32), "cuda") == 0
    finally:
        torch.set_default_device("cpu")
