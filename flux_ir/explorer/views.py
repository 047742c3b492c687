"""The explorer's data as JSON-ready dicts: the served folder's sweeps and capture runs, a sweep's grid
(points, norms, Lipschitz overlays, per-step phase maps, Fisher metric and geodesics, zoom links) and
a capture run's blocks.

    root = sweep_dir.parent.resolve()            # the served folder
    entries = list_entries(root)                 # [{"path": "sweep", "kind": "sweep", ...}, ...]
    view = sweep_view(root, root / "sweep")      # grid, points (image URLs, norms), overlays, links
    view["points"][0]["image"]                   # "/files/sweep/images/a000_b000.png"

A zoomed sweep is a sweep directory like any other, beside its parent, with a `zoom.json` that
links it to the parent (`ZOOM_LINK`: the parent's path relative to the zoomed sweep, and the range
asked for). A sweep's Fisher geometry (`flux-ir geometry`: analysis/fisher_<embedder>.npz and .json)
shows as log10 det g per grid cell and the geodesics as (alpha, beta) polylines (`fisher_overlays`).
Everything here reads JSON, CSV and .npz files (no pickles); nothing loads a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.parse import quote

import numpy as np

from flux_ir.analysis.block_metrics import CSV_NAME
from flux_ir.explorer.safety import relative
from flux_ir.sweep.config import SweepConfig
from flux_ir.sweep.store import SweepStore, phase_image_file
from flux_ir.workflows.run_dirs import CaptureRun, run_kind

ZOOM_LINK = "zoom.json"
MAX_DEPTH = 4  # folder levels below the root searched for sweeps and runs
MAX_ENTRIES = 1000
SKIP = {"images", "phases", "parts", "claims", "embeddings", "analysis", "intermediates", "movies"}


def file_url(root: Path, path: Path) -> str:
    return "/files/" + quote(relative(root, path))


def finite(value) -> float | None:
    """A float for JSON, None for NaN or infinity (JSON has neither)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def grid_json(array: np.ndarray) -> list:
    """A float array as nested lists with None for non-finite values."""
    return [grid_json(a) for a in array] if array.ndim > 1 else [finite(v) for v in array]


def list_entries(root: Path) -> list[dict]:
    """Every sweep and capture run under `root` (the root itself included), by path."""
    found: list[dict] = []

    def walk(folder: Path, depth: int) -> None:
        if len(found) >= MAX_ENTRIES:
            return
        kind = run_kind(folder)
        if kind is not None:
            found.append(entry(root, folder, kind))
            return
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if child.name.startswith(".") or child.name in SKIP:
                continue
            if child.resolve().is_relative_to(root):  # symbolic links out are not followed
                walk(child, depth + 1)

    walk(root, 0)
    return sorted(found, key=lambda e: e["path"])


def entry(root: Path, folder: Path, kind: str) -> dict:
    """A short description of one sweep or capture run."""
    out = {"path": relative(root, folder), "name": folder.name, "kind": kind}
    try:
        if kind == "sweep":
            meta = SweepStore(folder).read_metadata() or {}
            sweep = meta.get("sweep", {})
            grid = sweep.get("grid", {})
            out.update(
                model=sweep.get("model"),
                prompt=sweep.get("prompt"),
                grid=[grid.get("n_alpha"), grid.get("n_beta")],
                alpha=grid.get("alpha"),
                beta=grid.get("beta"),
                complete=meta.get("complete"),
                parent=parent_of(root, folder),
            )
        else:
            md = CaptureRun.open(folder).metadata
            out.update(model=md.get("model"), prompt=md.get("prompt"), steps=md.get("num_steps"))
    except (OSError, ValueError):  # a directory being written: listed, details left out
        pass
    return out


# -- zoom links -------------------------------------------------------------------------------------
def read_link(folder: Path) -> dict | None:
    path = folder / ZOOM_LINK
    if not path.is_file():
        return None
    try:
        link = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return link if isinstance(link, dict) else None


def parent_of(root: Path, folder: Path) -> str | None:
    """The served path of the sweep `folder` was zoomed from (None: none, or not served)."""
    link = read_link(folder)
    if link is None or not isinstance(link.get("parent"), str):
        return None
    parent = (folder / link["parent"]).resolve()
    if parent != root and not parent.is_relative_to(root):
        return None
    return relative(root, parent)


def children_of(root: Path, folder: Path) -> list[dict]:
    """Sweeps beside `folder` zoomed from it: [{"path", "alpha", "beta", "grid"}]."""
    out = []
    for sibling in sorted(folder.parent.glob(f"{folder.name}-zoom*")):
        link = read_link(sibling)
        if link is None or (sibling / link.get("parent", "")).resolve() != folder.resolve():
            continue
        out.append(
            {
                "path": relative(root, sibling),
                "alpha": link.get("alpha"),
                "beta": link.get("beta"),
                "grid": [link.get("n_alpha"), link.get("n_beta")],
            }
        )
    return out


