"""How block outputs reach host memory.

A copier (`HostCopier`) has four methods: `copy(t)` returns a host tensor that is valid after
`synchronize()` (or once a `fence()` taken later is set); `flush()` hands what was queued so far to
the device's copy engine; `fence()` returns an event set once every copy issued so far has landed.

`SyncCopier` copies at once, blocking. `AsyncCopier` keeps the hook cheap: `copy` records the source
tensor and returns its host tensor at once; every `group_bytes` of sources (or at `flush()`) it
issues the queued device→host copies on a side CUDA stream and records one event; background threads
wait for the events. Where the host tensors live (`dest`):

- `"pinned"`: carved from page-locked chunks (prepared ahead by background threads), while their
  live total stays within `pinned_bytes`: the device copies straight into the returned tensors,
  nothing is copied on the host. Beyond the budget, as `"pageable"`.
- `"pageable"`: a new ordinary (pageable) tensor per copy; the device copies into a reused
  page-locked staging slab and a background thread copies each tensor out of it (first-touch page
  faults happen in that thread).

Every host tensor owns its own storage (`torch.save` writes it alone); a chunk returns to the pinned
budget when the last tensor carved from it is dropped, so a streaming sink keeps host memory
bounded. The sources stay referenced (the caching allocator cannot reuse their memory) until their
copy has completed; no `record_stream` and no host synchronisation happen in the hook. At most
`pool_bytes // group_bytes` groups are in flight (backpressure). On the CPU the same queueing and
chunk bookkeeping run with plain copies, so a CPU test checks them against `SyncCopier`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from flux_ir.errors import InvalidArgumentError

ALIGN = 256  # byte alignment of tensors inside slabs and chunks
SLAB_ROUND = 32 << 20
DESTS = ("pinned", "pageable")
FIRST_CHUNK = 4 << 20


class Event(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class HostCopier(Protocol):
    """How a trace's tensors reach host memory (module docstring)."""

    def copy(self, t: torch.Tensor) -> torch.Tensor: ...

    def flush(self) -> None: ...

    def fence(self) -> Event: ...

    def synchronize(self) -> None: ...


