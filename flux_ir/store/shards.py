"""Streaming capture format: one safetensors shard per (pass, step), written as steps complete.

    writer = ShardWriter("run/intermediates/capture_x")       # a directory
    images, cap = run_capture(pipe, opts, copier=AsyncCopier(), sink=writer)
    writer.finish(cap)                                          # context + manifest.json, then rename
    cap = open_shards("run/intermediates/capture_x")            # lazy, memory-mapped

Layout of the directory:
    cond_step_0000.safetensors   double.{i}.img [B, N, D], double.{i}.txt [B, L, D], single.{i} [B, L+N, D]
    uncond_step_0000.safetensors (true CFG only)
    context.safetensors          img_state.{k}, y.{k}, temb.{k} (+ _uncond), final_latents
    attention.safetensors        only with attention maps (`cap.attention`): {pass}/{direction}/{kind}/
                                 {block}/{step} [B, T, H/16, W/16] and {pass}/txt->txt/... [B, T, L]
    manifest.json                metadata, scalar context, shard names and byte sizes, checksums
                                 (sha256 of each file, CRC-32 of each tensor's bytes; written last),
                                 the attention maps' metadata per pass

Tensors of single blocks hold what the `.pt` format holds (`[txt; img]`, or the captured stream).
The run is written into a hidden temporary directory renamed into place by `finish`, so a directory
with a manifest is complete. A background thread writes shards; the sink blocks when `max_pending`
steps wait (backpressure), so host memory stays bounded by a few steps, not by the run.

Checksums are computed from the bytes as they are written (hashing overlaps the write), never by
reading the file back; `verify_shards` (`load_capture(dir, verify=True)`) re-reads every file and
names the damaged file and the tensor whose bytes differ. Manifests of version 1 (flux-ir 0.1) have
no checksums. A new `ShardWriter` removes stale temporaries (of killed runs) from its parent directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux_ir.capture.attention import AttentionMaps
from flux_ir.capture.schema import Capture, attention_fields, joint_single
from flux_ir.errors import CaptureFileError, FluxIRError
from flux_ir.io.atomic import disk_full_error, remove_stale_temporaries, sha256_file, temp_path

FORMAT = "flux-ir-shards"
VERSION = 2  # 2: with "checksums"; 1 (flux-ir 0.1): without
MANIFEST = "manifest.json"
CONTEXT = "context.safetensors"
ATTENTION = "attention.safetensors"
ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}


@dataclass
class FileDigest:
    """What `write_safetensors` wrote: its size, the sha256 of the file and a CRC-32 per tensor."""

    size: int
    sha256: str
    crc32: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "crc32": self.crc32}


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, shown_as: Path | None = None
) -> FileDigest:
    """Write CPU tensors in the safetensors layout straight from their memory (no serialized copy).

    Hashes the bytes as they are written: sha256 of the file and CRC-32 of each tensor's bytes, on
    two helper threads that overlap the write (all three release the GIL). The file is fsync'ed.
    Raises CaptureFileError naming `shown_as` (default `path`) when the write fails (disk full...).
    """
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    size = len(head) + offset
    sha = hashlib.sha256(head)
    crcs: dict[str, object] = {}
    try:
        # one worker each: sha256 updates stay in file order, CRCs run beside them
        with (
            ThreadPoolExecutor(1, "flux-ir-sha256") as sha_pool,
            ThreadPoolExecutor(1, "flux-ir-crc32") as crc_pool,
            open(path, "wb") as f,
        ):
            f.write(head)
            for name, t in tensors.items():
                if not t.numel():
                    crcs[name] = 0
                    continue
                data = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
                sha_pool.submit(sha.update, data)
                crcs[name] = crc_pool.submit(zlib.crc32, data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        shown = shown_as or path
        full = disk_full_error(shown, err, size)
        raise (full or CaptureFileError(f"could not write {shown}: {err}")) from err
    crc32 = {k: v if isinstance(v, int) else v.result() for k, v in crcs.items()}
    return FileDigest(size, sha.hexdigest(), crc32)


def shard_name(pass_name: str, step: int) -> str:
    return f"{pass_name}_step_{step:04d}.safetensors"


class ShardWriter:
    """A `BlockTrace` sink that streams each finished pass to a shard (see module docstring)."""

    def __init__(self, directory: str | Path, max_pending: int = 1):
        self.path = Path(directory)
        if self.path.exists():
            raise CaptureFileError(f"{self.path} already exists; choose a new capture directory")
        remove_stale_temporaries(self.path.parent)  # leftovers of killed runs
        self.tmp = temp_path(self.path, directory=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.tmp.mkdir(parents=True)
        except OSError as err:
            full = disk_full_error(self.tmp, err)
            if full is None:
                raise
            raise full from err
        self.shards: dict[str, int] = {}
        self.checksums: dict[str, dict] = {}
        self.bytes_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flux-ir-shards", daemon=True)
        self._thread.start()

    def __call__(self, pass_name: str, step: int, items: dict, fence: threading.Event) -> None:
        self._check()
        self._queue.put((pass_name, step, items, fence))

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            pass_name, step, items, fence = job
            job = None
            if self._error is not None:
                continue
            try:
                fence.wait()
                name = shard_name(pass_name, step)
                tensors = _flatten(items)
                del items
                digest = write_safetensors(tensors, self.tmp / name, self.path / name)
                self.shards[name] = digest.size
                self.checksums[name] = digest.to_json()
                self.bytes_written += digest.size
            except BaseException as err:  # surfaced by the next call or finish()
                self._error = err

    def _check(self) -> None:
        if isinstance(self._error, FluxIRError):  # e.g. the disk is full: its own one-line message
            raise self._error
        if self._error is not None:
            raise CaptureFileError(f"writing capture shards failed: {self._error}") from self._error

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def finish(self, capture: Capture) -> Path:
        """Wait for the shards, write the context and the manifest, rename into place."""
        self._stop()
        self._check()
        ctx = capture.denoising_context
        tensors = {"final_latents": ctx["final_latents"]}
        scalars = {}
        for key, value in ctx.items():
            if key == "final_latents":
                continue
            if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                tensors.update({f"{key}.{k}": t for k, t in enumerate(value)})
                scalars[key] = len(value)
            else:
                scalars[key] = value
        digest = write_safetensors(tensors, self.tmp / CONTEXT, self.path / CONTEXT)
        self.bytes_written += digest.size
        checksums = {**self.checksums, CONTEXT: digest.to_json()}
        attention = {}
        if capture.attention_passes:
            maps = {
                f"{name}/{key}": t
                for name, pass_maps in capture.attention_passes.items()
                for key, t in pass_maps.to_tensors().items()
            }
            digest = write_safetensors(maps, self.tmp / ATTENTION, self.path / ATTENTION)
            self.bytes_written += digest.size
            checksums[ATTENTION] = digest.to_json()
            attention = {
                "attention": {
                    "file": ATTENTION,
                    "size": digest.size,
                    "passes": {n: m.metadata() for n, m in capture.attention_passes.items()},
                }
            }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "metadata": capture.metadata,
            "context": scalars,
            "passes": sorted({n.split("_step_")[0] for n in self.shards}),
            "shards": self.shards,
            "checksums": checksums,
            **attention,
        }
        text = json.dumps(manifest, indent=1)
        try:
            (self.tmp / MANIFEST).write_text(text)
        except OSError as err:
            full = disk_full_error(self.path / MANIFEST, err, len(text))
            if full is None:
                raise
            raise full from err
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the partial directory."""
        self._stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _flatten(items: dict) -> dict[str, torch.Tensor]:
    out = {}
    for (kind, i), value in sorted(items.items()):
        if kind == "double":
            img, txt = value
            if img is not None:
                out[f"double.{i}.img"] = img
            if txt is not None:
                out[f"double.{i}.txt"] = txt
        else:
            out[f"single.{i}"] = joint_single(value)
    return out


