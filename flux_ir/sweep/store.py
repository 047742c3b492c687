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
    <dir>/images/a000_b000.png   one image per point (row = alpha index, col = beta index; with
                                 repeats a000_b000_r00.png, ...)
    <dir>/phases/a000_b000.npy   optional: per-step x0 latents of the point (float16)
    <dir>/phases/a000_b000_s00.png  optional: the decoded x0 estimate at step 0 (a thumbnail)
    <dir>/parts/points.rankR.csv per process, a batch's rows appended after its images, merged by finalise
    <dir>/claims/a000_b000.0.claim  while a process generates the point: its host, pid and run
    <dir>/vertices.safetensors   image or prompt vertices: the inverted vertex latents (`sweep_vertices`)

Identity: `check` compares the settings (`cfg.signature()`, under "sweep") and, once the model is
loaded, the weights' fingerprint (top-level "weights_fingerprint"; sweeps written before it was
recorded get it on their next run). Phases promised once ("phase_pool", "phase_images") stay promised:
`complete` is true only when every point has its image and every promised phase file.

Claims: a process generates a point only after creating its claim file (O_CREAT | O_EXCL), so
processes started independently on one directory never compute a point twice; a claim is removed
once the point's files are written. A claim whose process is gone (same host, PID not running) is
stale and taken over by creating the next generation `a000_b000.1.claim`; claims of other hosts are
left alone (`PointClaims`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from flux_ir.errors import InvalidArgumentError
from flux_ir.io.atomic import atomic_path, remove_stale_temporaries, write_text
from flux_ir.io.png import write_png
from flux_ir.sweep.config import SweepConfig
from flux_ir.sweep.grid import GridPoint

METADATA = "metadata.json"
POINTS = "points.csv"
COLUMNS = ("index", "row", "col", "alpha", "beta", "norm_before", "norm_after", "file", "done")
# top-level key of metadata.json: the weights that made the images (`weights_fingerprint`)
FINGERPRINT = "weights_fingerprint"


class SweepStore:
    """Reads and writes one sweep directory; several processes may write disjoint points."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.images = self.root / "images"
        self.phases = self.root / "phases"
        self.parts = self.root / "parts"
        self.claims = self.root / "claims"

    def __repr__(self) -> str:
        meta = self.read_metadata() if (self.root / METADATA).is_file() else None
        if not isinstance(meta, dict) or not isinstance(meta.get("sweep"), dict):
            return f"SweepStore({self.root}: no sweep yet)"
        sweep, points = meta["sweep"], meta.get("grid_size", ["?", "?"])
        done = len(list(self.images.glob("*.png"))) if self.images.is_dir() else 0
        return (
            f"SweepStore({self.root}: {sweep.get('model')}, {points[0]}x{points[1]} points, "
            f"{done} image(s), complete {meta.get('complete')})"
        )

    # -- the directory's sweep ------------------------------------------------------------------
    def read_metadata(self) -> dict | None:
        path = self.root / METADATA
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InvalidArgumentError(
                f"{path} is not valid JSON ({err}); remove it or choose another {{param}}",
                "output_dir",
            ) from err
        if not isinstance(meta, dict) or not isinstance(meta.get("sweep"), dict):
            raise InvalidArgumentError(
                f"{path} is not a sweep's metadata (a JSON object with the settings under "
                '"sweep"); remove it or choose another {param}',
                "output_dir",
            )
        return meta

    def check(self, cfg: SweepConfig, fingerprint: str | None = None) -> bool:
        """True if the directory already holds this sweep, False if it holds none.

        Raises InvalidArgumentError if it holds a different sweep, or is not a writable directory;
        with `fingerprint` (`weights_fingerprint` of the loaded pipeline), also if the directory
        records other weights (a directory that records none accepts any).
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
        theirs, ours = comparable_signature(meta["sweep"]), cfg.signature()
        if theirs != ours:
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise InvalidArgumentError(
                f"{self.root} holds a different sweep (differs in: {', '.join(differ)}). Re-run with the "
                "same settings to resume it, or choose another {param}.",
                "output_dir",
            )
        recorded = meta.get(FINGERPRINT)
        if fingerprint is not None and recorded is not None and recorded != fingerprint:
            raise InvalidArgumentError(
                f"{self.root} was generated with weights {recorded} but the loaded {cfg.model} has "
                f"weights {fingerprint}: the same model name, other weights (another "
                "$FLUX_IR_TOY_WEIGHTS or local model directory?). Load the weights it was made with "
                "to resume it, or choose another {param}.",
                "output_dir",
            )
        return True

    def claim(self, cfg: SweepConfig, extra: dict | None = None) -> None:
        """Create the directory and its metadata (complete: false) unless it already holds `cfg`.

        Removes temporaries that killed writers left in it (`remove_stale_temporaries`)."""
        resuming = self.check(cfg)
        remove_stale_temporaries(self.root, self.images, self.phases)
        if resuming:
            return
        for d in (self.root, self.images, self.parts):
            d.mkdir(parents=True, exist_ok=True)
        self.write_metadata(cfg, [], extra or {}, complete=False)

    def record_identity(self, **fields) -> dict:
        """Add `fields` (the weights' fingerprint, phases now promised) to metadata.json where it
        records none yet; recorded values are kept (`check` and `run_sweep` refuse a mismatch).
        Returns what the directory records now."""
        meta = self.read_metadata()
        if meta is None:
            return {}
        new = {k: v for k, v in fields.items() if v is not None and meta.get(k) is None}
        if new:
            meta.update(new)
            write_text(self.root / METADATA, json.dumps(meta, indent=1))
        return {k: meta.get(k) for k in fields}

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

    def has_outputs(self, point: GridPoint, phases: bool = False, thumbnails: int = 0) -> bool:
        """The point's image exists, and with `phases` its per-step latents, and its first
        `thumbnails` step images (`--phase_images`: one per step)."""
        return (
            self.is_done(point)
            and (not phases or (self.phases / phase_file(point)).is_file())
            and all((self.phases / phase_image_file(point, k)).is_file() for k in range(thumbnails))
        )

    def pending(
        self, points: Iterable[GridPoint], phases: bool = False, thumbnails: int = 0
    ) -> list[GridPoint]:
        """Points without an image (or, with `phases`, without their per-step latents; with
        `thumbnails`, without that many step images)."""
        return [p for p in points if not self.has_outputs(p, phases, thumbnails)]

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
        """Merge: every grid point with its norms and `done`; write points.csv and metadata.json.

        `complete` is true when every point has its image and the phase files promised (by `extra`
        or, kept, by the metadata already written: "phase_pool", "phase_images"). Claims of points
        whose files are all written are removed (a process may have died between the two)."""
        recorded = self.read_metadata() or {}
        extra = dict(extra)
        for key in (FINGERPRINT, "phase_pool", "phase_images"):  # a promise made stays made
            if extra.get(key) is None and recorded.get(key) is not None:
                extra[key] = recorded[key]
        outputs = {
            "phases": extra.get("phase_pool") is not None,
            "thumbnails": cfg.sampling.num_steps if extra.get("phase_images") else 0,
        }
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
                    **({} if p.repeat is None else {"repeat": p.repeat}),
                }
            )
        write_text(self.root / POINTS, table_csv(rows))
        missing = self.pending(cfg.grid.points(), **outputs)
        self.write_metadata(cfg, rows, extra, complete=not missing)
        self.remove_finished_claims(cfg.grid.points(), **outputs)
        return rows

    # -- claims ---------------------------------------------------------------------------------
    def claim_files(self) -> list[Path]:
        try:
            return sorted(p for p in self.claims.iterdir() if p.name.endswith(CLAIM_SUFFIX))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove_finished_claims(
        self, points: Iterable[GridPoint], phases: bool = False, thumbnails: int = 0
    ) -> None:
        """Delete the claims of points whose files are all written; the claims folder too if empty."""
        by_stem = {Path(p.file).stem: p for p in points}
        for path in self.claim_files():
            point = by_stem.get(path.name.split(".", 1)[0])
            if point is not None and self.has_outputs(point, phases, thumbnails):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.claims.rmdir()  # only when empty


