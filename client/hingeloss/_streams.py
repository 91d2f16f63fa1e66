"""The state of one ComputeStream call, shared by LossStream (threads) and AsyncLossStream.

A stream answers its requests in the order they were written, so one queue of
futures in that order is all it takes to match answers to callers. StreamState
keeps that queue and everything else that decides a future's fate: the slots
that bound how many answers are awaited at once, per-request deadlines, and the
end of the stream. The two flavours only move bytes (a request iterator and a
reader thread, or a writer and a reader task) and wait in their own way.

Rules every path keeps:

- A request's future is in exactly one place until it resolves: queued (not yet
  written, in call order) or pending (written, in stream order).
- A slot is held from the moment it is taken for a request until that request's
  future is done, however it got done (answer, error, deadline, cancellation);
  a done-callback gives it back, so no path can leak one.
- Every end of the stream (an error status, end-of-stream, cancellation, a
  broken writer or reader) is terminal: whatever is queued or pending fails at
  once, and later calls fail without being sent.
- A response that fails to decode fails its own future only.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from hingeloss._errors import DeadlineExceededError, HingelossError, StreamAbortedError
from hingeloss._requests import InputKind, build_request
from hingeloss._results import LossResult, decode_response
from hingeloss.v1 import loss_service_pb2 as pb


class ResultFuture(Protocol):
    """What both `concurrent.futures.Future` and `asyncio.Future` offer."""

    def done(self) -> bool: ...

    def set_result(self, result: LossResult, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...


F = TypeVar("F", bound=ResultFuture)


class UseClientTimeout(enum.Enum):
    """Default of `stream(timeout=...)`: each request gets the client's per-call timeout."""

    TIMEOUT = "the client's timeout"


CLIENT_TIMEOUT = UseClientTimeout.TIMEOUT


@dataclass(frozen=True)
class StreamSettings:
    """What `stream()` asked for, with the client's timeout resolved.

    Attributes:
        max_in_flight: futures unresolved at once.
        timeout: seconds each request may wait for its answer; None: no limit.
        stream_timeout: deadline of the whole call; None: none.
    """

    max_in_flight: int
    timeout: float | None
    stream_timeout: float | None

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")


def build_stream_request(
    loss: str, inputs: dict[str, Any], options: dict[str, Any]
) -> tuple[pb.ComputeRequest, InputKind]:
    """A request for a stream, whose calls take their timeout from `stream()` alone."""
    if options.pop("timeout", None) is not None:
        raise TypeError("stream calls take no per-call timeout; set it on stream()")
    return build_request(loss, inputs, options)


class Step(enum.Enum):
    """What a writer should do when there is nothing to write."""

    WAIT = "wait for a call or close()"
    STOP = "half-close: the stream is closing or over"


@dataclass(eq=False)
class StreamItem(Generic[F]):
    """One call on a stream: its future, and what its answer is decoded into."""

    future: F
    kind: InputKind
    request_id: str
    request: pb.ComputeRequest | None
    deadline: float | None
    holds_slot: bool = False
    index: int = -1  # position among the requests written, once written

    def take_request(self) -> pb.ComputeRequest:
        """The request, to write it; the stream keeps no reference to its bytes."""
        request, self.request = self.request, None
        assert request is not None
        return request


