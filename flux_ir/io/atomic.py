"""Write files under a temporary name and rename, so nothing that looks complete is partial.

    with atomic_path("out/table.csv") as tmp:        # tmp: out/.table.tmp{pid}.csv
        tmp.write_text("a,b\\n1,2\\n")
    removed = remove_stale_temporaries("out")        # leftovers of killed writers, if any

Temporary names are the project's own, built by `temp_path` and recognised by `TEMP_NAME`:
`.NAME.tmpPID.ext` for files, `.NAME.tmpPID` for directories (shard directories being written), where
PID is the writing process. A temporary whose process is gone (on this host) and that has not changed
for `STALE_AFTER_S` seconds is a leftover of a killed run: `remove_stale_temporaries` deletes those,
and nothing else. A write that fails because the disk is full raises `CaptureFileError` saying so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flux_ir.errors import CaptureFileError

# `.NAME.tmpPID` or `.NAME.tmpPID.ext`: the only names `remove_stale_temporaries` ever deletes
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>[0-9]+)(?P<suffix>\.[A-Za-z0-9]+)?$")
# A dead writer's temporary is removed only once unchanged this long: a directory shared with
# writers on other hosts (whose PIDs mean nothing here) never loses a temporary still being written.
STALE_AFTER_S = 60.0
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# torch's zip writer reports a failed write as a RuntimeError with one of these
TORCH_WRITE_FAILURE = ("unexpected pos", "failed writing", "file write failed")


def temp_path(path: str | Path, pid: int | None = None, directory: bool = False) -> Path:
    """The temporary name beside `path` for process `pid` (default: this one).

    >>> temp_path("run/capture.pt", pid=12)
    PosixPath('run/.capture.tmp12.pt')
    >>> temp_path("run/capture_x", pid=12, directory=True)
    PosixPath('run/.capture_x.tmp12')
    """
    path = Path(path)
    pid = os.getpid() if pid is None else pid
    if directory or not path.suffix:
        return path.with_name(f".{path.name}.tmp{pid}")
    return path.with_name(f".{path.stem}.tmp{pid}{path.suffix}")


def is_temporary(name: str) -> bool:
    """True for a name `temp_path` makes."""
    return TEMP_NAME.match(name) is not None


def pid_alive(pid: int) -> bool:
    """True if a process `pid` runs on this host (or liveness cannot be told: never delete then)."""
    if pid == os.getpid():
        return True
    if pid <= 0 or os.name != "posix":
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: someone else's live process; no such PID: not ours
        return True
    return True


def _last_change(path: Path) -> float:
    """Newest mtime of `path` and, for a directory, of its entries (files being written change)."""
    newest = path.lstat().st_mtime
    if path.is_dir():
        with os.scandir(path) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def stale_temporaries(directory: str | Path, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """The project's temporaries directly in `directory` whose writer is dead on this host and that
    have not changed for `min_age_s` seconds; anything else (other dotfiles, live writers', links)
    is left alone. A missing directory has none."""
    directory = Path(directory)
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    now, out = time.time(), []
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match is None or entry.is_symlink() or pid_alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):  # vanished meanwhile: another cleaner or its writer
            if now - _last_change(path) >= min_age_s:
                out.append(path)
    return sorted(out)


def remove_stale_temporaries(
    *directories: str | Path, min_age_s: float = STALE_AFTER_S
) -> list[Path]:
    """Delete `stale_temporaries` of each directory (files, and shard directories whole); returns
    what was removed."""
    removed = []
    for directory in directories:
        for path in stale_temporaries(directory, min_age_s):
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            except OSError:  # not ours to delete after all (permissions): leave it
                continue
            removed.append(path)
    return removed


# -- disk full -------------------------------------------------------------------------------------
def human_bytes(n: int) -> str:
    """`n` bytes in binary units: '512 bytes', '3.2 MiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None


def disk_full_error(
    path: str | Path, err: BaseException, needed: int | None = None
) -> CaptureFileError | None:
    """A one-line `CaptureFileError` if `err` (or what it wraps) means the disk (or quota) is full
    while writing `path`, else None. `needed`: the bytes the write needs, when known.

    Recognises OSError ENOSPC / EDQUOT anywhere in the exception's chain, and torch's zip-writer
    RuntimeError ("unexpected pos ...") when the filesystem has less free space than `needed`.
    """
    path = Path(path)
    seen, e, full = set(), err, False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            full = True
            break
        e = e.__cause__ or e.__context__
    free = _free_bytes(path.parent)
    if not full and isinstance(err, RuntimeError):
        text = str(err)
        torch_write = any(marker in text for marker in TORCH_WRITE_FAILURE)
        full = torch_write and free is not None and free < (needed or 1 << 20)
    if not full:
        return None
    need = f"needs {human_bytes(needed)}" if needed else "needs more space"
    have = f", {human_bytes(free)} free there" if free is not None else ""
    return CaptureFileError(
        f"the disk is full: could not write {path} ({need}{have}); free some space or choose "
        "another output directory."
    )


@contextlib.contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, else delete it.

    A write that fails for want of space raises `CaptureFileError` naming `path` (and `needed`,
    the bytes it needs, when given).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        full = disk_full_error(path, err, needed)
        if full is None:
            raise
        raise full from err
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path, needed=len(text.encode())) as tmp:
        tmp.write_text(text)
    return Path(path)


# -- digests ---------------------------------------------------------------------------------------
class DigestWriter:
    """A binary file that also hashes (sha256) every byte written through it, as it is written.

    A large write is hashed on a helper thread while the file writes it (both release the GIL), and
    `write` returns only when both are done: the caller's buffer is never read after it returns.
    """

    OVERLAP = 1 << 20  # bytes from which hashing runs beside the write

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.nbytes = 0
        self._pool: ThreadPoolExecutor | None = None

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n < self.OVERLAP:
            self.file.write(data)  # a buffered file writes all of it or raises
            self.sha256.update(data)
        else:
            self._pool = self._pool or ThreadPoolExecutor(1, "flux-ir-sha256")
            hashed = self._pool.submit(self.sha256.update, data)
            try:
                self.file.write(data)
            finally:
                hashed.result()
        self.nbytes += n
        return n

    def flush(self) -> None:
        self.file.flush()

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> DigestWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read sequentially (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
