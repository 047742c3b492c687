"""Write a sweep's files on a background thread while the device computes the next batch.

    with BackgroundWriter(max_pending=2) as writer:
        for k in range(3):
            pixels = np.full((8, 8, 3), k, dtype=np.uint8)        # made on the main thread
            writer.submit(write_png, f"image_{k}.png", pixels)   # waits only while 2 jobs are queued
    # here every submitted job has run, in order; the first error of a job is raised

Jobs run one at a time, in submission order, on one thread. The first job that fails stops the
others (they are skipped) and its exception is raised in the caller at the next `submit` or at
`close`. Leaving the `with` block, normally or by an exception (an error, Ctrl-C), waits until every
job already submitted has run: a sweep interrupted while generating loses only the batch in flight.
`blocked_s` is the time the caller spent waiting on the writer (a full queue, the final flush).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable


class BackgroundWriter:
    """A bounded queue of write jobs run in order on one thread; errors reach the caller."""

    def __init__(self, max_pending: int = 2, name: str = "sweep-writer"):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._closed = False
        self.blocked_s = 0.0
        self.busy_s = 0.0  # time the thread spent running jobs
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is not None:
                continue  # an earlier job failed: skip the rest, keep draining the queue
            fn, args = job
            t0 = time.perf_counter()
            try:
                fn(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                self._error = err
            self.busy_s += time.perf_counter() - t0

    def _raise_error(self) -> None:
        if self._error is not None:  # stays set: a failed writer runs nothing more
            raise self._error

    def submit(self, fn: Callable, *args) -> None:
        """Queue `fn(*args)`; raise the error of an earlier job instead, if one failed."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        self._raise_error()
        t0 = time.perf_counter()
        self._jobs.put((fn, args))
        self.blocked_s += time.perf_counter() - t0

    def close(self) -> None:
        """Wait for every submitted job to run; raise the first job error, if any."""
        if not self._closed:
            self._closed = True
            t0 = time.perf_counter()
            self._jobs.put(None)
            self._thread.join()
            self.blocked_s += time.perf_counter() - t0
        self._raise_error()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.close()
            return False
        try:
            self.close()  # finish what was submitted, then let the caller's exception through
        except BaseException as err:  # noqa: BLE001
            if err is not exc:
                exc.add_note(f"the background writer failed too: {err!r}")
        return False
