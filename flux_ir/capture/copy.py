"""How block outputs reach host memory: copiers, and the page-locked memory they share.

    copier = AsyncCopier()                    # host tensors from the process's page-locked pool
    host = copier.copy(torch.arange(6.0))     # returned at once, filled by the copy
    copier.synchronize()                      # every copy issued so far has landed
    host_pool().stats["regions"]              # regions of page-locked memory made so far

A copier (`HostCopier`) has four methods: `copy(t)` returns a host tensor that is valid after
`synchronize()` (or once a `fence()` taken later is set); `flush()` hands what was queued so far to
the device's copy engine; `fence()` returns an event set once every copy issued so far has landed.
`AsyncCopier` also has `reserve(nbytes)`: `run_capture` calls it with the capture's size before the
prompt is encoded, so page-locking runs beside the text encoders and the first steps, not in them.

`SyncCopier` copies at once, blocking. `AsyncCopier` keeps the hook cheap: `copy` records the source
tensor and returns its host tensor at once; every `group_bytes` of sources (or at `flush()`) it
issues the queued device→host copies on a side CUDA stream and records one event; a few threads,
shared by every copier of the process, wait for the events.

Host tensors are carved from regions of one process-wide pool of page-locked memory (`host_pool()`,
`HostPool`, in `flux_ir.io.host_memory`): the device copies straight into them and nothing is copied on the host. The pool is
made lazily and grows in background threads: anonymous memory (huge pages advised while the kernel
finds them quickly), touched once page by page, then registered with CUDA (`cudaHostRegister`;
`torch.empty(pin_memory=True)` where registering fails). A region returns to the pool when the last
tensor carved from it is dropped, and every later copier of the process (the command line's new
copier per capture, a notebook's new `AsyncCopier()` per cell) takes it from there: it finds the
memory a reused copier would. The pool keeps what it made, up to its budget (a quarter of the
host's memory, at most 32 GiB); `trim()` gives it back to the system.

When no region is ready (the pool is still growing, or its budget is spent) a copy is staged: the
device copies into a reused page-locked slab and a shared thread copies it out into an ordinary
(pageable) host tensor; first-touch page faults happen in that thread. `dest="pageable"` stages
every copy (no page-locked capture memory at all). One default serves the command line and the
notebook alike: `"pinned"` (the staging path stays as the fallback; `--copy pageable` selects it
alone). Figures: `benchmarks/bench_capture_api.py` (first capture of a process and repeated ones,
each through a new copier, whole pipeline calls).

Every host tensor owns its own storage (`torch.save` writes it alone). The sources stay referenced
(the caching allocator cannot reuse their memory) until their copy has completed; no
`record_stream` and no host synchronisation happen in the hook. At most `pool_bytes // group_bytes`
groups of a copier are in flight (backpressure). On the CPU the same queueing and region
bookkeeping run with plain copies and unregistered memory, so a CPU test checks them against
`SyncCopier`.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Protocol

import torch

from flux_ir.errors import InvalidArgumentError
from flux_ir.io.host_memory import (  # noqa: F401  (re-exported: the pool is part of this API)
    ALIGN,
    HostPool,
    MiB,
    default_grow_threads,
    default_pinned_bytes,
    host_pool,
    make_region,
    reset_host_pool,
    round_up,
)

SLAB_ROUND = 32 * MiB
DESTS = ("pinned", "pageable")
PREFETCH_BYTES = 1 << 30  # what a new pinned copier asks the pool for before it knows the capture
DRAIN_THREADS = 4
_LOCK = threading.Lock()  # makes the process's staging slabs, drain threads and copy streams once


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


# -- page-locked regions ---------------------------------------------------------------------------
# -- staging slabs ---------------------------------------------------------------------------------
class PinnedPool:
    """Reused page-locked staging slabs, at most `budget` bytes in all (one slab may exceed it alone).

    `prepare(count, size)` makes slabs in a background thread, ahead of the first staged copy.
    `pin=False` allocates ordinary memory (the same bookkeeping, testable without CUDA).
    """

    def __init__(self, budget: int, pin: bool = True):
        self.budget = budget
        self.pin = pin
        self.total = 0
        self.making = 0  # bytes of prepared slabs on their way
        self.making_size = 0  # their size
        self.free: list[torch.Tensor] = []
        self.cond = threading.Condition()

    def _make(self, size: int) -> torch.Tensor:
        return torch.from_numpy(make_region(size, self.pin).view())

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 pinned slab of at least `nbytes`; blocks while the pool is exhausted."""
        with self.cond:
            while True:
                # indices, not list.remove: tensors compare elementwise, not by identity
                fits = [i for i, s in enumerate(self.free) if s.numel() >= nbytes]
                if fits:
                    return self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
                size = round_up(nbytes, SLAB_ROUND)
                if self.making and size <= self.making_size:
                    self.cond.wait()  # a prepared slab that fits is on its way
                    continue
                if self.total + size <= self.budget or self.total == 0:
                    self.total += size
                    break
                if self.free:  # free slabs too small: drop the smallest and try again
                    i = min(range(len(self.free)), key=lambda i: self.free[i].numel())
                    self.total -= self.free.pop(i).numel()
                    continue
                self.cond.wait()
        return self._make(size)  # outside the lock: releases go on meanwhile

    def release(self, slab: torch.Tensor) -> None:
        with self.cond:
            self.free.append(slab)
            self.cond.notify_all()

    def prepare(self, count: int, size: int) -> None:
        """Make up to `count` slabs of `size` bytes in a background thread (within the budget),
        unless the pool holds that many already."""
        size = round_up(size, SLAB_ROUND)
        with self.cond:
            have = sum(1 for s in self.free if s.numel() >= size) + self.making // size
            count = min(count - have, (self.budget - self.total) // size)
            if count <= 0:
                return
            self.total += count * size
            self.making += count * size
            self.making_size = max(self.making_size, size)

        def make() -> None:
            for _ in range(count):
                try:
                    slab = self._make(size)
                except Exception:
                    slab = None
                with self.cond:
                    self.making -= size
                    if slab is None:
                        self.total -= size
                    else:
                        self.free.append(slab)
                    self.cond.notify_all()

        threading.Thread(target=make, name="flux-ir-staging", daemon=True).start()


STAGING_BYTES = 1 << 30
STAGING_SLABS = 4  # slabs made ahead when a pinned copier reserves (of twice its group size)
_STAGING: PinnedPool | None = None


def staging_pool() -> PinnedPool:
    """The process's staging slabs (shared by every copier)."""
    global _STAGING
    with _LOCK:
        if _STAGING is None:
            _STAGING = PinnedPool(STAGING_BYTES, pin=torch.cuda.is_available())
        return _STAGING


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
    """A copier's issued jobs not yet completed (completion may be out of order), its in-flight
    bound and the first error of its jobs."""

    def __init__(self, inflight: int):
        self.cond = threading.Condition()
        self.issued = 0
        self.open: set[int] = set()
        self.inflight = threading.Semaphore(inflight)
        self.error: BaseException | None = None

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


def complete(job: tuple) -> None:
    """Wait for a job's copies, drain its staged tensors out of the slab, and mark it done."""
    jobs, n, event, slab, runs, held = job
    job = None
    try:
        event.synchronize()
        del held  # the copies are done: the device memory may be reused
        if runs:
            drain_runs(runs, slab)
    except BaseException as err:  # surfaced by synchronize()
        jobs.error = jobs.error or err
    finally:
        if slab is not None:
            staging_pool().release(slab)
        slab = runs = None
        jobs.inflight.release()
        jobs.finish(n)


class _Drainer:
    """Threads shared by every copier of the process that complete jobs (`complete`)."""

    def __init__(self, threads: int = DRAIN_THREADS):
        self.queue: queue.Queue = queue.Queue()
        self.threads = [
            threading.Thread(target=self._run, name="flux-ir-copier", daemon=True)
            for _ in range(threads)
        ]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while True:
            complete(self.queue.get())


_DRAINER: _Drainer | None = None
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def drainer() -> _Drainer:
    global _DRAINER
    with _LOCK:
        if _DRAINER is None:
            _DRAINER = _Drainer()
        return _DRAINER


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream device→host copies of `device` run on (one per device, shared)."""
    stream = _STREAMS.get(device)
    if stream is None:
        with _LOCK:
            stream = _STREAMS.setdefault(device, torch.cuda.Stream(device))
    return stream


class AsyncCopier:
    """Batched device→host copies on a side stream into the process's page-locked pool (module
    docstring).

    Args:
        dtype: storage dtype (cast on the device before the copy); None keeps the tensor's dtype.
        group_bytes: queued source bytes that trigger a flush (bounds the extra device memory held).
        pool_bytes: bounds the groups in flight (`pool_bytes // group_bytes`, at least 2).
        dest: "pinned" (default: carved from `pool`, staged while no region is ready) or
            "pageable" (every copy staged into an ordinary tensor).
        pool: the page-locked pool (default: the process's, `host_pool()`).
        prefetch_bytes: what a pinned copier asks its pool for at once, before a capture says how
            much it needs (`reserve`); default 1 GiB where the pool page-locks, else nothing.
    """

    def __init__(
        self,
        dtype: torch.dtype | None = None,
        group_bytes: int = 64 * MiB,
        pool_bytes: int = 1 << 30,
        dest: str = "pinned",
        pool: HostPool | None = None,
        prefetch_bytes: int | None = None,
    ):
        if dest not in DESTS:
            raise InvalidArgumentError(
                f"{{param}} {dest!r}: choose one of {', '.join(DESTS)}", "dest"
            )
        self.dtype = dtype
        self.group_bytes = group_bytes
        self.dest = dest
        self.pool = pool or host_pool()
        self._open: list[list] = []  # [region view, bytes used] carved from, at most two
        self._pending: list[tuple] = []
        self._pending_bytes = 0
        self._jobs = _Jobs(max(2, pool_bytes // group_bytes))
        self._reserved = [0]  # what this copier still asks of the pool (a list: the finalizer's)
        self.stats = {"carved_bytes": 0, "staged_bytes": 0}  # host bytes by path
        weakref.finalize(self, _cancel, self.pool, self._reserved).atexit = False
        if prefetch_bytes is None:
            prefetch_bytes = PREFETCH_BYTES if self.pool.pin else 0
        if dest == "pinned" and prefetch_bytes:
            self.reserve(prefetch_bytes)

    def reserve(self, nbytes: int, largest: int = 0) -> None:
        """Make the pool hold `nbytes` ready for this copier, page-locked in the background from
        now on (`largest`: the largest tensor to come). Counts what was asked before; the ask ends
        at `synchronize()`."""
        if self.dest != "pinned":
            return
        more = max(0, int(nbytes) - self._reserved[0])
        self._reserved[0] += more
        self.pool.reserve(more, largest)
        if self.pool.pin:  # copies that find no region yet are staged: slabs ready for them
            staging_pool().prepare(STAGING_SLABS, 2 * self.group_bytes)

    # -- hot path --------------------------------------------------------------------------------
    def copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.requires_grad:
            t = t.detach()
        if self.dest == "pinned" and t.nbytes:
            dest = self._carve(t)
            if dest is not None:
                self.stats["carved_bytes"] += dest.nbytes
                self._queue_copy(t, dest, True)
                return dest
        dest = torch.empty(t.shape, dtype=self.dtype or t.dtype)
        self.stats["staged_bytes"] += dest.nbytes
        self._queue_copy(t, dest, False)
        return dest

    def _carve(self, t: torch.Tensor) -> torch.Tensor | None:
        """A host tensor for `t` (in the storage dtype) carved from an open region, or None when
        the pool has no region ready."""
        dtype = self.dtype or t.dtype
        nbytes = t.numel() * dtype.itemsize
        for slot in self._open:
            view, used = slot
            if used + nbytes <= view.shape[0]:
                break
        else:
            view = self.pool.take(nbytes)
            if view is None:
                return None
            got = min(self._reserved[0], view.shape[0])
            if got:
                self._reserved[0] -= got
                self.pool.reserve(-got)
            if len(self._open) == 2:  # keep the region with more room for small tensors
                self._open.sort(key=lambda s: s[0].shape[0] - s[1])
                self._open.pop(0)
            slot = [view, 0]
            self._open.append(slot)
            used = 0
        slot[1] = used + nbytes + (-nbytes % ALIGN)
        return torch.from_numpy(view[used : used + nbytes]).view(dtype).view(t.shape)

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
        self._jobs.inflight.acquire()  # backpressure: bounded groups (and sources) in flight
        staged = [(src, dest) for src, dest, direct in pending if not direct]
        offsets, total = slab_layout([src.nbytes for src, _ in staged])
        slab = staging_pool().acquire(total) if staged else None
        device = pending[0][0].device
        stream = copy_stream(device)
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
        # the job holds the sources (their memory is not reused) and the carved host tensors (their
        # region is not given back) until the copies have landed
        held = [(src, dest) for src, dest, direct in pending if direct] + [p[0] for p in staged]
        self._submit((self._jobs, self._jobs.start(), event, slab, runs, held))

    def _submit(self, job: tuple) -> None:
        drainer().queue.put(job)

    # -- completion ------------------------------------------------------------------------------
    def fence(self) -> Fence:
        """Set once every copy issued so far has landed in its host tensor."""
        self.flush()
        return Fence(self._jobs, self._jobs.issued)

    def synchronize(self) -> None:
        """Issue and wait for every queued copy; re-raises an error of the background threads.
        Ends this copier's reservation and lets go of its open regions (what is left in them is
        not used)."""
        self.fence().wait()
        self._open = []
        _cancel(self.pool, self._reserved)
        self._check_error()

    def close(self) -> None:
        self.synchronize()

    def _check_error(self) -> None:
        if self._jobs.error is not None:
            err, self._jobs.error = self._jobs.error, None
            raise RuntimeError(f"asynchronous capture copy failed: {err}") from err


def _cancel(pool: HostPool, reserved: list[int]) -> None:
    if reserved[0]:
        pool.reserve(-reserved[0])
        reserved[0] = 0


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


COPIERS = ("pageable", "pinned", "sync")


def make_copier(kind: str, dtype: torch.dtype | None = None) -> HostCopier:
    """A copier by name (the command line's `--copy`): `"pinned"` (`AsyncCopier()`, the default:
    straight into the process's page-locked pool, staged only while no region is ready),
    `"pageable"` (`AsyncCopier(dest="pageable")`: every copy staged into ordinary host memory, none
    page-locked for the capture) or `"sync"` (a blocking `.cpu()` per tensor)."""
    if kind == "sync":
        return SyncCopier(dtype)
    if kind in DESTS:
        return AsyncCopier(dtype, dest=kind)
    raise InvalidArgumentError(f"{{param}} {kind!r}: choose one of {', '.join(COPIERS)}", "copy")
