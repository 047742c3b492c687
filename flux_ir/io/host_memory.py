"""Host memory for the GPUs: regions of page-locked memory, made ahead of use in background threads.

    pool = HostPool(budget=256 << 20)          # page-locked where CUDA is available
    pool.reserve(64 << 20, largest=8 << 20)    # ask for 64 MiB: its threads page-lock it from now
    pool.wait_free(8 << 20)                    # (a copier does not wait: it stages meanwhile)
    view = pool.take(8 << 20)                  # a uint8 array over a free region, or None
    arena = HostArena(HostPool(budget=64 << 20), 16 << 20)
    weight = arena.empty((1024, 1024), torch.bfloat16)   # carved from a page-locked region

A region is anonymous memory (huge pages advised while the kernel finds them quickly), touched once
page by page, then registered with CUDA (`cudaHostRegister`; `torch.empty(pin_memory=True)` where
registering fails). Several threads make regions at once: page-locking runs at several GB/s where
`torch.empty(pin_memory=True)` (one thread, the driver's allocation) manages about 2 GB/s, and it
runs beside other work (loading a model, encoding a prompt) instead of in the way of kernel
launches. A region goes back to its pool when the last tensor carved from it is dropped.

`HostPool` serves the capture copiers (`flux_ir.capture.copy`: tensors that come and go);
`HostArena` carves long-lived tensors one after another (an offloaded model's weights,
`flux_ir.models.random_init`). Without CUDA the same bookkeeping runs on ordinary memory.
"""

from __future__ import annotations

import atexit
import mmap
import os
import threading
import time
import weakref

import numpy as np
import torch

ALIGN = 256  # byte alignment of tensors inside regions
MiB = 1 << 20
PAGE = 2 * MiB  # regions are whole huge pages
TOUCH = 4096  # first-touch stride (the smallest page size)
REGION_BYTES = 256 * MiB  # regular region size (first regions of a burst are smaller)
FIRST_REGION = 32 * MiB
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device's context
HUGE_PAGES_MIN_GBPS = 2.0  # touched slower with huge pages advised: the pool stops advising them


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _cudart():
    return torch.cuda.cudart()


def _register(ptr: int, size: int) -> bool:
    """Page-lock `size` bytes at `ptr` for the GPUs (True on success)."""
    try:
        err = _cudart().cudaHostRegister(ptr, size, HOST_REGISTER_PORTABLE)
    except (RuntimeError, AssertionError, AttributeError):
        return False
    return int(err) == 0


def _release_region(buffer, ptr: int, registered: bool) -> None:
    """Finalizer of a Region: unregister (the memory is unmapped when `buffer` is dropped after)."""
    if registered:
        try:
            _cudart().cudaHostUnregister(ptr)
        except Exception:  # interpreter shutdown: the driver reclaims it
            pass


class Region:
    """`size` bytes of host memory owned by a pool (page-locked when `pinned`).

    `view()` returns a new uint8 array over the whole region each time; tensors carved from it keep
    it alive, and a callback given to `view` runs once the last of them is dropped.
    """

    __slots__ = ("buffer", "size", "pinned", "registered", "touch_s", "__weakref__")

    def __init__(self, buffer, size: int, pinned: bool, registered: bool, ptr: int = 0):
        self.buffer, self.size, self.pinned, self.registered = buffer, size, pinned, registered
        self.touch_s = 0.0
        # not at exit: the system takes the memory back with the process
        weakref.finalize(self, _release_region, buffer, ptr, registered).atexit = False

    def view(self, on_release=None) -> np.ndarray:
        if isinstance(self.buffer, torch.Tensor):
            array = self.buffer.numpy()
        else:
            array = np.frombuffer(self.buffer, np.uint8)
        # the callback holds the region: it outlives every tensor carved from this view
        weakref.finalize(array, on_release or _keep, self).atexit = False
        return array


def _keep(region: Region) -> None:
    pass


def _advise(buffer: mmap.mmap, name: str) -> None:
    advice = getattr(mmap, name, None)
    if advice is not None:
        try:
            buffer.madvise(advice)
        except OSError:
            pass