def phase_file(point: GridPoint) -> str:
    return point.file.replace(".png", ".npy")


def phase_image_file(point: GridPoint, step: int) -> str:
    return point.file.replace(".png", f"_s{step:02d}.png")


def table_csv(rows: Sequence[dict]) -> str:
    """The points table; a sweep with repeats has a last column `repeat`."""
    columns = COLUMNS + (("repeat",) if rows and "repeat" in rows[0] else ())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in columns})
    return buf.getvalue()


def comparable_signature(signature: dict) -> dict:
    """A recorded signature as today's `SweepConfig.signature()` writes it: seeds modulo 2**64
    (written as given before they were normalised: -1 is now 2**64 - 1, the same noise)."""
    seeds = signature.get("seeds")
    if isinstance(seeds, list) and all(isinstance(s, int) for s in seeds):
        return {**signature, "seeds": [s % 2**64 for s in seeds]}
    return signature


# -- claims -----------------------------------------------------------------------------------------
CLAIM_SUFFIX = ".claim"
CLAIMED, DONE, BUSY, ELSEWHERE = "claimed", "done", "busy", "elsewhere"
UNREADABLE_GRACE_S = 60.0  # an empty or partial claim younger than this is being written
HOST = socket.gethostname()
_LIVE_RUNS: set[str] = set()  # PointClaims of this process still running (threads share a PID)


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux: /proc/PID/stat field 22), telling a reused PID from
    the process that wrote a claim; None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def claim_alive(owner: dict, path: Path | None = None) -> bool | None:
    """Whether the process that wrote a claim still runs: True, False (stale: its PID is gone from
    this host, or is another process now, or it was an earlier run of this process), or None when
    it cannot be told (another host)."""
    if not owner:  # empty or partial: being written, unless it has been so for long
        try:
            return time.time() - path.stat().st_mtime < UNREADABLE_GRACE_S if path else True
        except OSError:
            return False
    if owner.get("host") != HOST or os.name != "posix":
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return owner.get("run") in _LIVE_RUNS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        pass
    start = owner.get("start")
    return start is None or _process_start(pid) in (None, start)


