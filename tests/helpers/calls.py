"""Calls that a client could not make through the SDK: raw channels, broken streams."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc


def compute_without_a_request(channel: grpc.Channel, timeout: float) -> grpc.RpcError:
    """Calls Compute with headers only: its request message never comes, nor a half-close.

    Returns the error the call ends with (it must end with one).
    """
    stalled = threading.Event()

    def never_sent() -> Iterator[bytes]:
        stalled.wait(timeout + 30)
        yield b""  # pragma: no cover - never reached

    compute = channel.stream_unary("/hingeloss.v1.LossService/Compute")
    try:
        compute(never_sent(), timeout=timeout)
    except grpc.RpcError as error:
        return error
    finally:
        stalled.set()
    raise AssertionError("a call without a request was answered OK")
