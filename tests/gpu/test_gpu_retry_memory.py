"""A failed batch's tensors are freed before its requests are retried one by one.

After a CUDA out-of-memory error the retries fit only if the memory of the batch
that failed is free again, so nothing may keep it: neither the exception's
traceback while the retries run nor a log record of the failure. This holds on
every device, so it runs on the CPU too (and on CUDA where there is one).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import pytest
import torch
from helpers.cases import random_inputs

from hingeloss._requests import build_request
from hingeloss_server.config import LimitsConfig
from hingeloss_server.engine.device_worker import Worker
from hingeloss_server.engine.losses import weston_watkins
from hingeloss_server.transport.request_codec import decode_request

DEVICES = [
    "cpu",
    pytest.param(
        "cuda:0",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_failed_batch_is_freed_before_the_retries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, device: str
) -> None:
    rows = 4
    batches: list[weakref.ref[torch.Tensor]] = []
    batch_alive_at_retry: list[bool] = []
    kernel = weston_watkins.multiclass_hinge

    def out_of_memory_on_batches(scores: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if batches:
            batch_alive_at_retry.append(batches[0]() is not None)
        if scores.shape[0] > rows:
            batches.append(weakref.ref(scores))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return kernel(scores, *args, **kwargs)

    monkeypatch.setattr(weston_watkins, "multiclass_hinge", out_of_memory_on_batches)
    rng = np.random.default_rng(0)
    jobs = [
        decode_request(
            build_request("multiclass_hinge", random_inputs("multiclass_hinge", rng, rows), {})[0],
            LimitsConfig(),
        )
        for _ in range(3)
    ]
    worker = Worker("hingeloss-retry-test", torch.device(device), None)
    try:
        outcomes, _ = worker.run(jobs)
    finally:
        worker.close()

    assert len(batches) == 1, "the batch of three did not fail"
    assert batch_alive_at_retry == [False, False, False]
    assert [outcome.error for outcome in outcomes] == [None, None, None]
    assert "retrying each request alone" in caplog.text