def read_claim(path: Path) -> dict | None:
    """A claim's owner ({} while it is being written), or None if the file is gone."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}


class PointClaims:
    """This process's claims on a sweep's points (see the module's docstring).

        claims = PointClaims(store, rank=0)
        claims.acquire(point, done=lambda p: store.is_done(p))   # CLAIMED, DONE, BUSY or ELSEWHERE
        ...                                                      # generate and write the point
        claims.release(point)
        claims.close()                                           # releases whatever is left

    acquire: CLAIMED, the point is this process's to generate; DONE, its files exist (no claim is
    kept); BUSY, a live process on this host holds it (try again later: it may finish or die);
    ELSEWHERE, a process on another host holds it (whether it runs cannot be told here).
    """

    def __init__(self, store: SweepStore, rank: int = 0):
        self.store = store
        self.run = uuid.uuid4().hex[:12]
        self.owner = {
            "host": HOST,
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "rank": rank,
            "run": self.run,
        }
        self.held: dict[int, Path] = {}
        self.holders: dict[int, dict] = {}  # last owner seen of each BUSY or ELSEWHERE point
        _LIVE_RUNS.add(self.run)

    def _generations(self, point: GridPoint) -> list[tuple[int, Path]]:
        prefix = Path(point.file).stem + "."
        found = []
        for path in self.store.claim_files():
            gen = path.name[len(prefix) : -len(CLAIM_SUFFIX)]
            if path.name.startswith(prefix) and gen.isdigit():
                found.append((int(gen), path))
        return sorted(found)

    def acquire(self, point: GridPoint, done: Callable[[GridPoint], bool]) -> str:
        for _ in range(16):  # each retry follows another process's move on the same point
            gens = self._generations(point)
            gen = 0
            if gens:
                top, path = gens[-1]
                owner = read_claim(path)
                if owner is None:
                    continue  # released meanwhile: look again
                alive = claim_alive(owner, path)
                if alive is not False:
                    self.holders[point.index] = owner
                    if done(point):
                        return DONE
                    return BUSY if alive else ELSEWHERE
                gen = top + 1  # stale: the next generation takes over
            path = self.store.claims / f"{Path(point.file).stem}.{gen}{CLAIM_SUFFIX}"
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue  # another process got there first
            except FileNotFoundError:
                self.store.claims.mkdir(parents=True, exist_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.owner))
            self.held[point.index] = path
            for _, old in gens:  # the stale generations below ours
                old.unlink(missing_ok=True)
            if done(point):  # finished by a process that released it since we looked
                self.release(point)
                return DONE
            return CLAIMED
        return BUSY

    def release(self, point: GridPoint) -> None:
        path = self.held.pop(point.index, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for path in list(self.held.values()):
            path.unlink(missing_ok=True)
        self.held.clear()
        _LIVE_RUNS.discard(self.run)

    def __enter__(self) -> PointClaims:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
