"""One cell run in several spawned processes, their raw samples merged.

Spawned, never forked: gRPC must not be forked once started. Each process takes an
even share of the concurrency or rate.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hingeloss_bench.cells import CellSpec, ShareResult
from hingeloss_bench.loadgen import run_share


@dataclass
class _Counter:
    value: int = 0


ProgressHook = Callable[[int, float], None]


def _child(spec: CellSpec, index: int, count: int, progress: Any, results: Any) -> None:
    try:
        results.put((index, asyncio.run(run_share(spec, index, count, progress))))
    except BaseException as error:  # reported to the parent, which raises it
        results.put((index, f"{type(error).__name__}: {error}"))


def run_shares(
    spec: CellSpec, processes: int = 1, on_progress: ProgressHook | None = None
) -> list[ShareResult]:
    """Runs a cell in `processes` load processes (spawned) or in this one; returns each share.

    `on_progress(answered, elapsed_s)` is called a few times a second.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if spec.concurrency is not None and spec.concurrency < processes:
        raise ValueError(f"concurrency {spec.concurrency} is below the {processes} load processes")
    started = time.perf_counter()
    if processes == 1:
        counter = _Counter()

        async def local() -> ShareResult:
            task = asyncio.create_task(run_share(spec, 0, 1, counter))
            while not task.done():
                if on_progress is not None:
                    on_progress(counter.value, time.perf_counter() - started)
                await asyncio.wait({task}, timeout=0.25)
            return task.result()

        result = asyncio.run(local())
        if on_progress is not None:
            on_progress(counter.value, time.perf_counter() - started)
        return [result]

    context = multiprocessing.get_context("spawn")
    results: Any = context.Queue()
    counters = [context.Value("q", 0, lock=False) for _ in range(processes)]
    children = [
        context.Process(
            target=_child,
            args=(spec, i, processes, counters[i], results),
            name=f"hingeloss-bench-{i}",
            daemon=True,
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    collected: dict[int, ShareResult | str] = {}
    try:
        while len(collected) < processes:
            try:
                index, outcome = results.get(timeout=0.25)
                collected[index] = outcome
            except queue.Empty:
                dead = [c for c in children if not c.is_alive() and c.exitcode not in (0, None)]
                if dead and len(collected) < processes and results.empty():
                    raise RuntimeError(
                        f"load process {dead[0].name} exited with code {dead[0].exitcode}"
                    ) from None
            if on_progress is not None:
                on_progress(sum(c.value for c in counters), time.perf_counter() - started)
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.terminate()
    failures = [o for o in collected.values() if isinstance(o, str)]
    if failures:
        raise RuntimeError(f"a load process failed: {failures[0]}")
    return [o for _, o in sorted(collected.items()) if not isinstance(o, str)]
