"""What a directory holds: a sweep (`flux-ir sweep`) or a capture run (`flux-ir capture`), and where
a capture run keeps its files.

    kind = run_kind(sweep_dir)                    # "sweep" (or "capture", or None)
    run_dir = capture_to_dir(pipe, spec, opts, "output")
    run = CaptureRun.open(run_dir)                # a capture run's files, found by their names
    run.capture_path, run.metadata["num_steps"]   # intermediates/capture_*.pt (or a shard folder)
    run.lens_file(BlockStep("single", 3, 1), "next")   # .../decoded_next/single_block_3_step_1.jpg

Nothing here loads a capture's tensors or a model: directories are told apart by their JSON files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flux_ir.errors import InvalidArgumentError
from flux_ir.lens.blocks import BlockStep
from flux_ir.sweep.store import METADATA

KINDS = ("sweep", "capture")


def is_sweep_dir(path: str | Path) -> bool:
    """A directory with a sweep's metadata.json (a JSON object with the settings under "sweep")."""
    meta = Path(path) / METADATA
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("sweep"), dict)


def is_capture_run(path: str | Path) -> bool:
    """A run directory of `flux-ir capture`: `intermediates/metadata_*.json` beside a capture."""
    inter = Path(path) / "intermediates"
    return inter.is_dir() and any(inter.glob("metadata_*.json")) and any(inter.glob("capture_*"))


def run_kind(path: str | Path) -> str | None:
    """ "sweep", "capture" or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if is_sweep_dir(path):
        return "sweep"
    if is_capture_run(path):
        return "capture"
    return None


@dataclass(frozen=True)
class CaptureRun:
    """A capture run directory: `root/img_{i}.jpg`, `root/intermediates/capture_*` (a .pt file or a
    shard directory), `metadata_*.json`, `decoded/` (lens target x0) and `decoded_next/`."""

    root: Path
    capture_path: Path
    metadata_path: Path
    metadata: dict

    @classmethod
    def open(cls, run_dir: str | Path) -> CaptureRun:
        root = Path(run_dir).expanduser()
        inter = root / "intermediates"
        metas = sorted(inter.glob("metadata_*.json")) if inter.is_dir() else []
        captures = sorted(
            p
            for p in (inter.glob("capture_*") if inter.is_dir() else [])
            if (p.is_dir() or p.suffix == ".pt") and not p.name.startswith(".")
        )
        if not metas or not captures:
            raise InvalidArgumentError(
                f"{{param}} {root} is not a capture run directory (no intermediates/metadata_*.json "
                "and capture_*); make one with `flux-ir capture`",
                "run_dir",
            )
        try:
            metadata = json.loads(metas[-1].read_text())
        except (OSError, ValueError) as err:
            raise InvalidArgumentError(f"{metas[-1]} is not readable JSON: {err}") from err
        return cls(root, captures[-1], metas[-1], metadata)

    @property
    def intermediates(self) -> Path:
        return self.capture_path.parent

    def decoded_dir(self, target: str = "x0") -> Path:
        """Where `decode_to_dir` writes a target's lens decodes."""
        return self.intermediates / ("decoded" if target == "x0" else f"decoded_{target}")

    def lens_file(self, item: BlockStep, target: str = "x0") -> Path:
        return self.decoded_dir(target) / f"{item.name}.jpg"

    def image_file(self, index: int = 0) -> Path:
        return self.root / f"img_{index}.jpg"

    @property
    def block_indices(self) -> dict[str, list[int]]:
        """Captured blocks per kind, from the metadata (all of the model's when it does not say)."""
        md = self.metadata
        return {
            kind: list(
                md.get(f"captured_{kind}_blocks", range(int(md.get(f"num_{kind}_blocks", 0))))
            )
            for kind in ("double", "single")
        }

    @property
    def captured_steps(self) -> list[int]:
        md = self.metadata
        return list(md.get("captured_steps", range(int(md.get("num_steps", 0)))))

    def items(self) -> list[BlockStep]:
        """Every captured (block, step), in depth order (as `flux_ir.lens.block_steps`)."""
        blocks = self.block_indices
        return [
            BlockStep(kind, i, s)
            for kind in ("double", "single")
            for i in blocks[kind]
            for s in self.captured_steps
        ]
