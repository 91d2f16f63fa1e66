"""Batching: the queue alone, with no server (tests/integration/test_batching_served.py
has the same batching seen by callers of a real server)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from helpers.cases import random_inputs, random_job

from hingeloss._requests import build_request
from hingeloss_server.config import BatchingConfig, LimitsConfig
from hingeloss_server.engine.batch_queue import Batcher
from hingeloss_server.engine.errors import (
    DeadlineExpiredError,
    DrainingError,
    InvalidInputError,
    OverloadedError,
)
from hingeloss_server.engine.jobs import LossJob
from hingeloss_server.engine.validation import PreparedJob, prepare, prepare_batch
from hingeloss_server.transport.request_codec import decode_request

LIMITS = LimitsConfig()


def _job(loss: str = "binary_hinge", rows: int = 4, classes: int = 3, **options: Any) -> LossJob:
    job: LossJob = random_job(loss, np.random.default_rng(), rows, classes, **options)
    return job


async def _next_jobs(batcher: Batcher) -> list[LossJob]:
    return [queued.job for queued in await batcher.next_batch()]


async def test_groups_by_key_and_respects_row_limit() -> None:
    batcher = Batcher(BatchingConfig(max_batch_rows=10))
    jobs = [_job(rows=4) for _ in range(3)] + [_job("multiclass_hinge", rows=2)]
    for job in jobs:
        batcher.submit(job)
    first = await _next_jobs(batcher)
    assert first == jobs[:2]  # 4 + 4 rows fit in 10, a third would not
    second = await _next_jobs(batcher)
    assert second == [jobs[2]]
    third = await _next_jobs(batcher)
    assert third == [jobs[3]]
    assert batcher.stats.requests == 0


async def test_never_mixes_options_dtypes_or_class_counts() -> None:
    batcher = Batcher(BatchingConfig())
    jobs = [
        _job("multiclass_hinge", classes=3),
        _job("multiclass_hinge", classes=4),
        _job("multiclass_hinge", classes=3, margin=2.0),
        _job("multiclass_hinge", classes=3, class_normalization="divide_by_num_classes"),
        _job("multiclass_hinge", classes=3),
    ]
    for job in jobs:
        batcher.submit(job)
    batches = [await _next_jobs(batcher) for _ in range(4)]
    assert sorted(len(b) for b in batches) == [1, 1, 1, 2]
    assert [jobs[0], jobs[4]] in batches


async def test_oversized_job_runs_alone() -> None:
    batcher = Batcher(BatchingConfig(max_batch_rows=2))
    job = _job(rows=9)
    batcher.submit(job)
    assert await _next_jobs(batcher) == [job]


async def test_earliest_deadline_first() -> None:
    batcher = Batcher(BatchingConfig())
    loop = asyncio.get_running_loop()
    late, urgent = _job("binary_hinge"), _job("gan_generator")
    batcher.submit(late, deadline=loop.time() + 60)
    batcher.submit(urgent, deadline=loop.time() + 5)
    assert await _next_jobs(batcher) == [urgent]
    assert await _next_jobs(batcher) == [late]


async def test_expired_and_cancelled_jobs_are_dropped() -> None:
    dropped: list[str] = []
    batcher = Batcher(BatchingConfig(), on_drop=lambda job, reason: dropped.append(reason))
    loop = asyncio.get_running_loop()
    expired, cancelled, live = _job(), _job(), _job()
    expired_future = batcher.submit(expired, deadline=loop.time() - 1)
    cancelled_future = batcher.submit(cancelled)
    batcher.submit(live)
    cancelled_future.cancel()
    await asyncio.sleep(0)  # let the cancellation callback run
    assert batcher.stats.requests == 2
    assert await _next_jobs(batcher) == [live]
    with pytest.raises(DeadlineExpiredError):
        expired_future.result()
    assert sorted(dropped) == ["cancelled", "deadline_exceeded"]
    assert batcher.stats.rows == 0


async def test_bounded_queue_and_draining() -> None:
    batcher = Batcher(BatchingConfig(max_queue_rows=10))
    batcher.submit(_job(rows=6))
    with pytest.raises(OverloadedError) as info:
        batcher.submit(_job(rows=6))
    assert info.value.retry_after_s > 0
    batcher.submit(_job(rows=4))
    batcher.close()
    with pytest.raises(DrainingError):
        batcher.submit(_job(rows=1))


async def test_delay_gathers_more_requests() -> None:
    batcher = Batcher(BatchingConfig(max_batch_delay_us=50_000))
    first = _job()
    batcher.submit(first)
    taking = asyncio.create_task(_next_jobs(batcher))
    await asyncio.sleep(0.01)
    second = _job()
    batcher.submit(second)
    assert await taking == [first, second]


async def test_byte_limit_keeps_large_requests_apart() -> None:
    small = [_job(rows=4) for _ in range(3)]
    big = [_job("multiclass_hinge", rows=64, classes=50) for _ in range(2)]
    limit = big[0].nbytes + 1
    batcher = Batcher(BatchingConfig(max_batch_bytes=limit))
    for job in [*big, *small]:
        batcher.submit(job)
    assert await _next_jobs(batcher) == [big[0]]
    assert await _next_jobs(batcher) == [big[1]]
    assert await _next_jobs(batcher) == small


async def test_many_distinct_keys_come_out_earliest_deadline_first() -> None:
    """Thousands of distinct keys (a client can make them): EDF across keys still holds."""
    batcher = Batcher(BatchingConfig())
    loop = asyncio.get_running_loop()
    template = _job(rows=1)
    deadlines = np.random.default_rng().permutation(5000)
    for i, offset in enumerate(deadlines):
        params = replace(template.key.params, margin=1.0 + i)
        job = LossJob(
            request_id=str(i),
            key=replace(template.key, params=params),
            options=template.options,
            inputs=template.inputs,
            input_fields=template.input_fields,
            labels=template.labels,
            rows=1,
            nbytes=8,
        )
        batcher.submit(job, deadline=loop.time() + 60 + float(offset))
    taken = [(await batcher.next_batch())[0] for _ in range(5000)]
    assert [queued.deadline for queued in taken] == sorted(queued.deadline for queued in taken)
    assert batcher.stats.requests == 0
    assert not batcher._queues  # noqa: SLF001 - every key is forgotten once empty


async def test_cancelled_keys_are_forgotten() -> None:
    batcher = Batcher(BatchingConfig())
    futures = [batcher.submit(_job("multiclass_hinge", classes=c)) for c in range(2, 12)]
    for future in futures:
        future.cancel()
    await asyncio.sleep(0)
    assert batcher.stats.requests == 0
    assert not batcher._queues  # noqa: SLF001 - the leak this guards against
    batcher.fail_all(RuntimeError("nothing left"))


async def test_requests_over_the_shared_limit_run_alone() -> None:
    """Batch by cost: a large request neither joins a batch nor is joined, delay or not."""
    small = [_job(rows=4) for _ in range(3)]
    big = _job(rows=64)
    config = BatchingConfig(max_shared_request_bytes=small[0].nbytes, max_batch_delay_us=20_000)
    batcher = Batcher(config)
    for job in [small[0], big, small[1], small[2]]:
        batcher.submit(job)
    assert await _next_jobs(batcher) == [small[0]]
    assert await _next_jobs(batcher) == [big]
    assert await _next_jobs(batcher) == small[1:]


async def test_a_batch_of_several_requests_stays_within_the_shared_byte_limit() -> None:
    """Requests share a batch only while it stays cache-sized, with a delay or without."""
    jobs = [_job(rows=4) for _ in range(5)]
    config = BatchingConfig(max_shared_batch_bytes=2 * jobs[0].nbytes, max_batch_delay_us=0)
    batcher = Batcher(config)
    for job in jobs:
        batcher.submit(job)
    assert await _next_jobs(batcher) == jobs[:2]
    assert await _next_jobs(batcher) == jobs[2:4]
    assert await _next_jobs(batcher) == jobs[4:]
    delayed = Batcher(replace(config, max_batch_delay_us=20_000))
    delayed.submit(jobs[0])
    taking = asyncio.create_task(_next_jobs(delayed))
    await asyncio.sleep(0)
    for job in jobs[1:]:
        delayed.submit(job)
    assert await taking == jobs[:2]


GATHER = BatchingConfig(max_gather_wait_us=50_000)


async def _join_soon(batcher: Batcher, job: LossJob) -> None:
    """Submits `job` a turn of the event loop after a batch has begun forming."""
    await asyncio.sleep(0)
    batcher.submit(job)


async def test_gathering_backs_off_while_waits_gather_nothing_and_resumes_once_one_pays() -> None:
    jobs = [_job() for _ in range(6)]
    batcher = Batcher(GATHER)
    batcher.submit(jobs[0])
    assert await _next_jobs(batcher) == [jobs[0]]  # waited 50 ms for nothing
    batcher.submit(jobs[1])
    joining = asyncio.create_task(_join_soon(batcher, jobs[2]))
    assert await _next_jobs(batcher) == [jobs[1]]  # so this batch did not wait
    await joining
    joining = asyncio.create_task(_join_soon(batcher, jobs[3]))
    assert await _next_jobs(batcher) == jobs[2:4]  # the back-off is spent: this one waited
    await joining
    batcher.submit(jobs[4])
    joining = asyncio.create_task(_join_soon(batcher, jobs[5]))
    assert await _next_jobs(batcher) == jobs[4:6]  # that wait paid: the next one waits too
    await joining


async def test_a_batch_cancelled_while_it_gathers_fails_its_jobs() -> None:
    """A worker stopped mid-wait leaves no caller waiting on a job it had taken."""
    job = _job()
    batcher = Batcher(GATHER)
    future = batcher.submit(job)
    taking = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0.01)  # the batch is taken and waiting to gather
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    with pytest.raises(DrainingError):
        future.result()


async def test_a_call_cancelled_while_its_batch_gathers_is_counted_as_dropped() -> None:
    dropped: list[str] = []
    gather = BatchingConfig(max_gather_wait_us=400_000)
    batcher = Batcher(gather, on_drop=lambda job, reason: dropped.append(reason))
    loop = asyncio.get_running_loop()
    leaving, expiring, staying = _job(), _job(), _job()
    # Its deadline passes while the batch still gathers, but its caller left well before
    # (more than DEADLINE_SLACK_S).
    leaving_future = batcher.submit(leaving, deadline=loop.time() + 0.25)
    expiring_future = batcher.submit(expiring, deadline=loop.time() + 0.03)
    batcher.submit(staying)
    taking = asyncio.create_task(_next_jobs(batcher))
    await asyncio.sleep(0.05)  # the three are taken and the batch waits to gather
    leaving_future.cancel()
    expiring_future.cancel()  # as gRPC cancels a call whose deadline passed
    assert await taking == [staying]
    assert sorted(dropped) == ["cancelled", "deadline_exceeded"]


async def test_no_gathering_wait_when_it_is_off() -> None:
    first, second = _job(), _job()
    batcher = Batcher(BatchingConfig(max_gather_wait_us=0))
    batcher.submit(first)
    joining = asyncio.create_task(_join_soon(batcher, second))
    assert await _next_jobs(batcher) == [first]
    await joining


def _batch_case(loss: str, rng: np.random.Generator, **options: Any) -> dict[str, np.ndarray]:
    inputs = random_inputs(loss, rng, 6, classes=4)
    if options.get("ignore_index") is not None:
        inputs["targets"][rng.integers(0, 6)] = options["ignore_index"]
    return inputs


BAD_VALUES: list[tuple[str, dict[str, Any], str, Any]] = [
    ("binary_hinge", {}, "scores", np.nan),
    ("binary_hinge", {}, "labels", 0),
    ("binary_hinge", {"label_encoding": "zero_one"}, "labels", -1),
    ("margin_ranking", {}, "scores_b", np.inf),
    ("multiclass_hinge", {}, "targets", 4),
    ("multiclass_hinge", {"ignore_index": -100}, "targets", -1),
    ("crammer_singer", {}, "scores", -np.inf),
    ("gan_discriminator", {}, "fake_scores", np.nan),
    ("multiclass_hinge", {}, "sample_weights", -1.0),
]


@pytest.mark.parametrize(("loss", "options", "field", "value"), BAD_VALUES)
def test_batch_value_checks_fail_the_culprit_alone(
    loss: str, options: dict[str, Any], field: str, value: Any
) -> None:
    """Checked once per batch: the bad job gets its own error, the others what they get alone."""
    rng = np.random.default_rng(7)
    cases = [_batch_case(loss, rng, **options) for _ in range(4)]
    for inputs in cases:
        if options.get("label_encoding") == "zero_one":
            inputs["labels"] = (inputs["labels"] > 0).astype(np.int64)
    weights = [rng.uniform(0.5, 2.0, 6) for _ in cases] if field == "sample_weights" else None
    target = cases[2] if field != "sample_weights" else {}
    if weights is not None:
        weights[2][3] = value
    else:
        target[field] = target[field].astype(np.float64 if field != "targets" else np.int64)
        target[field][3] = value
    jobs = []
    for i, inputs in enumerate(cases):
        extra = {} if weights is None else {"sample_weights": weights[i]}
        request, _ = build_request(loss, inputs, {**options, **extra})
        jobs.append(decode_request(request, LIMITS))
    together = prepare_batch(jobs)
    alone: list[Any] = []
    for job in jobs:
        try:
            alone.append(prepare(job))
        except InvalidInputError as error:
            alone.append(error)
    assert isinstance(together[2], InvalidInputError)
    assert isinstance(alone[2], InvalidInputError)
    assert (together[2].field, str(together[2])) == (alone[2].field, str(alone[2]))
    for i in (0, 1, 3):
        _assert_same_prepared(together[i], alone[i])
    # Without the bad job, the batch passes its checks together and prepares the same.
    good = [jobs[i] for i in (0, 1, 3)]
    for one, other in zip(prepare_batch(good), [alone[i] for i in (0, 1, 3)], strict=True):
        _assert_same_prepared(one, other)


def _assert_same_prepared(one: Any, other: Any) -> None:
    assert isinstance(one, PreparedJob)
    assert isinstance(other, PreparedJob)
    assert one.job is other.job
    assert (one.set_rows, one.samples, one.scales) == (other.set_rows, other.samples, other.scales)
    for name in ("labels", "targets", "ignore_mask"):
        a, b = getattr(one, name), getattr(other, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype
            assert torch.equal(a, b), name