def make_region(size: int, pin: bool, huge_pages: bool = True) -> Region:
    """A region of `size` bytes (a multiple of PAGE): anonymous memory (huge pages advised with
    `huge_pages`, not inherited by forked processes, as CUDA's own page-locked memory), every page
    touched once here (the page faults happen in the calling thread; `Region.touch_s` says how
    long), then registered with CUDA when `pin`. Where registering fails, page-locked memory from
    torch instead."""
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages:
        _advise(buffer, "MADV_HUGEPAGE")
    _advise(buffer, "MADV_DONTFORK")
    array = np.frombuffer(buffer, np.uint8)
    t0 = time.perf_counter()
    array[::TOUCH] = 0  # first touch, page by page (numpy releases the GIL)
    touch_s = time.perf_counter() - t0
    ptr = array.ctypes.data
    del array
    if not pin:
        region = Region(buffer, size, False, False)
    elif _register(ptr, size):
        region = Region(buffer, size, True, True, ptr)
    else:
        buffer = None
        region = Region(torch.empty(size, dtype=torch.uint8, pin_memory=True), size, True, False)
    region.touch_s = touch_s
    return region


def default_pinned_bytes() -> int:
    """A quarter of the host's physical memory, at most 32 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return min(32 << 30, total // 4)


def default_grow_threads() -> int:
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class HostPool:
    """Host memory regions shared by the copiers of a process (`host_pool()`), grown ahead of use.

    Args:
        budget: bytes of regions at most (made, in use and free together; default a quarter of the
            host's memory, at most 32 GiB).
        region_bytes: size of the regions made in steady growth; a burst starts at 32 MiB and
            doubles up to it, and a larger tensor asks for a region of its own size.
        pin: page-lock the regions (default: when CUDA is available). Without it the same
            bookkeeping runs on ordinary memory (CPU tests).
        threads: background threads that make regions (default half the CPU cores, 2 to 8).
        keep: bytes of returned regions kept for reuse (default: the budget when pinning, else 0:
            unpinned regions go back to the system at once).
        huge_pages: advise huge pages for the regions; the pool stops when a region's pages were
            touched slower than HUGE_PAGES_MIN_GBPS (the kernel compacting memory to find them).

    `reserve(nbytes)` asks for `nbytes` more free memory; the growers make regions until free and
    in-making bytes cover what reservations still ask, within the budget. `take(nbytes)` hands out
    the smallest free region that fits, without waiting (None when there is none: the caller stages
    its copy instead), and the region comes back when the last tensor carved from it is dropped.
    `stats`: regions and bytes made, seconds the growers spent making them, takes that found no
    region (`misses`).
    """

    def __init__(
        self,
        budget: int | None = None,
        region_bytes: int = REGION_BYTES,
        pin: bool | None = None,
        threads: int | None = None,
        keep: int | None = None,
        huge_pages: bool = True,
    ):
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self.huge_pages = huge_pages
        self.budget = default_pinned_bytes() if budget is None else int(budget)
        self.region_bytes = round_up(region_bytes, PAGE)
        self.threads = threads or default_grow_threads()
        self.keep = (self.budget if self.pin else 0) if keep is None else int(keep)
        self.total = 0  # bytes of regions made, being made, in use or free
        self.live = 0  # bytes of regions handed out and not yet returned
        self.making = 0
        self.demand = 0  # bytes reservations still ask for
        self.target = 0  # bytes of regions `prefill` asked the pool to reach, in use or free
        self.largest = 0  # the largest tensor a reservation announced
        self.stats = {
            "regions": 0, "made_bytes": 0, "make_s": 0.0, "touch_s": 0.0, "misses": 0, "taken": 0,
        }  # fmt: skip
        self._free: list[Region] = []
        self._sizes: list[int] = []  # regions asked for by tensors larger than the usual
        self._burst = 0  # regions made since the pool last ran dry of demand
        self._cond = threading.Condition()
        self._growers: list[threading.Thread] = []
        self._closed = False

    # -- asking and taking -----------------------------------------------------------------------
    @property
    def free_bytes(self) -> int:
        return sum(r.size for r in self._free)

    def reserve(self, nbytes: int, largest: int = 0) -> None:
        """Ask for `nbytes` more (negative: fewer); `largest`: the largest tensor to carve."""
        with self._cond:
            self.demand = max(0, self.demand + int(nbytes))
            self.largest = max(self.largest, int(largest))
            if self.demand == 0:
                self.largest = 0
                extra = self._surplus()
            else:
                extra = []
                self._start_growers()
            self._cond.notify_all()
        del extra  # unpinned regions nobody asks for go back to the system (outside the lock)

    def prefill(self, nbytes: int) -> None:
        """Make `nbytes` more free memory in the background, once, for a capture to come
        (`flux_ir.capture.prepare_capture`): page-locking is paid beside other work (loading the
        model) rather than beside the first capture's denoising, where it stalls kernel launches.
        Free regions count; unlike `reserve`, nothing stays asked: once made, regions taken and
        returned are not made again."""
        with self._cond:
            more = int(nbytes) - self.free_bytes - self.making
            if more > 0:
                self.target = max(self.target, self.total + more)
                self._start_growers()
                self._cond.notify_all()

    def take(self, nbytes: int, wait: bool = False) -> np.ndarray | None:
        """A view of the smallest free region of at least `nbytes`, or None: at once (a copier
        stages its copy instead) or, with `wait`, once the pool can make no such region (budget
        spent, out of memory). A miss with nothing being made asks the growers for one region."""
        with self._cond:
            missed = False
            while not (fits := [r for r in self._free if r.size >= nbytes]):
                if not missed:
                    missed = True
                    self.stats["misses"] += 1
                    if self.demand:  # regions being made for a reservation must fit this tensor
                        self.largest = max(self.largest, nbytes)
                    if not self.making and not self._sizes and self._want() <= 0:
                        first = min(FIRST_REGION, self.region_bytes)
                        self._sizes.append(round_up(max(nbytes + ALIGN, first), PAGE))
                        self._start_growers()
                        self._cond.notify_all()
                if not wait or not (self.making or self._next_size()):
                    return None
                self._cond.wait()
            region = min(fits, key=lambda r: r.size)
            self._free.remove(region)
            self.live += region.size
            self.stats["taken"] += 1
        return region.view(self._give_back)

    def wait_free(self, nbytes: int, timeout: float | None = None) -> bool:
        """Wait until a free region of at least `nbytes` exists (benchmarks, tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: any(r.size >= nbytes for r in self._free), timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is being made and what is asked is there (or the budget is spent)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or (not self.making and self._next_size() == 0), timeout
            )

    def _give_back(self, region: Region) -> None:
        with self._cond:
            self.live -= region.size
            if self._closed or self.free_bytes + region.size > self.keep:
                self.total -= region.size  # dropped: unregistered and unmapped with the region
            else:
                self._free.append(region)
            self._cond.notify_all()

    def _surplus(self) -> list[Region]:
        """Free regions beyond `keep`, removed from the pool (under the lock)."""
        out = []
        while self._free and self.free_bytes > self.keep:
            region = self._free.pop()
            self.total -= region.size
            out.append(region)
        return out

    def trim(self) -> int:
        """Give every free region back to the system; returns the bytes freed."""
        with self._cond:
            self.target = 0  # a prefill asked before is over
            freed, self._free = self._free, []
            n = sum(r.size for r in freed)
            self.total -= n
        del freed
        return n

    def close(self, wait: bool = True) -> None:
        """Stop growing and free the free regions (regions in use are freed when their tensors are
        dropped); a region still being made is freed once made, waited for unless `wait=False`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            for thread in self._growers:
                thread.join()
            self._growers = []
        self.trim()

    # -- growth ----------------------------------------------------------------------------------
    def _want(self) -> int:
        return max(self.demand - self.free_bytes - self.making, self.target - self.total)

    def _next_size(self) -> int:
        """Bytes of the next region to make (0: none), under the lock; requests that cannot fit the
        budget are dropped (those copies are staged)."""
        if self._closed:
            return 0
        room = self.budget - self.total
        while self._sizes:
            if self._sizes[0] <= room:
                return self._sizes[0]
            self._sizes.pop(0)
        want = self._want()
        if want <= 0:
            return 0
        size = min(self.region_bytes, FIRST_REGION << min(self._burst, 8), round_up(want, PAGE))
        size = round_up(max(size, self.largest + ALIGN), PAGE)
        if size > room:
            size = room // PAGE * PAGE
            if size < self.largest + ALIGN or size <= 0:
                return 0
        return size

    def _start_growers(self) -> None:
        while len(self._growers) < self.threads and not self._closed:
            thread = threading.Thread(target=self._grow, name="flux-ir-host-pool", daemon=True)
            thread.start()
            self._growers.append(thread)

    def _grow(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._next_size() == 0:
                    if not self.making:
                        self._burst = 0  # the next burst starts small again
                    self._cond.wait()
                if self._closed:
                    return
                size = self._next_size()
                if self._sizes and self._sizes[0] == size:
                    self._sizes.pop(0)
                else:
                    self._burst += 1
                self.making += size
                self.total += size
                if self.total >= self.target:
                    self.target = 0  # reached: a prefill is made once
            t0 = time.perf_counter()
            try:
                region = make_region(size, self.pin, self.huge_pages)
            except Exception:  # out of memory: stop asking; those copies are staged
                with self._cond:
                    self.making -= size
                    self.total -= size
                    self.demand, self.target, self._sizes = 0, 0, []
                    self._cond.notify_all()
                continue
            with self._cond:
                self.making -= size
                if self._closed:  # nobody will take it: unregistered and unmapped with it
                    self.total -= size
                    self._cond.notify_all()
                    return
                self.stats["regions"] += 1
                self.stats["made_bytes"] += size
                self.stats["make_s"] += time.perf_counter() - t0
                self.stats["touch_s"] += region.touch_s
                if self.huge_pages and size > region.touch_s * HUGE_PAGES_MIN_GBPS * 1e9:
                    self.huge_pages = False  # compaction stalls: ordinary pages fault faster
                self._free.append(region)
                self._cond.notify_all()


_POOL: HostPool | None = None
_POOL_LOCK = threading.Lock()


def host_pool() -> HostPool:
    """The process's page-locked pool, made at the first call (nothing is allocated until asked)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = HostPool()
        return _POOL


def reset_host_pool() -> None:
    """Close the process's pool and start a new, empty one at the next `host_pool()` (benchmarks
    measure a first capture this way; regions still in use stay valid until dropped)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.close()


@atexit.register
def _close_pool() -> None:
    pool = _POOL
    if pool is not None:
        with pool._cond:
            pool._closed = True
            pool._cond.notify_all()


class HostArena:
    """Long-lived host tensors carved one after another from `pool`'s regions (page-locked where the
    pool pins): an offloaded model's weights, filled once and kept.

    Args:
        pool: the pool the regions come from (its own, so that closing it leaves the capture
            copiers' pool alone: `HostPool(budget=...)`).
        nbytes: what will be carved in all; asked of the pool at once, so page-locking starts now
            in its threads and runs ahead of the carving.
        largest: the largest tensor to come (regions are made at least that large).

    `empty(shape, dtype)` waits for a region when none is ready (the copies into it are then paced
    by page-locking, never staged through pageable memory), and returns ordinary (pageable) memory
    only where the pool can make no more (its budget spent, or the host out of memory): correct,
    merely not page-locked. `close()` ends the ask and stops the pool's growth; the tensors stay
    valid, and each region goes back to the system when the last tensor carved from it is dropped.

    >>> arena = HostArena(HostPool(budget=64 << 20, pin=False, threads=1), 8 << 20)
    >>> w = arena.empty((1024, 1024), torch.float32)    # 4 MiB from the first region
    >>> w.shape, arena.stats["pageable_bytes"]
    (torch.Size([1024, 1024]), 0)
    >>> arena.close()
    """

    def __init__(self, pool: HostPool, nbytes: int, largest: int = 0):
        self.pool = pool
        self._asked = max(0, int(nbytes))
        self._view: np.ndarray | None = None
        self._used = 0
        self.stats = {"carved_bytes": 0, "pageable_bytes": 0, "regions": 0, "wait_s": 0.0}
        pool.reserve(self._asked, largest)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor of `shape` and `dtype` (contiguous, ALIGN-aligned)."""
        shape = torch.Size(shape)
        nbytes = shape.numel() * dtype.itemsize
        if self._view is None or self._used + nbytes > self._view.shape[0]:
            self._view, self._used = self._next_region(nbytes), 0
            if self._view is None:
                self.stats["pageable_bytes"] += nbytes
                return torch.empty(shape, dtype=dtype)
        at = self._used
        self._used = at + nbytes + (-nbytes % ALIGN)
        self.stats["carved_bytes"] += nbytes
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        return torch.from_numpy(self._view[at : at + nbytes]).view(dtype).view(shape)

    def _next_region(self, nbytes: int) -> np.ndarray | None:
        """A free region of at least `nbytes`, waited for while the pool makes one; None when it
        can make none."""
        t0 = time.perf_counter()
        view = self.pool.take(nbytes, wait=True)
        self.stats["wait_s"] += time.perf_counter() - t0
        if view is not None:
            got = min(self._asked, view.shape[0])
            if got:  # what this region covers is no longer asked of the pool
                self._asked -= got
                self.pool.reserve(-got)
            self.stats["regions"] += 1
        return view

    def close(self) -> None:
        """End the ask and stop the pool without waiting for regions still being made (they are
        freed once made); tensors carved stay valid while they live."""
        if self._asked:
            self.pool.reserve(-self._asked)
            self._asked = 0
        self._view = None
        self.pool.close(wait=False)
