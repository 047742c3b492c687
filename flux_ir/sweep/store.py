"""A sweep directory: `metadata.json`, one PNG per point, a points table, and resuming.

    store = SweepStore("output/sweep")
    store.claim(cfg)                     # new directory, or the same sweep again; a different one is refused
    todo = store.pending(cfg.grid.points())
    pixels = np.zeros((cfg.sampling.height, cfg.sampling.width, 3), dtype=np.uint8)   # [H, W, 3]
    store.save_image(todo[0], pixels)    # atomic: a PNG that exists is complete
    store.append_points([point_row(todo[0], 1.0, 1.0)], rank=0)   # after each batch: its rows
    rows = store.finalise(cfg, grid_norms(cfg), extra={})          # points.csv and metadata.json

Layout::

    <dir>/metadata.json          settings, versions, and per point alpha, beta, row, col, norms, file
    <dir>/points.csv             the same per-point table (pandas.read_csv), `done` = image written
    <dir>/images/a000_b000.png   one image per point (row = alpha index, col = beta index)
    <dir>/phases/a000_b000.npy   optional: per-step x0 latents of the point (float16)
    <dir>/phases/a000_b000_s00.png  optional: the decoded x0 estimate at step 0 (a thumbnail)
    <dir>/parts/points.rankR.csv per process, a batch's rows appended after its images, merged by finalise
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from flux_ir.errors import InvalidArgumentError
from flux_ir.io.atomic import atomic_path, write_text
from flux_ir.io.png import write_png
from flux_ir.sweep.config import SweepConfig
from flux_ir.sweep.grid import GridPoint

METADATA = "metadata.json"
POINTS = "points.csv"
COLUMNS = ("index", "row", "col", "alpha", "beta", "norm_before", "norm_after", "file", "done")


class SweepStore:
    """Reads and writes one sweep directory; several processes may write disjoint points."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.images = self.root / "images"
        self.phases = self.root / "phases"
        self.parts = self.root / "parts"

    # -- the directory's sweep ------------------------------------------------------------------
    def read_metadata(self) -> dict | None:
        path = self.root / METADATA
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InvalidArgumentError(
                f"{path} is not valid JSON ({err}); remove it or choose another {{param}}",
                "output_dir",
            ) from err

    def check(self, cfg: SweepConfig) -> bool:
        """True if the directory already holds this sweep, False if it holds none.

        Raises InvalidArgumentError if it holds a different sweep, or is not a writable directory.
        """
        if self.root.exists() and not self.root.is_dir():
            raise InvalidArgumentError(
                f"{{param}} {self.root} is a file; choose a directory", "output_dir"
            )
        meta = self.read_metadata()
        if meta is None:
            if self.images.is_dir() and any(self.images.iterdir()):
                raise InvalidArgumentError(
                    f"{self.root} holds images but no {METADATA}; choose another {{param}}",
                    "output_dir",
                )
            return False
        theirs, ours = meta.get("sweep", {}), cfg.signature()
        if theirs != ours:
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise InvalidArgumentError(
                f"{self.root} holds a different sweep (differs in: {', '.join(differ)}). Re-run with the "
                "same settings to resume it, or choose another {param}.",
                "output_dir",
            )
        return True

    def claim(self, cfg: SweepConfig, extra: dict | None = None) -> None:
        """Create the directory and its metadata (complete: false) unless it already holds `cfg`."""
        if self.check(cfg):
            return
        for d in (self.root, self.images, self.parts):
            d.mkdir(parents=True, exist_ok=True)
        self.write_metadata(cfg, [], extra or {}, complete=False)

    def write_metadata(
        self, cfg: SweepConfig, rows: list[dict], extra: dict, complete: bool
    ) -> Path:
        grid = cfg.grid
        meta = {
            "sweep": cfg.signature(),
            "grid_size": [grid.n_alpha, grid.n_beta],
            "alphas": grid.alphas().tolist(),
            "betas": grid.betas().tolist(),
            "spacing": list(grid.spacing),
            "complete": complete,
            **extra,
            "points": rows,
        }
        return write_text(self.root / METADATA, json.dumps(meta, indent=1))

    # -- per point ------------------------------------------------------------------------------
    def is_done(self, point: GridPoint) -> bool:
        return (self.images / point.file).is_file()

    def pending(self, points: Iterable[GridPoint], phases: bool = False) -> list[GridPoint]:
        """Points without an image (or, with `phases`, without their per-step latents)."""
        return [
            p
            for p in points
            if not self.is_done(p) or (phases and not (self.phases / phase_file(p)).is_file())
        ]

    def save_image(self, point: GridPoint, image: np.ndarray | Image.Image) -> Path:
        """The point's image, [H, W, 3] uint8 (or a PIL image), as a PNG written atomically."""
        return write_png(self.images / point.file, np.asarray(image))

    def save_phases(self, point: GridPoint, x0: np.ndarray) -> Path:
        """Per-step x0 latents of one point, [steps, C, h, w], stored as float16 .npy."""
        path = self.phases / phase_file(point)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, x0.astype(np.float16), allow_pickle=False)
        return path

    def save_phase_image(self, point: GridPoint, step: int, image: Image.Image) -> Path:
        """The decoded x0 estimate of one point at one step (a thumbnail)."""
        return write_png(self.phases / phase_image_file(point, step), np.asarray(image))

    def load_phases(self, point: GridPoint) -> np.ndarray:
        return np.load(self.phases / phase_file(point), allow_pickle=False)

    # -- tables ---------------------------------------------------------------------------------
    def append_points(self, rows: Sequence[dict], rank: int) -> Path:
        """Append finished points to this process's part of the table (one write per batch; the
        header when the file is new). A write cut short leaves at most one partial last line, which
        `read_parts` skips; the images, not this table, say which points are done."""
        path = self.parts / f"points.rank{rank}.csv"
        text = table_csv(rows)
        if path.is_file() and path.stat().st_size > 0:
            text = text.split("\n", 1)[1]  # no second header
            with open(path, "rb") as f:
                f.seek(-1, io.SEEK_END)
                if f.read(1) != b"\n":  # an earlier write was cut short: end its line first
                    text = "\n" + text
        with open(path, "a") as f:
            f.write(text)
        return path

    def read_parts(self) -> dict[int, dict]:
        """Rows of every process's part, by point index (a later row wins; partial lines skipped)."""
        rows: dict[int, dict] = {}
        for part in sorted(self.parts.glob("points.rank*.csv")):
            for row in csv.DictReader(io.StringIO(part.read_text())):
                if None in row or None in row.values() or row["done"] not in ("True", "False"):
                    continue
                rows[int(row["index"])] = row
        return rows

    def finalise(
        self, cfg: SweepConfig, norms: dict[int, tuple[float, float]], extra: dict
    ) -> list[dict]:
        """Merge: every grid point with its norms and `done`; write points.csv and metadata.json."""
        rows = []
        for p in cfg.grid.points():
            before, after = norms[p.index]
            rows.append(
                {
                    "index": p.index,
                    "row": p.row,
                    "col": p.col,
                    "alpha": p.alpha,
                    "beta": p.beta,
                    "norm_before": before,
                    "norm_after": after,
                    "file": f"images/{p.file}",
                    "done": self.is_done(p),
                }
            )
        write_text(self.root / POINTS, table_csv(rows))
        self.write_metadata(cfg, rows, extra, complete=all(r["done"] for r in rows))
        return rows


def phase_file(point: GridPoint) -> str:
    return point.file.replace(".png", ".npy")


def phase_image_file(point: GridPoint, step: int) -> str:
    return point.file.replace(".png", f"_s{step:02d}.png")


def table_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in COLUMNS})
    return buf.getvalue()