# -- a sweep ----------------------------------------------------------------------------------------
def sweep_view(root: Path, folder: Path) -> dict:
    """Everything the sweep page shows (see the module docstring)."""
    store = SweepStore(folder)
    meta = store.read_metadata()
    if meta is None:
        raise FileNotFoundError(f"{relative(root, folder)} holds no sweep (no metadata.json)")
    cfg = SweepConfig.from_signature(meta["sweep"])
    grid, steps = cfg.grid, cfg.sampling.num_steps
    recorded = {int(r["index"]): r for r in meta.get("points", [])}
    recorded.update(store.read_parts() if store.parts.is_dir() else {})
    thumbs = bool(meta.get("phase_images"))
    points = []
    for p in grid.points():
        row = recorded.get(p.index, {})
        done = store.is_done(p)
        point = {
            "index": p.index,
            "row": p.row,
            "col": p.col,
            "alpha": p.alpha,
            "beta": p.beta,
            "norm_before": finite(row.get("norm_before")),
            "norm_after": finite(row.get("norm_after")),
            "done": done,
            "image": file_url(root, store.images / p.file) if done else None,
        }
        if thumbs:
            point["steps"] = [
                file_url(root, store.phases / phase_image_file(p, k)) for k in range(steps)
            ]
        points.append(point)
    s = cfg.sampling
    return {
        "kind": "sweep",
        "path": relative(root, folder),
        "name": folder.name,
        "model": cfg.model,
        "prompt": s.prompt,
        "size": [s.width, s.height],
        "num_steps": steps,
        "grid": grid.to_dict(),
        "alphas": grid.alphas().tolist(),
        "betas": grid.betas().tolist(),
        "spacing": [finite(v) for v in grid.spacing],
        "points": points,
        "done": sum(p["done"] for p in points),
        "complete": bool(meta.get("complete")) and all(p["done"] for p in points),
        "step_images": thumbs,
        "overlays": overlays(store, root),
        "fisher": fisher_overlays(store, grid, root),
        "parent": parent_of(root, folder),
        "children": children_of(root, folder),
        "zoomable": cfg.vertices_sha256 is None,
    }


def analysis_files(store: SweepStore, pattern: str, root: Path | None = None) -> list[Path]:
    """The sweep's analysis files matching `pattern`, sorted by name; with `root`, only those that
    resolve inside it (a symbolic link out of the served folder is left out)."""
    found = []
    for path in sorted((store.root / "analysis").glob(pattern)):
        if root is not None and not path.resolve().is_relative_to(root):
            continue
        if path.is_file():
            found.append(path)
    return found


def overlays(store: SweepStore, root: Path | None = None) -> dict:
    """{name: {"field": [n_alpha][n_beta], "phases": [steps][n_alpha][n_beta] or None, "space"}} of
    the sweep's analysis files (`flux-ir analyze`: analysis/lipschitz_<embedder>.npz)."""
    out = {}
    for path in analysis_files(store, "lipschitz_*.npz", root):
        try:
            with np.load(path, allow_pickle=False) as data:
                field = np.asarray(data["field"], dtype=float)
                phases = data["phase_fields"] if "phase_fields" in data else None
                space = str(data["phase_space"]) if "phase_space" in data else None
                out[path.stem] = {
                    "embedder": path.stem.removeprefix("lipschitz_"),
                    "field": grid_json(field),
                    "phases": None if phases is None else grid_json(np.asarray(phases, float)),
                    "space": space,
                }
        except (OSError, ValueError, KeyError):
            continue  # being rewritten, or not an analysis file: left out
    return out


def log10_det(det: np.ndarray) -> np.ndarray:
    """log10 of det g, nan where det is not a positive finite number (a missing image, or a metric
    without positive volume there)."""
    det = np.asarray(det, dtype=np.float64)
    out = np.full(det.shape, np.nan)
    ok = np.isfinite(det) & (det > 0)
    out[ok] = np.log10(det[ok])
    return out


def resample(values: np.ndarray, alphas: np.ndarray, betas: np.ndarray, grid) -> np.ndarray:
    """A field on the dense (alphas [M], betas [K]) grid, bilinearly interpolated at the sweep's
    points: [n_alpha, n_beta]; nan outside the dense grid's box and where a non-finite node has
    weight (a grid point on a node takes that node's value alone)."""
    from scipy.interpolate import RegularGridInterpolator

    alphas, betas = np.asarray(alphas, float), np.asarray(betas, float)
    a = snap_ends(np.asarray(grid.alphas(), float), alphas)
    b = snap_ends(np.asarray(grid.betas(), float), betas)
    values = np.asarray(values, float)
    missing = ~np.isfinite(values)
    at = np.stack(np.meshgrid(a, b, indexing="ij"), axis=-1)

    def interp(v):
        grid_ = (alphas, betas)
        return RegularGridInterpolator(grid_, v, bounds_error=False, fill_value=np.nan)(at)

    out = interp(np.where(missing, 0.0, values))
    out[~(interp(missing.astype(float)) < 1e-9)] = np.nan  # a missing node weighs in: missing
    return out