def settle(
    future: ResultFuture, result: LossResult | None = None, error: BaseException | None = None
) -> None:
    """Resolves a future unless it is done already (the caller may cancel it at any time)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except (asyncio.InvalidStateError, concurrent.futures.InvalidStateError):
        pass  # cancelled between the check and the call


def _names_a_request(error: BaseException) -> bool:
    """Whether the server attributed the error to one request of the stream.

    A request's error names it in its ErrorInfo (`streamIndex`, `requestId`). Errors
    of the stream itself concern every request: those of the call (connection lost,
    its deadline, cancellation, authentication) and the server's own end of the
    stream (shutting down, the request stream broken), whose ErrorInfo names none.
    """
    if not isinstance(error, HingelossError) or isinstance(error, StreamAbortedError):
        return False
    return "streamIndex" in error.metadata or "requestId" in error.metadata


def _culprit(error: HingelossError, pending: list[StreamItem[F]]) -> StreamItem[F] | None:
    """The pending request that the error belongs to.

    Named by the ErrorInfo's `streamIndex` (then `requestId`); failing a match, the
    first still pending, since the server answers every request before the failing
    one first.
    """
    index = error.metadata.get("streamIndex")
    if index is not None and index.isdigit():
        for item in pending:
            if item.index == int(index):
                return item
    request_id = error.metadata.get("requestId")
    if request_id:
        for item in pending:
            if item.request_id[: len(request_id)] == request_id:
                return item
    return pending[0] if pending else None


@dataclass(frozen=True)
class _End:
    """Why the stream is over."""

    error: BaseException
    names_a_request: bool

    def refusal(self) -> BaseException:
        if self.names_a_request:
            assert isinstance(self.error, HingelossError)
            return StreamAbortedError(self.error)
        return self.error


class StreamState(Generic[F]):
    """Order, slots, deadlines and the end of one stream; thread-safe.

    Args:
        release_slot: gives a slot back (the flavour's semaphore).
        on_change: wakes the flavour's writer and deadline timer (after a call
            is queued, on close(), and at the end of the stream).
        clock: monotonic seconds (`time.monotonic` or the event loop's clock).
        timeout: seconds each request may wait for its answer; None: no limit.
    """

    def __init__(
        self,
        *,
        release_slot: Callable[[], None],
        on_change: Callable[[], None],
        clock: Callable[[], float],
        timeout: float | None,
    ) -> None:
        self.release_slot = release_slot
        self.on_change = on_change
        self.clock = clock
        self.timeout = timeout
        self._lock = threading.Lock()
        self._queued: collections.deque[StreamItem[F]] = collections.deque()
        self._pending: collections.deque[StreamItem[F]] = collections.deque()
        # Calls with a deadline, in call order (so deadline order); done ones are
        # dropped from the front as they resolve, so no result outlives its caller's interest.
        self._timed: collections.deque[StreamItem[F]] = collections.deque()
        self._written = 0
        self._closing = False
        self._end: _End | None = None

    # -- calls ------------------------------------------------------------------

    def deadline(self) -> float | None:
        """The deadline of a request submitted now."""
        return None if self.timeout is None else self.clock() + self.timeout

    def _refusal_locked(self) -> BaseException | None:
        if self._closing:
            return RuntimeError("the stream is closed")
        if self._end is not None:
            return self._end.refusal()
        return None

    def refusal(self) -> BaseException | None:
        """The error a new call would fail with at once, or None while the stream is open."""
        with self._lock:
            return self._refusal_locked()

    def submit(
        self,
        future: F,
        kind: InputKind,
        request: pb.ComputeRequest,
        *,
        deadline: float | None,
        holds_slot: bool = False,
    ) -> None:
        """Queues a call behind every earlier one, or fails it at once if the stream is over."""
        item = StreamItem(future, kind, request.request_id, request, deadline, holds_slot)
        future.add_done_callback(lambda _: self._resolved(item))
        with self._lock:
            refusal = self._refusal_locked()
            if refusal is None:
                self._queued.append(item)
                if deadline is not None:
                    self._timed.append(item)
        if refusal is not None:
            item.request = None
            settle(future, error=refusal)
            return
        self.on_change()

    def _resolved(self, item: StreamItem[F]) -> None:
        """Done-callback of every call's future: frees its slot, forgets finished deadlines."""
        with self._lock:
            held, item.holds_slot = item.holds_slot, False
            while self._timed and self._timed[0].future.done():
                self._timed.popleft()
        if held:
            self.release_slot()

    # -- the writer ---------------------------------------------------------------

    def next_write(self, *, slot: bool) -> StreamItem[F] | Step:
        """The next request to write, now counted as pending; or what to do instead.

        Calls whose futures are already done (cancelled, or past their deadline)
        are dropped unsent. `slot`: the writer holds a free slot, which the
        returned item takes over when it holds none (the asyncio writer takes
        slots itself; sync callers take theirs before submitting).
        """
        with self._lock:
            while self._queued:
                item = self._queued.popleft()
                if item.future.done():
                    item.request = None
                    continue
                if not item.holds_slot:
                    if not slot:
                        raise RuntimeError("a request without a slot reached the writer")
                    item.holds_slot = True
                item.index = self._written
                self._written += 1
                self._pending.append(item)
                return item
            if self._end is not None or self._closing:
                return Step.STOP
            return Step.WAIT

    def close(self) -> None:
        """No more calls: the writer half-closes once every queued call is written."""
        with self._lock:
            self._closing = True
        self.on_change()

    # -- the reader ---------------------------------------------------------------

    def answer(self, response: pb.ComputeResponse) -> None:
        """Resolves the oldest pending call with a response; a bad response fails it alone."""
        with self._lock:
            item = self._pending.popleft() if self._pending else None
        if item is None:
            self.finish(HingelossError("the server sent an answer to no request"))
            return
        if item.future.done():
            return  # cancelled or past its deadline: nobody takes this answer
        try:
            result = decode_response(response, item.kind)
        except Exception as error:  # this answer's decoding failed, not the stream
            settle(item.future, error=error)
        else:
            settle(item.future, result)

    def broken(self, action: str, error: Exception) -> None:
        """Ends the stream on a local failure, e.g. `broken("reading the stream", error)`."""
        failure = HingelossError(f"{action} failed: {error!r}")
        failure.__cause__ = error
        self.finish(failure)

    def finish_eof(self) -> None:
        """The server ended the stream cleanly."""
        self.finish(HingelossError("the server ended the stream before answering this request"))

    def finish(self, error: BaseException) -> None:
        """Ends the stream: fails what is queued or pending; later calls fail at once.

        An error the server attributed to one request goes to that request (the
        first pending one unless its ErrorInfo names another); the others get a
        StreamAbortedError naming it. Any other error goes to every request.
        Only the first end counts.
        """
        with self._lock:
            if self._end is not None:
                return
            names_a_request = _names_a_request(error)
            self._end = _End(error, names_a_request)
            pending = list(self._pending)
            queued = list(self._queued)
            self._pending.clear()
            self._queued.clear()
            self._timed.clear()
        for item in queued:
            item.request = None
        failures: list[tuple[StreamItem[F], BaseException]]
        if names_a_request:
            assert isinstance(error, HingelossError)
            culprit = _culprit(error, pending)
            failures = [
                (item, error if item is culprit else StreamAbortedError(error))
                for item in pending + queued
            ]
        else:
            failures = [(item, error) for item in pending + queued]
        for item, failure in failures:
            settle(item.future, error=failure)
        self.on_change()

    @property
    def ended(self) -> bool:
        with self._lock:
            return self._end is not None

    # -- deadlines ----------------------------------------------------------------

    def expire(self) -> float | None:
        """Fails every call past its deadline; returns the next deadline, or None.

        The call stays in the stream's order (its answer may still come, and is
        then dropped); its slot is free again at once.
        """
        now = self.clock()
        expired = []
        with self._lock:
            while self._timed:
                item = self._timed[0]
                if item.future.done():
                    self._timed.popleft()
                elif item.deadline is not None and item.deadline <= now:
                    expired.append(self._timed.popleft())
                else:
                    break
            upcoming = self._timed[0].deadline if self._timed else None
        for item in expired:
            settle(
                item.future,
                error=DeadlineExceededError(
                    f"no answer on the stream within {self.timeout:g} s "
                    "(stream(timeout=None) waits without a limit)"
                ),
            )
        return upcoming
