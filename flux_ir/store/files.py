"""Save and load `.pt` capture files (the original tool's format) and their JSON metadata.

    save_capture(cap, "run/intermediates/capture_20260101_120000_flux-dev.pt")
    # run/intermediates/capture_20260101_120000_flux-dev.pt.sha256   sha256 of the file, `sha256sum -c`
    cap = load_capture("run/intermediates/capture_20260101_120000_flux-dev.pt")
    cap = load_capture("run/intermediates/capture_20260101_120000_flux-dev.pt", verify=True)
    checked = verify_capture("run/intermediates/capture_20260101_120000_flux-dev.pt")  # files, nbytes

Loading uses `torch.load(weights_only=True)`: no pickled code runs. Attention maps recorded with
the capture (`cap.attention`) are in the same file, under `"attention"`, memory-mapped like the rest. `save_capture` hashes the bytes
as torch writes them and records the digest in a one-line `sha256sum` file beside the capture,
written (atomically) after it; `verify=True` re-reads the whole file and compares. Files written
before flux-ir recorded digests have none: verifying them raises `CaptureFileError` ("no checksums
recorded"); they load as before without `verify`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from flux_ir.capture.schema import Capture
from flux_ir.errors import CaptureFileError
from flux_ir.io.atomic import (
    TORCH_WRITE_FAILURE,
    DigestWriter,
    atomic_path,
    disk_full_error,
    sha256_file,
    write_text,
)

REQUIRED_KEYS = ("double_blocks", "single_blocks", "denoising_context", "metadata")
DIGEST_SUFFIX = ".sha256"
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class Verified:
    """What `verify_capture` checked: `files` files holding `nbytes` bytes, every digest matching."""

    path: Path
    files: int
    nbytes: int


def digest_path(path: str | Path) -> Path:
    """The digest file beside a `.pt` capture: `capture_x.pt` -> `capture_x.pt.sha256`."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def save_capture(capture: Capture, path: str | Path) -> Path:
    """`torch.save` the capture's dict to `path` atomically, then its sha256 beside it.

    Raises CaptureFileError naming `path` when the write fails (the disk is full, ...).
    """
    path = Path(path)
    data = capture.to_dict()
    needed = _nbytes(data)
    try:
        with atomic_path(path, needed=needed) as tmp:
            with open(tmp, "wb") as f, DigestWriter(f) as out:
                torch.save(data, out)
                f.flush()
                os.fsync(f.fileno())
            # never a digest of the file being replaced beside the new one
            digest_path(path).unlink(missing_ok=True)
    except (OSError, RuntimeError) as err:
        failure = _write_failure(path, err, needed)
        if failure is None:
            raise  # not a failed write: a bug to see whole
        raise failure from err
    write_text(digest_path(path), f"{out.hexdigest()}  {path.name}\n")
    return path


def save_metadata_json(metadata: dict, path: str | Path) -> Path:
    return write_text(path, json.dumps(metadata, indent=2, default=str))


def load_capture(path: str | Path, mmap: bool = True, verify: bool = False) -> Capture:
    """Load a capture lazily, never executing pickled code: a `.pt` file (memory-mapped) or a
    streamed shard directory (see `flux_ir.store.shards`; tensors read on first access).

    `verify=True` first reads every byte and checks the digests recorded when the capture was
    written (see `verify_capture`); the default trusts the files and reads only what is used.
    Raises CaptureFileError naming the file when it is missing, truncated, damaged or not a capture.
    """
    path = Path(path)
    if verify:
        verify_capture(path)
    if path.is_dir():
        from flux_ir.store.shards import open_shards

        return open_shards(path)
    if not path.is_file():
        raise CaptureFileError(f"no capture file at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        failure = unreadable(path, err)
        if isinstance(err, pickle.UnpicklingError):
            raise failure from None  # torch's text advises loading unsafely: never shown
        raise failure from err
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CaptureFileError(
            f"{path} is not a flux-ir capture: expected keys {list(REQUIRED_KEYS)}, found {found}"
        )
    try:
        return Capture.from_dict(data)
    except CaptureFileError as err:  # attention maps that are not flux-ir's
        raise CaptureFileError(f"{path}: {err}") from err


def verify_capture(path: str | Path) -> Verified:
    """Check every byte of a capture against the digests recorded when it was written.

    A `.pt` file against its `.sha256` file; a shard directory against the sha256 of each shard and
    of `context.safetensors` in its manifest (a damaged shard is narrowed down to the tensor whose
    bytes differ). Costs one sequential read of the capture (sha256 runs at about 1.5 GB/s a core).
    Raises CaptureFileError naming the damaged file, or saying that no checksums were recorded.
    """
    path = Path(path)
    if path.is_dir():
        from flux_ir.store.shards import verify_shards

        files, nbytes = verify_shards(path)
        return Verified(path, files, nbytes)
    if not path.is_file():
        raise CaptureFileError(f"no capture file at {path}")
    sidecar = digest_path(path)
    if not sidecar.is_file():
        raise CaptureFileError(
            f"{path}: no checksums recorded (no {sidecar.name} beside it: written by flux-ir 0.1, "
            "or copied without it), so it cannot be verified; load it without verify."
        )
    expected = _read_digest(sidecar)
    if sha256_file(path) != expected:
        where = _locate_pt_damage(path)
        raise CaptureFileError(
            f"{path} is damaged: its sha256 differs from the one in {sidecar.name}"
            f"{f' (bytes differ in {where})' if where else ''}; re-run the capture to regenerate it."
        )
    return Verified(path, 1, path.stat().st_size)


# -- helpers ---------------------------------------------------------------------------------------
def _nbytes(obj) -> int:
    """Bytes of the distinct tensor storages in a nested structure (what torch.save writes)."""
    seen: dict[int, int] = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            s = x.untyped_storage()
            seen[s.data_ptr() or id(s)] = s.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list | tuple):
            stack.extend(x)
    return sum(seen.values()) + (1 << 16)  # plus the pickle and the zip's records


