"""Fault injection for tests: a fault_hook that records, blocks, delays or fails batches.

`HingelossServer(config, fault_hook=hook)` calls the hook on the worker thread with
each batch's jobs just before compute, so what it records is exactly what was
computed (or attempted), by request id. `HeldWorker` is the one way tests hold a
server's only worker (its BLOCKER request computing) while they queue more behind it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Generic, TypeVar

from hingeloss_server.engine.jobs import LossJob

BLOCKER = "blocker"
# How long a held worker's blocker may take to answer once released.
PATIENCE_S = 60.0

T = TypeVar("T")


class FaultHook:
    """Records every batch by request id; holds the worker on BLOCKER; fails chosen ids.

    Args:
        fail: request id -> exception to raise whenever a batch holds that id.
        fail_batches_over: raise for any batch of more requests than this (a batch
            too large for the device that fits when split).
        delay_s: sleep this long in every batch of requests whose id starts with
            `delay_prefix` (a slow device, for overload tests).
    """

    def __init__(
        self,
        fail: dict[str, Callable[[], BaseException]] | None = None,
        *,
        fail_batches_over: int | None = None,
        delay_s: float = 0.0,
        delay_prefix: str = "",
    ) -> None:
        self.fail = dict(fail or {})
        self.fail_batches_over = fail_batches_over
        self.delay_s = delay_s
        self.delay_prefix = delay_prefix
        self.batches: list[list[str]] = []
        self._lock = threading.Lock()
        self._blocked = threading.Event()
        self._release = threading.Event()

    def __call__(self, jobs: Sequence[LossJob]) -> None:
        ids = [job.request_id for job in jobs]
        with self._lock:
            self.batches.append(ids)
        if BLOCKER in ids:
            self._blocked.set()
            self._release.wait(60)
        for request_id in ids:
            if request_id in self.fail:
                raise self.fail[request_id]()
        if self.fail_batches_over is not None and len(ids) > self.fail_batches_over:
            raise self.fail.get("*", lambda: RuntimeError("injected batch failure"))()
        if self.delay_s and any(i.startswith(self.delay_prefix) for i in ids):
            time.sleep(self.delay_s)

    def wait_blocked(self, timeout: float = 10.0) -> None:
        """Returns once the worker holds BLOCKER (and so takes nothing else)."""
        assert self._blocked.wait(timeout), "the blocker never reached the worker"

    def release(self) -> None:
        self._release.set()

    @property
    def computed(self) -> set[str]:
        """Every request id that reached compute, in any batch."""
        with self._lock:
            return {i for batch in self.batches for i in batch}

    def batches_with(self, request_id: str) -> list[list[str]]:
        with self._lock:
            return [list(b) for b in self.batches if request_id in b]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Polls a condition on server state owned by another thread (tests only)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


class HeldWorker(Generic[T]):
    """A server's only worker, held on a BLOCKER request until `release()`.

    `send` makes the blocker call (any client, any loss, with `request_id=BLOCKER`);
    it runs on a thread of its own and its answer is the future `blocker`. Entering
    waits until the worker holds it, so that what the test sends next queues behind
    it; leaving releases it (as `release()` does earlier) and waits for its answer,
    even when the test fails, so that no test leaves a worker stuck.
    """

    def __init__(self, hook: FaultHook, send: Callable[[], T]) -> None:
        self.hook = hook
        self._send = send
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="blocker")
        self.blocker: Future[T] = Future()

    def __enter__(self) -> HeldWorker[T]:
        self.blocker = self._pool.submit(self._send)
        try:
            self.hook.wait_blocked()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def release(self) -> None:
        """Lets the worker go and waits for the blocker to finish (its answer: `blocker`)."""
        self.hook.release()
        self.blocker.exception(PATIENCE_S)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
        self._pool.shutdown()