class SyncCopier:
    """Plain blocking copy to CPU (a clone on CPU), optionally cast to `dtype`."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype=self.dtype or t.dtype, copy=True)

    def flush(self) -> None:
        pass

    def fence(self) -> threading.Event:
        done = threading.Event()
        done.set()
        return done

    def synchronize(self) -> None:
        pass


class PinnedPool:
    """Reused page-locked slabs, at most `budget` bytes in all (one slab may exceed it alone).

    `pin=False` allocates ordinary memory (the same bookkeeping, testable without CUDA).
    """

    def __init__(self, budget: int, pin: bool = True):
        self.budget = budget
        self.pin = pin
        self.total = 0
        self.free: list[torch.Tensor] = []
        self.cond = threading.Condition()

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 pinned slab of at least `nbytes`; blocks while the pool is exhausted."""
        with self.cond:
            while True:
                # indices, not list.remove: tensors compare elementwise, not by identity
                fits = [i for i, s in enumerate(self.free) if s.numel() >= nbytes]
                if fits:
                    return self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
                size = -(-nbytes // SLAB_ROUND) * SLAB_ROUND
                if self.total + size <= self.budget or self.total == 0:
                    self.total += size
                    return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
                if self.free:  # free slabs too small: drop the smallest and try again
                    i = min(range(len(self.free)), key=lambda i: self.free[i].numel())
                    self.total -= self.free.pop(i).numel()
                    continue
                self.cond.wait()

    def release(self, slab: torch.Tensor) -> None:
        with self.cond:
            self.free.append(slab)
            self.cond.notify_all()


# -- page-locked chunks ---------------------------------------------------------------------------
class Chunk:
    """`size` bytes of page-locked host memory (`array`, uint8) carved front to back."""

    __slots__ = ("array", "size", "used")

    def __init__(self, array: np.ndarray):
        self.array, self.size, self.used = array, array.shape[0], 0


def pinned_array(nbytes: int, pin: bool) -> np.ndarray:
    """Page-locked memory (torch's caching host allocator) seen as a numpy array (which keeps it)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).numpy()


class ChunkSource:
    """Page-locked chunks, prepared `ahead` at a time by `threads` background threads; sizes double
    from 4 MiB up to `chunk_bytes`. `pin=False` gives ordinary memory (testable without CUDA).

    The live total (a chunk counts until the last tensor carved from it is dropped) may not exceed
    `pinned_bytes`: callers ask `pinned_room` before `take`. `stats`: chunks made, seconds spent making
    them (in the background threads) and seconds `take` waited for them (in the caller's thread).
    """

    def __init__(
        self, chunk_bytes: int, pinned_bytes: int, pin: bool, threads: int = 2, ahead: int = 2
    ):
        self.chunk_bytes, self.pinned_bytes, self.pin, self.ahead = (
            chunk_bytes,
            pinned_bytes,
            pin,
            ahead,
        )
        self.live_pinned = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="flux-ir-chunks")
        self._ready: list[tuple[int, Future]] = []
        self._size = min(FIRST_CHUNK, chunk_bytes)
        self.stats = {"chunks": 0, "make_s": 0.0, "wait_s": 0.0}

    def take(self, nbytes: int) -> Chunk:
        """A chunk of at least `nbytes` (a dedicated one when larger than the next prepared one)."""
        need = -(-nbytes // ALIGN) * ALIGN
        ready = self._ready
        while len(ready) < self.ahead:
            ready.append(self._submit())
        t0 = time.perf_counter()
        if need > ready[0][0]:
            array = self._make(need)
        else:
            _, future = ready.pop(0)
            ready.append(self._submit())
            array = future.result()
        self.stats["wait_s"] += time.perf_counter() - t0
        with self._lock:
            self.live_pinned += array.shape[0]
        weakref.finalize(array, self._release, array.shape[0])
        return Chunk(array)

    def pinned_room(self, nbytes: int) -> bool:
        """Whether a chunk for `nbytes` stays within the pinned budget."""
        need = -(-nbytes // ALIGN) * ALIGN
        return self.live_pinned + max(need, self._size) <= self.pinned_bytes

    def _submit(self) -> tuple[int, Future]:
        size, self._size = self._size, min(self.chunk_bytes, 2 * self._size)
        return size, self._pool.submit(self._make, size)

    def _make(self, size: int) -> np.ndarray:
        t0 = time.perf_counter()
        array = pinned_array(size, self.pin)
        with self._lock:
            self.stats["chunks"] += 1
            self.stats["make_s"] += time.perf_counter() - t0
        return array

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.live_pinned -= nbytes

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ready = []


# -- completion tracking ---------------------------------------------------------------------------
class Fence:
    """Set once every job numbered below `upto` has completed (has `wait()` and `is_set()`)."""

    def __init__(self, tracker: _Jobs, upto: int):
        self.tracker, self.upto = tracker, upto

    def is_set(self) -> bool:
        with self.tracker.cond:
            return self.tracker.done_below(self.upto)

    def wait(self, timeout: float | None = None) -> bool:
        with self.tracker.cond:
            return self.tracker.cond.wait_for(lambda: self.is_set(), timeout)


class _Jobs:
    """Numbers of issued jobs not yet completed (completion may be out of order)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.issued = 0
        self.open: set[int] = set()

    def start(self) -> int:
        with self.cond:
            n = self.issued
            self.issued += 1
            self.open.add(n)
            return n

    def finish(self, n: int) -> None:
        with self.cond:
            self.open.discard(n)
            self.cond.notify_all()

    def done_below(self, upto: int) -> bool:
        return not any(n < upto for n in self.open)


class AsyncCopier:
    """Batched device→host copies on a side stream, completed by background threads (module docstring).

    Args:
        dtype: storage dtype (cast on the device before the copy); None keeps the tensor's dtype.
        group_bytes: queued source bytes that trigger a flush (bounds the extra device memory held).
        pool_bytes: page-locked slab budget for groups in flight; also bounds the groups in flight.
        dest: where host tensors live: "pinned" (default) or "pageable" (module docstring).
        pinned_bytes: live page-locked capture memory allowed with `dest="pinned"` (default: a
            quarter of the host's memory, at most 32 GiB); copies beyond it go to pageable tensors.
        chunk_bytes: size of the host chunks tensors are carved from.
        drain_threads: threads that wait for copies (and copy `"pageable"` tensors out of the slabs).
        chunk_threads: threads that page-lock chunks ahead of use.
    """

    def __init__(
        self,
        dtype: torch.dtype | None = None,
        group_bytes: int = 64 << 20,
        pool_bytes: int = 1 << 30,
        dest: str = "pinned",
        pinned_bytes: int | None = None,
        chunk_bytes: int = 256 << 20,
        drain_threads: int = 4,
        chunk_threads: int = 2,
    ):
        if dest not in DESTS:
            raise InvalidArgumentError(
                f"{{param}} {dest!r}: choose one of {', '.join(DESTS)}", "dest"
            )
        self.dtype = dtype
        self.group_bytes = group_bytes
        self.dest = dest
        self.pool = PinnedPool(pool_bytes, pin=torch.cuda.is_available())
        budget = (
            (default_pinned_bytes() if pinned_bytes is None else pinned_bytes)
            if dest == "pinned"
            else 0
        )
        self.chunks = ChunkSource(
            chunk_bytes, budget, torch.cuda.is_available(), chunk_threads, ahead=2
        )
        self._chunk: Chunk | None = None
        self._pending: list[tuple] = []
        self._pending_bytes = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._queue: queue.Queue = queue.Queue()
        self._inflight = threading.Semaphore(max(2, pool_bytes // group_bytes))
        self._jobs = _Jobs()
        self._error: BaseException | None = None
        self._n_threads = max(1, drain_threads)
        self._threads: list[threading.Thread] = []

    # -- hot path --------------------------------------------------------------------------------
    def copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.requires_grad:
            t = t.detach()
        if self.dest == "pinned" and t.nbytes:
            dest = self._carve(t)
            if dest is not None:
                self._queue_copy(t, dest, True)
                return dest
        dest = torch.empty(t.shape, dtype=self.dtype or t.dtype)
        self._queue_copy(t, dest, False)
        return dest

    def _carve(self, t: torch.Tensor) -> torch.Tensor | None:
        """A host tensor for `t` (in the storage dtype) carved from the current chunk, or None when
        the pinned budget is spent."""
        dtype = self.dtype or t.dtype
        nbytes = t.numel() * dtype.itemsize
        chunk = self._chunk
        if chunk is None or chunk.used + nbytes > chunk.size:
            if not self.chunks.pinned_room(nbytes):
                return None
            chunk = self._chunk = self.chunks.take(nbytes)
        off = chunk.used
        chunk.used = off + nbytes + (-nbytes % ALIGN)
        return torch.from_numpy(chunk.array[off : off + nbytes]).view(dtype).view(t.shape)

    def _queue_copy(self, t: torch.Tensor, dest: torch.Tensor, direct: bool) -> None:
        """Queue `t` (cast on its device to the storage dtype, made contiguous) for `dest`."""
        if t.dtype != dest.dtype:
            t = t.to(dest.dtype)
        if not t.is_contiguous():
            t = t.contiguous()
        self._pending.append((t, dest, direct))
        self._pending_bytes += t.nbytes
        if self._pending_bytes >= self.group_bytes:
            self.flush()

    def flush(self) -> None:
        """Issue the queued copies (asynchronously on CUDA)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending:
            return
        if pending[0][0].device.type != "cuda":
            with torch.inference_mode():  # host tensors made in hooks are inference tensors
                for src, dest, _ in pending:
                    dest.copy_(src)
            return
        self._check_error()
        self._inflight.acquire()  # backpressure: bounded groups (and sources) in flight
        staged = [(src, dest) for src, dest, direct in pending if not direct]
        offsets, total = slab_layout([src.nbytes for src, _ in staged])
        slab = self.pool.acquire(total) if staged else None
        device = pending[0][0].device
        stream = self._stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        # host tensors carved in hooks are inference tensors; a flush may come after the
        # generation's inference_mode has ended (BlockTrace's exit)
        with torch.inference_mode(), torch.cuda.stream(stream):
            for src, dest, direct in pending:
                if direct:
                    dest.copy_(src, non_blocking=True)
            for (src, _), at in zip(staged, offsets, strict=True):
                slab[at : at + src.nbytes].copy_(
                    src.reshape(-1).view(torch.uint8), non_blocking=True
                )
            event = torch.cuda.Event(blocking=True)  # the waiting thread sleeps, not spins
            event.record(stream)
        # the drain needs only where each staged tensor goes; the sources are dropped once copied
        runs = [(dest, at) for (_, dest), at in zip(staged, offsets, strict=True)]
        self._start_threads()
        self._queue.put((self._jobs.start(), event, slab, runs, [p[0] for p in pending]))

    # -- completion ------------------------------------------------------------------------------
    def fence(self) -> Fence:
        """Set once every copy issued so far has landed in its host tensor."""
        self.flush()
        return Fence(self._jobs, self._jobs.issued)

    def synchronize(self) -> None:
        """Issue and wait for every queued copy; re-raises an error of the background threads."""
        self.fence().wait()
        self._check_error()

    def close(self) -> None:
        self.synchronize()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self.chunks.close()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _start_threads(self) -> None:
        while len(self._threads) < self._n_threads:
            thread = threading.Thread(target=self._drain, name="flux-ir-copier", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _drain(self) -> None:
        while (job := self._queue.get()) is not None:
            n, event, slab, runs, sources = job
            job = None
            try:
                event.synchronize()
                del sources  # the copies are done: the device memory may be reused
                if runs:
                    drain_runs(runs, slab)
            except BaseException as err:  # surfaced by synchronize()
                self._error = err
            finally:
                if slab is not None:
                    self.pool.release(slab)
                slab = runs = None
                self._inflight.release()
                self._jobs.finish(n)

    def _check_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"asynchronous capture copy failed: {err}") from err


def slab_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of tensors of `sizes` bytes packed into one slab, each aligned to ALIGN; and its size."""
    offsets, at = [], 0
    for n in sizes:
        at += -at % ALIGN
        offsets.append(at)
        at += n
    return offsets, at


def drain_runs(runs: list[tuple[torch.Tensor, int]], slab: torch.Tensor) -> None:
    """Copy each `(dest, slab_at)` out of the slab into its host tensor `dest`."""
    with torch.inference_mode():
        for dest, at in runs:
            target = dest.reshape(-1).view(torch.uint8)
            target.copy_(slab[at : at + target.numel()])


def default_pinned_bytes() -> int:
    """A quarter of the host's physical memory, at most 32 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return min(32 << 30, total // 4)


COPIERS = ("pageable", "pinned", "sync")


def make_copier(kind: str, dtype: torch.dtype | None = None) -> HostCopier:
    """A copier by name (the command line's `--copy`): `"pageable"` (side-stream copies staged through
    a reused page-locked slab into ordinary host tensors: the cheapest for one capture per process,
    as page-locking new memory costs more than the staging), `"pinned"` (`AsyncCopier`'s default:
    straight into page-locked chunks, the cheapest once a process has captured before) or `"sync"`
    (a blocking `.cpu()` per tensor)."""
    if kind == "sync":
        return SyncCopier(dtype)
    if kind in DESTS:
        return AsyncCopier(dtype, dest=kind)
    raise InvalidArgumentError(f"{{param}} {kind!r}: choose one of {', '.join(COPIERS)}", "copy")