def _write_failure(path: Path, err: BaseException, needed: int) -> CaptureFileError | None:
    """CaptureFileError for a failed write of `path` (disk full, or another OSError underneath)."""
    full = disk_full_error(path, err, needed)
    if full is not None:
        return full
    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None and not any(marker in str(err) for marker in TORCH_WRITE_FAILURE):
        return None
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else err
    return CaptureFileError(f"could not write {path}: {reason}")


def _read_digest(sidecar: Path) -> str:
    text = sidecar.read_text(errors="replace").split()
    if not text or not re.fullmatch(r"[0-9a-f]{64}", text[0]):
        raise CaptureFileError(f"{sidecar} is not a sha256 line (`<hex>  <file name>`)")
    return text[0]


def unreadable(path: Path, err: BaseException) -> CaptureFileError:
    """Our own words for why torch could not load `path` (never torch's advice to load unsafely)."""
    text = str(err)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if isinstance(err, pickle.UnpicklingError):
        refused = re.search(
            r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+)|"
            r"Trying to call reduce for unrecognized function (.+?)(?: which|$)|"
            r"Can only create new object .* but got (.+)$",
            text,
            re.M,
        )
        if refused:
            what = next(g for g in refused.groups() if g)
            return CaptureFileError(
                f"{path} is not a flux-ir capture: its pickle holds objects other than tensors and "
                f"plain data ({what}), which flux-ir never writes. It was refused unread; none of "
                "its code ran."
            )
    if size == 0:
        return CaptureFileError(f"{path} is empty (0 bytes): its write never finished; re-run.")
    if head[:1] == b"\x80":  # a pickle: torch's format before 1.6, not a zip
        return CaptureFileError(
            f"{path} is in torch's legacy (non-zip) format and cannot be read ({type(err).__name__}); "
            "it is not a flux-ir capture."
        )
    if head != ZIP_MAGIC:
        return CaptureFileError(
            f"{path} is not a torch.save file: not a zip archive (it starts with {head!r}), so "
            "not a flux-ir capture."
        )
    if not zipfile.is_zipfile(path):
        return CaptureFileError(
            f"{path} is truncated: a zip archive without its end record ({size} bytes; the write "
            "was cut short?). Re-run the capture to regenerate it."
        )
    if isinstance(err, pickle.UnpicklingError | EOFError):
        return CaptureFileError(
            f"{path} is corrupted: its pickled structure (data.pkl) cannot be read. Re-run the "
            "capture to regenerate it."
        )
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return CaptureFileError(f"{path} is corrupted: {first}. Re-run the capture to regenerate it.")


def _locate_pt_damage(path: Path) -> str | None:
    """Which tensor's bytes fail the zip record's CRC-32 (torch records one per storage): the
    tensor's place in the capture, a record name, or None when it cannot be told."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return "its zip directory"
    if bad is None:
        return None  # damage outside the records' data (zip headers): the file is named
    if all(i.CRC == 0 for i in infos):
        return None  # written without CRCs: nothing to narrow down with
    if "/data/" not in bad:
        return f"{bad.split('/', 1)[-1]} (the capture's structure)"
    offsets = {}
    with open(path, "rb") as f:
        for info in infos:
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
    with contextlib.suppress(Exception):
        # memory-mapped, each storage starts at its record's offset in the one mapping of the file
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        tensors = list(_tensor_paths(data))
        ptrs = [t.untyped_storage().data_ptr() for _, t in tensors]
        data_offsets = [o for name, o in offsets.items() if "/data/" in name]
        base = min(ptrs) - min(data_offsets)
        names = [
            name for name, t in tensors if t.untyped_storage().data_ptr() - base == offsets[bad]
        ]
        if names:
            return ", ".join(names[:3])
    return f"record {bad}"


def _tensor_paths(obj, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensor_paths(v, f"{prefix}[{k!r}]" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensor_paths(v, f"{prefix}[{i}]")
