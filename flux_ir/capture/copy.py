"""How block outputs reach host memory.

A copier's `copy(t)` returns a host tensor that is valid after `synchronize()` (or after a `fence()`
taken later has fired). `flush()` hands what was queued so far to the device's copy engine.

`SyncCopier` copies at once, blocking. `AsyncCopier` keeps the hook cheap: `copy` only records the
source tensor and returns an empty host tensor; every `group_bytes` of sources (or at `flush()`) it
issues all queued device→host copies on a side CUDA stream into one reused pinned slab, records one
event, and a background thread waits for that event and moves the slab into the returned host tensors.
The source tensors stay referenced (so the caching allocator cannot reuse their memory) until their
copy has completed; no `record_stream` and no host synchronisation happen in the hook. When every slab
of the pinned pool is in flight, `flush()` waits for the oldest one (backpressure). On the CPU the
same queueing runs with plain copies, so a CPU test checks the bookkeeping against `SyncCopier`.
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

import torch

ALIGN = 256  # byte alignment of tensors inside a pinned slab
SLAB_ROUND = 32 << 20


class HostCopier(Protocol):
    def copy(self, t: torch.Tensor) -> torch.Tensor: ...

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


class AsyncCopier:
    """Batched device→host copies on a side stream into reused pinned slabs (see module docstring).

    Args:
        dtype: storage dtype (cast on the device before the copy); None keeps the tensor's dtype.
        group_bytes: queued source bytes that trigger a flush (bounds the extra device memory held).
        pool_bytes: page-locked host memory budget for slabs in flight.
    """

    def __init__(
        self,
        dtype: torch.dtype | None = None,
        group_bytes: int = 64 << 20,
        pool_bytes: int = 1 << 30,
    ):
        self.dtype = dtype
        self.group_bytes = group_bytes
        self.pool = PinnedPool(pool_bytes)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_bytes = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- hot path --------------------------------------------------------------------------------
    def copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.dtype is not None and t.dtype != self.dtype:
            t = t.to(self.dtype)
        if not t.is_contiguous():
            t = t.contiguous()
        dest = torch.empty(t.shape, dtype=t.dtype)
        self._pending.append((t, dest))
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.group_bytes:
            self.flush()
        return dest

    def flush(self) -> None:
        """Issue the queued copies (asynchronously on CUDA)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending:
            return
        if pending[0][0].device.type != "cuda":
            with torch.inference_mode():  # host tensors made in hooks are inference tensors
                for src, dest in pending:
                    dest.copy_(src)
            return
        self._check_error()
        device = pending[0][0].device
        sizes = [-(-s.numel() * s.element_size() // ALIGN) * ALIGN for s, _ in pending]
        slab = self.pool.acquire(sum(sizes))
        stream = self._stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        views = []
        with torch.cuda.stream(stream):
            off = 0
            for (src, dest), n in zip(pending, sizes, strict=True):
                nb = src.numel() * src.element_size()
                view = slab[off : off + nb].view(src.dtype).view(src.shape)
                view.copy_(src, non_blocking=True)
                views.append((view, dest))
                off += n
            event = torch.cuda.Event(blocking=True)  # the drain thread sleeps, not spins
            event.record(stream)
        self._start_thread()
        self._queue.put(("copy", event, slab, views, [s for s, _ in pending]))

    # -- completion ------------------------------------------------------------------------------
    def fence(self) -> threading.Event:
        """An event set once every copy issued so far has landed in its host tensor."""
        self.flush()
        done = threading.Event()
        if self._thread is None:
            done.set()
        else:
            self._queue.put(("fence", done))
        return done

    def synchronize(self) -> None:
        """Issue and wait for every queued copy; re-raises an error of the background thread."""
        self.fence().wait()
        self._check_error()

    def close(self) -> None:
        self.synchronize()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="flux-ir-copier", daemon=True)
            self._thread.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if item[0] == "fence":
                item[1].set()
                continue
            _, event, slab, views, sources = item
            item = None
            try:
                event.synchronize()
                del sources  # the copy is done: the device memory may be reused
                with torch.inference_mode():
                    for view, dest in views:
                        dest.copy_(view)
            except BaseException as err:  # surfaced by synchronize()
                self._error = err
            finally:
                self.pool.release(slab)

    def _check_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"asynchronous capture copy failed: {err}") from err


def make_copier(kind: str, dtype: torch.dtype | None = None) -> HostCopier:
    """`"sync"` or `"async"`."""
    if kind == "sync":
        return SyncCopier(dtype)
    if kind == "async":
        return AsyncCopier(dtype)
    raise ValueError(f"unknown copier {kind!r}; use sync or async")
