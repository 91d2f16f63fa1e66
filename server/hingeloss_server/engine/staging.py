"""Host <-> device transfers of one worker: pinned buffers it keeps, one wait per batch.

On CUDA every upload is a copy into a pinned arena followed by a non-blocking
copy to the device, and every download a non-blocking copy into a pinned block;
the batch then waits once, on one event. The worker keeps its pinned memory for
its whole life (sized from --max-batch-bytes), instead of asking the caching
host allocator for fresh blocks per tensor per batch, which rounds each up to a
power of two and never returns them. What does not fit goes through pageable
memory (slower, and the copy blocks), so an oversized request still works.

On the CPU nothing moves: uploads are the host tensors themselves (or their
concatenation) and downloads are the results.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

# Offsets inside an arena are rounded up to this, so every view is aligned for any dtype.
_ALIGN = 64
# Download blocks per worker: one being filled while the previous batch's answers are sent.
DOWNLOAD_BLOCKS = 2
# Batch keys whose class weights stay on the device.
CLASS_WEIGHT_CACHE = 64


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * dtype.itemsize


class _Arena:
    """A pinned byte buffer handed out front to back, then reset for the next batch."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.offset = 0

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
        nbytes = _nbytes(shape, dtype)
        end = self.offset + nbytes
        if end > self.buffer.numel():
            return None
        view = self.buffer[self.offset : end].view(dtype).view(tuple(shape))
        self.offset = _aligned(end)
        return view


@dataclass(frozen=True)
class HostLease:
    """Held by every answer whose bytes live in a pinned block; the block is reused after.

    Dropping the last reference returns the block to its worker (weakref.finalize):
    no answer's bytes are overwritten while the answer is alive.
    """

    block: int


class DeviceStaging:
    """One worker's transfers to and from its device.

    Args:
        device: The worker's device.
        arena_bytes: Size of the pinned upload arena and of each download block
            (0: no pinned memory; every transfer is pageable).
    """

    def __init__(self, device: torch.device, arena_bytes: int = 0) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        # Reading a value on the host waits for nothing on the CPU; on a device it syncs.
        self.host_reads_free = not self.cuda
        self._upload: _Arena | None = None
        self._blocks: list[torch.Tensor] = []
        self._free_blocks: list[int] = []
        self._lock = threading.Lock()
        # Copies were queued since the last wait (a batch that failed half-way).
        self._unwaited = False
        self._cache: dict[Hashable, torch.Tensor] = {}
        self.pinned_bytes = 0
        if self.cuda and arena_bytes > 0:
            self._upload = _Arena(_pinned(arena_bytes))
            self._blocks = [_pinned(arena_bytes) for _ in range(DOWNLOAD_BLOCKS)]
            self._free_blocks = list(range(DOWNLOAD_BLOCKS))
            self.pinned_bytes = arena_bytes * (1 + DOWNLOAD_BLOCKS)

    def begin(self) -> None:
        """Starts a batch: the upload arena is reused once the last batch's copies are done.

        After a normal batch they are (its one wait covered them); after a batch that
        failed half-way they may not be, and this waits for the worker's stream.
        """
        if self._unwaited:
            torch.cuda.current_stream(self.device).synchronize()  # type: ignore[no-untyped-call]
            self._unwaited = False
        if self._upload is not None:
            self._upload.offset = 0

    def upload(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The concatenation of host tensors (along dim 0), on the device."""
        if not self.cuda:
            return parts[0] if len(parts) == 1 else torch.cat(list(parts))
        shape = (sum(int(p.shape[0]) for p in parts), *parts[0].shape[1:])
        staged = None if self._upload is None else self._upload.take(shape, parts[0].dtype)
        if staged is None:  # oversized, or no pinned memory: a pageable copy, which blocks
            whole = parts[0] if len(parts) == 1 else torch.cat(list(parts))
            return whole.to(self.device)
        if len(parts) == 1:
            staged.copy_(parts[0])
        else:
            torch.cat(list(parts), out=staged)
        self._unwaited = True
        return staged.to(self.device, non_blocking=True)

    def cached(self, key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A small device tensor kept across batches (e.g. class weights of a batch key)."""
        tensor = self._cache.get(key)
        if tensor is None:
            if len(self._cache) >= CLASS_WEIGHT_CACHE:
                self._cache.pop(next(iter(self._cache)))
            tensor = self.upload([make()])
            self._cache[key] = tensor
        return tensor

    def download(
        self, tensors: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], HostLease | None]:
        """Host copies of device tensors, started without blocking; valid after `wait()`.

        Returns the host tensors and the lease that keeps their pinned block from being
        reused (None where they are pageable or are the tensors themselves).
        """
        if not self.cuda:
            return list(tensors), None
        lease = self._take_block()
        if lease is not None:
            arena = _Arena(self._blocks[lease.block])
            hosts = [arena.take(t.shape, t.dtype) for t in tensors]
            if all(h is not None for h in hosts):
                return [
                    h.copy_(t, non_blocking=True)  # type: ignore[union-attr]
                    for h, t in zip(hosts, tensors, strict=True)
                ], lease
            # Too large for a block: the lease is dropped, and the block comes back.
        return [t.to("cpu") for t in tensors], None

    def wait(self) -> None:
        """The batch's one wait: every copy and kernel queued so far has finished."""
        if not self.cuda:
            return
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        event.synchronize()  # type: ignore[no-untyped-call]
        self._unwaited = False

    def _take_block(self) -> HostLease | None:
        with self._lock:
            if not self._free_blocks:
                return None
            index = self._free_blocks.pop()
        lease = HostLease(index)
        weakref.finalize(lease, self._return_block, index)
        return lease

    def _return_block(self, index: int) -> None:
        with self._lock:
            self._free_blocks.append(index)


def _pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(_aligned(nbytes), dtype=torch.uint8, pin_memory=True)
