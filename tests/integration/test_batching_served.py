"""Batching is invisible to callers of a real server: batched answers equal solo ones."""

from __future__ import annotations

import asyncio
import secrets
import threading
from typing import Any

import numpy as np
from helpers.cases import positional, random_inputs
from helpers.servers import server_config

from hingeloss import AsyncLossClient, LossClient, LossResult
from hingeloss_server.config import BatchingConfig

MIXED = [
    "binary_hinge",
    "multiclass_hinge",
    "crammer_singer",
    "gan_discriminator",
    "gan_generator",
    "margin_ranking",
]


def test_batching_is_invisible(make_server: Any) -> None:
    """64 concurrent callers, mixed losses and sizes: each gets exactly its solo answer."""
    # One worker and a short gathering window make batches form reliably on 2 cores.
    config = server_config(batching=BatchingConfig(max_batch_delay_us=2000))
    server = make_server(config)
    rng = np.random.default_rng(secrets.randbits(32))
    cases = []
    for i in range(64):
        loss = MIXED[i % len(MIXED)]
        cases.append(
            (
                loss,
                random_inputs(
                    loss,
                    rng,
                    int(rng.integers(1, 50)),
                    classes=5,
                    fake_rows=int(rng.integers(1, 30)),
                ),
            )
        )

    async def together() -> list[LossResult]:
        async with AsyncLossClient(server.target) as client:
            calls = [
                client.compute(loss, *positional(loss, inputs), return_per_sample=True)
                for loss, inputs in cases
            ]
            return await asyncio.gather(*calls)

    batched = asyncio.run(together())
    with LossClient(server.target) as client:
        alone = [
            client.compute(loss, *positional(loss, inputs), return_per_sample=True)
            for loss, inputs in cases
        ]
    assert max(r.timing.batch_requests for r in batched) > 1
    assert all(r.timing.batch_requests == 1 for r in alone)
    for together_result, solo in zip(batched, alone, strict=True):
        np.testing.assert_allclose(together_result.loss, solo.loss, rtol=1e-12, atol=0)
        for a, b in zip(
            together_result.grads + together_result.per_sample,
            solo.grads + solo.per_sample,
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
        assert together_result.active_samples == solo.active_samples


def test_bad_request_in_a_batch_fails_alone(make_server: Any) -> None:
    """A NaN request batched with valid ones: it gets INVALID_ARGUMENT, they get answers."""
    server = make_server(server_config(batching=BatchingConfig(max_batch_delay_us=20_000)))
    rng = np.random.default_rng()
    good = [random_inputs("binary_hinge", rng, 8) for _ in range(6)]
    bad = random_inputs("binary_hinge", rng, 8)
    bad["scores"][5] = np.nan
    results: dict[int, Any] = {}

    def call(index: int, inputs: dict[str, np.ndarray]) -> None:
        with LossClient(server.target) as client:
            try:
                results[index] = client.binary_hinge(inputs["scores"], inputs["labels"])
            except Exception as error:  # recorded for the assertions below
                results[index] = error

    threads = [threading.Thread(target=call, args=(i, x)) for i, x in enumerate([*good, bad])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    from hingeloss import InvalidArgumentError

    assert isinstance(results[6], InvalidArgumentError)
    assert results[6].field_violations[0].field == "binary_hinge.scores[5]"
    for i in range(6):
        assert not isinstance(results[i], Exception), results[i]
    assert max(results[i].timing.batch_requests for i in range(6)) > 1


def test_small_cpu_batches_run_on_the_event_loop_and_large_ones_on_the_worker_thread(
    make_server: Any,
) -> None:
    """Where a batch runs: below `inline_batch_bytes` on the loop (no thread hand-off)."""
    server = make_server()
    worker = server.server.pool.workers[0]
    limit = server.config.workers.inline_batch_bytes
    ran: list[tuple[int, str]] = []
    run = worker.run

    def observed(jobs: Any, **options: Any) -> Any:
        ran.append((sum(job.nbytes for job in jobs), threading.current_thread().name))
        return run(jobs, **options)

    worker.run = observed  # type: ignore[method-assign]
    rng = np.random.default_rng(secrets.randbits(32))
    with LossClient(server.target) as client:
        for rows in (4, limit // (4 * 50) + 1):  # float32, 50 classes: under, then over
            scores = rng.standard_normal((rows, 50)).astype(np.float32)
            client.multiclass_hinge(scores, rng.integers(0, 50, rows))
    (small, small_thread), (large, large_thread) = ran
    assert small <= limit < large
    assert small_thread == "hingeloss-test-server"  # the server's event loop
    assert large_thread.startswith(worker.name)