def snap_ends(x: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """`x` with values within rounding of the axis' ends put on them (the same box, written twice)."""
    tol = 1e-9 * max(1.0, float(np.ptp(axis)))
    x = np.where(np.abs(x - axis[0]) < tol, axis[0], x)
    return np.where(np.abs(x - axis[-1]) < tol, axis[-1], x)


def polyline(array) -> list:
    """An [n, 2] array of (alpha, beta) as [[alpha, beta], ...] (None for non-finite values)."""
    array = np.asarray(array, dtype=float)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"a polyline is [n, 2], got shape {array.shape}")
    return grid_json(array)


def fisher_overlays(store: SweepStore, grid, root: Path | None = None) -> dict:
    """{name: {"embedder", "field", "source", "geodesics"}} of the sweep's Fisher geometry files
    (`flux-ir geometry`: analysis/fisher_<embedder>.npz, with its .json), sorted by name.

    "field" [n_alpha][n_beta] is log10 det g per grid cell (None where det g is missing, not
    positive or not finite): the file's `point_det` when it matches the grid ("source":
    "points"), else its dense `det` resampled bilinearly at the grid's points ("dense"). Each
    geodesic k: "points" [P][2] (alpha, beta; `geodesic_k_points`), "curve" (`geodesic_k_curve`,
    the optimised polyline, when written), "line" (`line_k_points`) and from the .json its "start",
    "end", metric "length", the straight line's "line_length" and the "deviation" from it."""
    out = {}
    shape = (grid.n_alpha, grid.n_beta)
    for path in analysis_files(store, "fisher_*.npz", root):
        try:
            with np.load(path, allow_pickle=False) as data:
                point_det = data["point_det"] if "point_det" in data else None
                if point_det is not None and point_det.shape == shape and same_points(data, grid):
                    det, source = np.asarray(point_det, dtype=float), "points"
                else:
                    det = resample(data["det"], data["alphas"], data["betas"], grid)
                    source = "dense"
                geos = []
                while f"geodesic_{len(geos)}_points" in data:
                    k = len(geos)
                    curve = data.get(f"geodesic_{k}_curve")
                    line = data.get(f"line_{k}_points")
                    geos.append(
                        {
                            "index": k,
                            "points": polyline(data[f"geodesic_{k}_points"]),
                            "curve": None if curve is None else polyline(curve),
                            "line": None if line is None else polyline(line),
                        }
                    )
            summary = read_summary(path.with_suffix(".json"))
            for geo, info in zip(geos, summary.get("geodesics") or [], strict=False):
                if not isinstance(info, dict):
                    continue
                for key in ("start", "end"):
                    value = info.get(key)
                    if isinstance(value, list) and len(value) == 2:
                        geo[key] = [finite(v) for v in value]
                for key in ("length", "line_length", "deviation", "relative_deviation"):
                    if isinstance(info.get(key), int | float):
                        geo[key] = finite(info[key])
            out[path.stem] = {
                "embedder": path.stem.removeprefix("fisher_"),
                "field": grid_json(log10_det(det)),
                "source": source,
                "geodesics": geos,
            }
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being rewritten, or not a geometry file: left out
    return out


def same_points(data, grid) -> bool:
    """Whether the file's `sweep_alphas`, `sweep_betas` (when written) are the grid's."""
    for key, values in (("sweep_alphas", grid.alphas()), ("sweep_betas", grid.betas())):
        if key in data:
            mine = np.asarray(data[key], dtype=float)
            if mine.shape != values.shape or not np.allclose(mine, values, rtol=0, atol=1e-9):
                return False
    return True


def read_summary(path: Path) -> dict:
    """A geometry file's .json summary ({} when missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- a capture run ----------------------------------------------------------------------------------
def capture_view(root: Path, folder: Path) -> dict:
    """Blocks, steps, images and what is on disk of a capture run."""
    run = CaptureRun.open(folder)
    md = run.metadata
    blocks = [
        {"kind": kind, "index": i, "name": f"{kind} {i}"}
        for kind in ("double", "single")
        for i in run.block_indices[kind]
    ]
    images = sorted(folder.glob("img_*.jpg"))
    inter = run.intermediates
    decoded = {
        target: sum(1 for _ in run.decoded_dir(target).glob("*_block_*_step_*.jpg"))
        if run.decoded_dir(target).is_dir()
        else 0
        for target in ("x0", "next")
    }
    heatmaps = sorted((inter / "block_metrics").glob("*.png"))
    return {
        "kind": "capture",
        "path": relative(root, folder),
        "name": folder.name,
        "model": md.get("model"),
        "prompt": md.get("prompt"),
        "size": [md.get("width"), md.get("height")],
        "num_steps": md.get("num_steps"),
        "seed": md.get("seed"),
        "steps": run.captured_steps,
        "blocks": blocks,
        "streams": md.get("streams", "both"),
        "lens_available": md.get("streams", "both") != "txt" and md.get("reduce") is None,
        "images": [file_url(root, p) for p in images],
        "decoded": decoded,
        "mosaics": [file_url(root, p) for p in sorted(inter.glob("mosaic_*.jpg"))],
        "metrics": (inter / CSV_NAME).is_file(),
        "heatmaps": [file_url(root, p) for p in heatmaps],
    }
