"""Streaming capture format: one safetensors shard per (pass, step), written as steps complete.

    writer = ShardWriter("run/intermediates/capture_x")       # a directory
    images, cap = run_capture(pipe, opts, copier=AsyncCopier(), sink=writer)
    writer.finish(cap)                                          # context + manifest.json, then rename
    cap = open_shards("run/intermediates/capture_x")            # lazy, memory-mapped

Layout of the directory:
    cond_step_0000.safetensors   double.{i}.img [B, N, D], double.{i}.txt [B, L, D], single.{i} [B, L+N, D]
    uncond_step_0000.safetensors (true CFG only)
    context.safetensors          img_state.{k}, y.{k}, temb.{k} (+ _uncond), final_latents
    manifest.json                metadata, scalar context, shard names and byte sizes (written last)

Tensors of single blocks hold what the `.pt` format holds (`[txt; img]`, or the captured stream).
The run is written into a hidden temporary directory renamed into place by `finish`, so a directory
with a manifest is complete. A background thread writes shards; the sink blocks when `max_pending`
steps wait (backpressure), so host memory stays bounded by a few steps, not by the run.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from flux_ir.capture.schema import Capture, joint_single
from flux_ir.errors import CaptureFileError

FORMAT = "flux-ir-shards"
MANIFEST = "manifest.json"
CONTEXT = "context.safetensors"
ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Write CPU tensors in the safetensors layout straight from their memory (no serialized copy).

    Returns the file size in bytes; the file is fsync'ed.
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
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def shard_name(pass_name: str, step: int) -> str:
    return f"{pass_name}_step_{step:04d}.safetensors"


class ShardWriter:
    """A `BlockTrace` sink that streams each finished pass to a shard (see module docstring)."""

    def __init__(self, directory: str | Path, max_pending: int = 1):
        self.path = Path(directory)
        if self.path.exists():
            raise CaptureFileError(f"{self.path} already exists; choose a new capture directory")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.shards: dict[str, int] = {}
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
                size = write_safetensors(tensors, self.tmp / name)
                self.shards[name] = size
                self.bytes_written += size
            except BaseException as err:  # surfaced by the next call or finish()
                self._error = err

    def _check(self) -> None:
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
        self.bytes_written += write_safetensors(tensors, self.tmp / CONTEXT)
        manifest = {
            "format": FORMAT,
            "version": 1,
            "metadata": capture.metadata,
            "context": scalars,
            "passes": sorted({n.split("_step_")[0] for n in self.shards}),
            "shards": self.shards,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
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


def open_shards(directory: str | Path) -> Capture:
    """A `Capture` whose block tensors are read lazily from the shards; the context is loaded."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CaptureFileError(f"{directory / MANIFEST} is unreadable: {err}") from err
    if manifest.get("format") != FORMAT:
        raise CaptureFileError(f"{directory} is not a {FORMAT} capture")
    for name, size in manifest["shards"].items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            found = path.stat().st_size if path.is_file() else "missing"
            raise CaptureFileError(
                f"capture shard {path} is truncated or missing ({found} bytes, expected {size}); "
                "re-run the capture."
            )
    try:
        tensors = load_file(directory / CONTEXT)
    except Exception as err:  # safetensors raises several error types
        raise CaptureFileError(f"{directory / CONTEXT} is unreadable: {err}") from err
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

    cap = Capture(
        double_blocks=blocks("cond", "double"),
        single_blocks=blocks("cond", "single"),
        denoising_context=context,
        metadata=md,
        double_blocks_uncond=blocks("uncond", "double"),
        single_blocks_uncond=blocks("uncond", "single"),
    )
    cap.reader = reader
    return cap
