"""The per-device gate: batches side by side, a retry after running out of memory alone."""

from __future__ import annotations

import threading
import time

from hingeloss_server.engine.device_worker import DeviceGate

WAIT_S = 10.0


def test_a_retry_alone_waits_for_running_batches_and_holds_new_ones() -> None:
    gate = DeviceGate()
    order: list[str] = []
    batch_running, release_batch = threading.Event(), threading.Event()
    retry_waiting = threading.Event()

    def batch() -> None:
        with gate.shared():
            order.append("batch starts")
            batch_running.set()
            release_batch.wait(WAIT_S)
            order.append("batch ends")

    def retry() -> None:
        batch_running.wait(WAIT_S)
        retry_waiting.set()
        with gate.alone():
            order.append("retry alone")

    def late_batch() -> None:
        with gate.shared():
            order.append("late batch")

    threads = [threading.Thread(target=f) for f in (batch, retry)]
    for thread in threads:
        thread.start()
    retry_waiting.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while not gate._waiting_alone and time.monotonic() < deadline:  # the retry is at the gate
        time.sleep(0.001)
    # A batch arriving now queues behind the waiting retry instead of overtaking it.
    threads.append(threading.Thread(target=late_batch))
    threads[-1].start()
    time.sleep(0.05)
    release_batch.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert order == ["batch starts", "batch ends", "retry alone", "late batch"]


def test_batches_share_the_device() -> None:
    gate = DeviceGate()
    inside = threading.Barrier(2, timeout=WAIT_S)

    def batch() -> None:
        with gate.shared():
            inside.wait()  # both are inside at once, or this times out

    threads = [threading.Thread(target=batch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not inside.broken