# -- reading ---------------------------------------------------------------------------------------
class ShardReader:
    """Opens shards on demand (memory-mapped by safetensors); `opened` lists the files read."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.opened: set[str] = set()

    def get(self, name: str, key: str) -> torch.Tensor | None:
        from safetensors import SafetensorError, safe_open

        path = self.dir / name
        self.opened.add(name)
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(key) if key in f.keys() else None
        except (SafetensorError, OSError) as err:
            raise CaptureFileError(
                f"{path} is not a readable capture shard (truncated or corrupted?): {err}. "
                "Re-run the capture to regenerate it."
            ) from err


class LazyTensors(Mapping):
    """The tensors of one file whose names start with `prefix` (the prefix taken off), read from it
    only when indexed; its header is read when the names are first listed."""

    def __init__(self, reader: ShardReader, name: str, prefix: str = ""):
        self.reader, self.name, self.prefix = reader, name, prefix
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            from safetensors import SafetensorError, safe_open

            path = self.reader.dir / self.name
            self.reader.opened.add(self.name)
            try:
                with safe_open(path, framework="pt") as f:
                    keys = list(f.keys())
            except (SafetensorError, OSError) as err:
                raise CaptureFileError(
                    f"{path} is not a readable capture file (truncated or corrupted?): {err}. "
                    "Re-run the capture to regenerate it."
                ) from err
            n = len(self.prefix)
            self._names = [k[n:] for k in keys if k.startswith(self.prefix)]
        return self._names

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.reader.get(self.name, self.prefix + name)
        if t is None:
            raise KeyError(name)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


class LazySteps(Sequence):
    """One block's tensors over captured steps, read from the shards only when indexed."""

    def __init__(self, reader: ShardReader, pass_name: str, kind: str, index: int, steps: list):
        self.reader, self.pass_name, self.kind, self.index, self.steps = (
            reader,
            pass_name,
            kind,
            index,
            steps,
        )

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, pos):
        if isinstance(pos, slice):
            return [self[i] for i in range(*pos.indices(len(self)))]
        name = shard_name(self.pass_name, self.steps[pos])
        if self.kind == "double":
            key = f"double.{self.index}"
            return (self.reader.get(name, f"{key}.img"), self.reader.get(name, f"{key}.txt"))
        return self.reader.get(name, f"single.{self.index}")


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a shard directory, checked to be one (a one-line CaptureFileError if not)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CaptureFileError(
            f"{path.parent} holds no {MANIFEST}: not a {FORMAT} capture, or its write never finished"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CaptureFileError(f"{path} is unreadable: {err}") from err
    if not isinstance(manifest, dict):
        raise CaptureFileError(
            f"{path} is not a {FORMAT} manifest: a JSON {type(manifest).__name__}, not an object"
        )
    if manifest.get("format") != FORMAT:
        raise CaptureFileError(f"{path.parent} is not a {FORMAT} capture")
    kinds = {"metadata": dict, "shards": dict, "context": dict, "passes": list}
    missing = [k for k in kinds if k not in manifest]
    if missing:
        raise CaptureFileError(
            f"{path} is damaged: it lacks {', '.join(repr(k) for k in missing)}; re-run the capture."
        )
    wrong = [k for k, kind in kinds.items() if not isinstance(manifest[k], kind)]
    shards = manifest["shards"]
    if not wrong and not all(isinstance(v, int) for v in shards.values()):
        wrong = ["shards"]
    md = manifest["metadata"]
    if not wrong and not all(
        isinstance(md.get(k), list)
        for k in ("captured_steps", "captured_double_blocks", "captured_single_blocks")
    ):
        wrong = ["metadata"]
    if wrong:
        raise CaptureFileError(
            f"{path} is damaged: {', '.join(repr(k) for k in wrong)} is not what flux-ir writes; "
            "re-run the capture."
        )
    return manifest


def verify_shards(directory: str | Path) -> tuple[int, int]:
    """Check each shard and the context against the sha256 in the manifest; returns (files, bytes).

    A file whose digest differs is narrowed down to the tensor whose bytes differ (CRC-32 per tensor)
    or to its header. Raises CaptureFileError naming the file (and tensor), or saying that the
    manifest records no checksums (flux-ir 0.1).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    sums = manifest.get("checksums")
    if not isinstance(sums, dict) or not sums:
        raise CaptureFileError(
            f"{directory}: no checksums recorded in its {MANIFEST} (written by flux-ir 0.1), so it "
            "cannot be verified; load it without verify."
        )
    names = [*manifest["shards"], CONTEXT, *([ATTENTION] if "attention" in manifest else [])]
    _check_sizes(directory, manifest["shards"])
    _check_attention_size(directory, manifest)
    nbytes = 0
    for name in names:
        path = directory / name
        entry = sums.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CaptureFileError(
                f"{path}: no checksum recorded in {MANIFEST}; it cannot be verified"
            )
        if not path.is_file():
            raise CaptureFileError(f"capture file {path} is missing; re-run the capture.")
        if sha256_file(path) != entry["sha256"]:
            raise CaptureFileError(
                f"{path} is damaged: {_locate_damage(path, entry.get('crc32') or {})}; its sha256 "
                f"differs from the one in {MANIFEST}. Re-run the capture to regenerate it."
            )
        nbytes += path.stat().st_size
    return len(names), nbytes


def _locate_damage(path: Path, crc32: dict) -> str:
    """Which part of a safetensors file holds other bytes than were written: a tensor, or its header."""
    if not crc32:
        return "its bytes differ from those written"
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            start = 8 + n
            bad = []
            for key, crc in crc32.items():
                lo, hi = header[key]["data_offsets"]
                f.seek(start + lo)
                value = 0
                remaining = hi - lo
                while remaining:
                    chunk = f.read(min(remaining, 1 << 24))
                    if not chunk:
                        break
                    value = zlib.crc32(chunk, value)
                    remaining -= len(chunk)
                if value != crc:
                    bad.append(key)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return "its header is damaged"
    if not bad:
        return "its header differs (every tensor's bytes are intact)"
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"the bytes of tensor {bad[0]!r}{more} differ from those written"


def _check_sizes(directory: Path, shards: dict) -> None:
    for name, size in shards.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            found = path.stat().st_size if path.is_file() else "missing"
            raise CaptureFileError(
                f"capture shard {path} is truncated or missing ({found} bytes, expected {size}); "
                "re-run the capture."
            )


def _check_attention_size(directory: Path, manifest: dict) -> None:
    entry = manifest.get("attention")
    if entry is None:
        return
    if not isinstance(entry, dict) or not isinstance(entry.get("passes"), dict):
        raise CaptureFileError(
            f"{directory / MANIFEST} is damaged: 'attention' is not what flux-ir writes; re-run "
            "the capture."
        )
    _check_sizes(directory, {ATTENTION: entry.get("size")})


def open_shards(directory: str | Path, verify: bool = False) -> Capture:
    """A `Capture` whose block tensors are read lazily from the shards; the context is loaded.

    `verify=True` first checks every file against the manifest's checksums (`verify_shards`).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if verify:
        verify_shards(directory)
    manifest = read_manifest(directory)
    _check_sizes(directory, manifest["shards"])
    _check_attention_size(directory, manifest)
    try:
        tensors = load_file(directory / CONTEXT)
    except Exception as err:  # safetensors raises several error types
        raise CaptureFileError(f"{directory / CONTEXT} is unreadable: {err}") from err
    try:
        return _capture(directory, manifest, tensors)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CaptureFileError(
            f"{directory / MANIFEST} does not match its files ({type(err).__name__}: {err}); "
            "re-run the capture."
        ) from err


def _capture(directory: Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> Capture:
    context = {}
    for key, value in manifest["context"].items():
        if isinstance(value, int) and f"{key}.0" in tensors:
            context[key] = [tensors[f"{key}.{k}"] for k in range(value)]
        else:
            context[key] = value
    context["final_latents"] = tensors["final_latents"]
    context["timestep_pairs"] = [tuple(p) for p in context["timestep_pairs"]]
    md = manifest["metadata"]
    steps = md["captured_steps"]
    reader = ShardReader(directory)

    def blocks(pass_name: str, kind: str) -> dict:
        if pass_name not in manifest["passes"]:
            return {}
        indices = md[f"captured_{kind}_blocks"]
        return {f"block_{i}": LazySteps(reader, pass_name, kind, i, steps) for i in indices}

    attention = {
        name: AttentionMaps.from_tensors(meta, LazyTensors(reader, ATTENTION, f"{name}/"))
        for name, meta in manifest.get("attention", {}).get("passes", {}).items()
    }
    cap = Capture(
        double_blocks=blocks("cond", "double"),
        single_blocks=blocks("cond", "single"),
        denoising_context=context,
        metadata=md,
        double_blocks_uncond=blocks("uncond", "double"),
        single_blocks_uncond=blocks("uncond", "single"),
        **attention_fields(attention),
    )
    cap.reader = reader
    return cap
