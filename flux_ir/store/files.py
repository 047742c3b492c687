"""Save and load `.pt` capture files (the original tool's format) and their JSON metadata.

    save_capture(cap, "run/intermediates/capture_20260101_120000_flux-dev.pt")
    cap = load_capture("run/intermediates/capture_20260101_120000_flux-dev.pt")

Loading uses `torch.load(weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from flux_ir.capture.schema import Capture
from flux_ir.errors import CaptureFileError
from flux_ir.io.atomic import atomic_path, write_text

REQUIRED_KEYS = ("double_blocks", "single_blocks", "denoising_context", "metadata")


def save_capture(capture: Capture, path: str | Path) -> Path:
    """`torch.save` the capture's dict to `path` atomically."""
    with atomic_path(path) as tmp:
        torch.save(capture.to_dict(), tmp)
    return Path(path)


def save_metadata_json(metadata: dict, path: str | Path) -> Path:
    return write_text(path, json.dumps(metadata, indent=2, default=str))


def load_capture(path: str | Path, mmap: bool = True) -> Capture:
    """Load a capture lazily, never executing pickled code: a `.pt` file (memory-mapped) or a
    streamed shard directory (see `flux_ir.store.shards`; tensors read on first access).

    Raises CaptureFileError naming the file when it is missing, truncated or not a capture.
    """
    path = Path(path)
    if path.is_dir():
        from flux_ir.store.shards import open_shards

        return open_shards(path)
    if not path.is_file():
        raise CaptureFileError(f"no capture file at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CaptureFileError(
            f"{path} is not a readable capture file (truncated or corrupted?): {err}. "
            "Re-run the capture to regenerate it."
        ) from err
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CaptureFileError(
            f"{path} is not a flux-ir capture: expected keys {list(REQUIRED_KEYS)}, found {found}"
        )
    return Capture.from_dict(data)
