"""The Fisher geometry of a sweep: posteriors of its images, free energy, metric and geodesics,
written beside the sweep's analysis.

    result = fisher_geometry(sweep_dir, PixelEmbedder(), width=8, steps=10, metric_resolution=8,
                             geodesics=[((0.0, 0.0), (1.0, 1.0))], geodesic_iterations=5,
                             progress=False)
    result.field.det                # [8, 8] det g over the sweep's alpha/beta box
    result.point_metric.shape       # (2, 2, 2, 2): g at every grid point [n_alpha, n_beta, 2, 2]
    result.geodesics[0].points      # [10, 2] metric-equidistant (alpha, beta) points

Every finished image is embedded (cached in `<dir>/embeddings/<embedder>.npz`, as `analyze` does;
vectors are L2-normalised), its posterior over the sweep's (alpha, beta) box computed on an R x R
grid (`flux_ir.analysis.fisher.kernel_posteriors`; R defaults to 128, or to the number of points
along the sweep's longer axis when that is smaller, so that a coarse sweep's posterior has no empty
cells between its points), the free-energy network fitted, and the metric evaluated on a dense grid
and at the sweep's points. Files, in `<dir>/analysis/`:

- `fisher_<embedder>.safetensors`: the fitted network (weights only; settings and losses in its
  metadata). A later call with the same settings on the same finished points loads it instead of
  fitting again (`refit=True` fits anyway), so geodesics can be added cheaply.
- `fisher_<embedder>.npz`: alphas, betas [M]; metric [M, M, 2, 2], det, eig_max, eig_min,
  free_energy [M, M]; point_metric [n_alpha, n_beta, 2, 2] and point_det (nan where an image is
  missing); the loss curves; per geodesic k `geodesic_k_curve`, `geodesic_k_points`, `line_k_points`.
- `fisher_<embedder>.json`: the settings, N, the losses, and per geodesic its endpoints, metric
  length, the straight line's metric length and the deviation from the straight line.

`geodesic_images` generates the images along a geodesic and along the straight line with the same
number of points, from the sweep's own vertex latents and settings.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flux_ir.analysis.embed import Embedder, embed_files
from flux_ir.analysis.fisher import (
    FreeEnergyFit,
    FreeEnergyNet,
    MetricField,
    UnitBox,
    fit_free_energy,
    kernel_posteriors,
    load_free_energy,
    metric_field,
    metric_tensor,
    save_free_energy,
)
from flux_ir.analysis.geodesic import Geodesic, geodesics
from flux_ir.analysis.sweep import open_sweep
from flux_ir.errors import InvalidArgumentError
from flux_ir.io.atomic import atomic_path, write_text

MAX_RESOLUTION = 128


@dataclass
class SweepGeodesic:
    """A geodesic in the sweep's (alpha, beta) coordinates: `curve` [n_points, 2], `points` [n_out,
    2] (metric-equidistant), `line_points` [n_out, 2] (evenly spaced on the straight line), metric
    `length` and `line_length`; `deviation` and `mean_deviation` from the straight segment measured
    in units of the box's sides (unit coordinates); `relative_deviation` = deviation / chord there."""

    start: tuple[float, float]
    end: tuple[float, float]
    curve: np.ndarray
    points: np.ndarray
    line_points: np.ndarray
    length: float
    line_length: float
    deviation: float
    mean_deviation: float
    relative_deviation: float

    @classmethod
    def from_unit(cls, geo: Geodesic, box: UnitBox) -> SweepGeodesic:
        n = len(geo.points)
        s = np.linspace(0.0, 1.0, n)[:, None]
        line = geo.start * (1 - s) + geo.end * s
        return cls(
            start=tuple(float(v) for v in box.from_unit(geo.start)),
            end=tuple(float(v) for v in box.from_unit(geo.end)),
            curve=box.from_unit(geo.curve),
            points=box.from_unit(geo.points),
            line_points=box.from_unit(line),
            length=geo.length,
            line_length=geo.line_length,
            deviation=geo.deviation,
            mean_deviation=geo.mean_deviation,
            relative_deviation=geo.relative_deviation,
        )

    def summary(self) -> dict:
        return {
            "start": list(self.start),
            "end": list(self.end),
            "length": self.length,
            "line_length": self.line_length,
            "deviation": self.deviation,
            "mean_deviation": self.mean_deviation,
            "relative_deviation": self.relative_deviation,
        }


@dataclass
class FisherGeometry:
    """What `fisher_geometry` computed: the box, the fitted network (`net`, with N `n_samples`),
    the metric `field` on the dense grid, `point_metric` [n_alpha, n_beta, 2, 2] at the sweep's
    points (nan where missing), the `geodesics`, the losses, and the files written (`paths`)."""

    embedder: str
    box: UnitBox
    alphas: np.ndarray  # the sweep's [n_alpha]
    betas: np.ndarray  # the sweep's [n_beta]
    net: FreeEnergyNet
    n_samples: float
    resolution: int
    field: MetricField
    point_metric: np.ndarray
    losses: dict
    geodesics: list[SweepGeodesic] = field(default_factory=list)
    reused: bool = False
    out_dir: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # as recorded in the .json
    stem: str = ""  # the files' name: fisher_<embedder>

    def save(self) -> dict[str, Path]:
        """Write the .npz and .json again, with every geodesic added since (`add_geodesics`)."""
        if self.out_dir is None or not self.stem:
            raise InvalidArgumentError(
                "{param} was not made by fisher_geometry: no files", "result"
            )
        self.paths.update(write_fisher(self, self.settings, self.stem))
        return self.paths

    @property
    def point_det(self) -> np.ndarray:
        """det g at the sweep's points: [n_alpha, n_beta]."""
        return np.linalg.det(self.point_metric)

    def add_geodesic(self, start, end, **options) -> SweepGeodesic:
        """Compute one more geodesic between two (alpha, beta) points (files are not rewritten:
        `save` does);
        options as for `flux_ir.analysis.geodesic.geodesics`."""
        return self.add_geodesics([(start, end)], **options)[0]

    def add_geodesics(self, pairs, **options) -> list[SweepGeodesic]:
        """Geodesics between (alpha, beta) point pairs, optimised together (files not rewritten:
        `save` does)."""
        pairs = [(_ab(a, self.box, "geodesic"), _ab(b, self.box, "geodesic")) for a, b in pairs]
        starts = [self.box.to_unit(a) for a, _ in pairs]
        ends = [self.box.to_unit(b) for _, b in pairs]
        found = [
            SweepGeodesic.from_unit(g, self.box)
            for g in geodesics(self.net, starts, ends, **options)
        ]
        self.geodesics += found
        return found


def default_resolution(n_alpha: int, n_beta: int) -> int:
    """128, or the number of points along the sweep's longer axis when smaller (at least 2)."""
    return max(2, min(MAX_RESOLUTION, max(n_alpha, n_beta)))


def fisher_geometry(
    sweep_dir: str | Path,
    embedder: Embedder,
    *,
    resolution: int | None = None,
    n_samples: float | None = None,
    width: int = 512,
    depth: int = 4,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    val_fraction: float = 0.2,
    metric_resolution: int = 128,
    geodesics: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
    geodesic_points: int = 10,
    geodesic_iterations: int = 5000,
    through_metric: bool = True,
    positive: bool = True,
    seed: int = 0,
    device: str | None = None,
    refit: bool = False,
    progress: bool = True,
) -> FisherGeometry:
    """Posterior, free energy, metric (and geodesics between (alpha, beta) point pairs) of a sweep;
    writes the files listed in the module docstring and returns them with the results.

    `device` (default: cuda when available) runs the posterior, the fit and the metric. The
    geodesics are optimised together; `through_metric` and `positive` are those of
    `flux_ir.analysis.geodesic.geodesics` (both True: differences from the reference code).
    """
    _check_settings(
        resolution=resolution,
        width=width,
        depth=depth,
        steps=steps,
        batch_size=batch_size,
        metric_resolution=metric_resolution,
        geodesic_points=geodesic_points,
        geodesic_iterations=geodesic_iterations,
    )
    if not (isinstance(lr, int | float) and lr > 0):
        raise InvalidArgumentError(f"{{param}} must be a positive number, got {lr!r}", "lr")
    if n_samples is not None and not (isinstance(n_samples, int | float) and n_samples > 0):
        raise InvalidArgumentError(
            f"{{param}} must be a positive number, got {n_samples!r}", "n_samples"
        )
    store, cfg, rows = open_sweep(sweep_dir)
    done = [r for r in rows if r["done"]]
    if len(done) < 2:
        raise InvalidArgumentError(
            f"{store.root} has {len(done)} finished point(s); the metric needs at least 2 (resume the "
            "sweep first)"
        )
    grid = cfg.grid
    if grid.path is not None or grid.n_alpha < 2 or grid.n_beta < 2:
        raise InvalidArgumentError(
            f"{store.root} is a 1-D sweep ({grid.n_alpha} x {grid.n_beta}); the Fisher metric needs a "
            "grid with at least 2 points along alpha and beta"
        )
    box = UnitBox(tuple(grid.alpha), tuple(grid.beta))
    if resolution is None:
        resolution = default_resolution(grid.n_alpha, grid.n_beta)
    parsed = [(_ab(a, box, "geodesic"), _ab(b, box, "geodesic")) for a, b in geodesics]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = store.root / "analysis"
    out.mkdir(exist_ok=True)
    stem = f"fisher_{embedder.name}"
    net_path = out / f"{stem}.safetensors"

    coords_ab = np.array([[r["alpha"], r["beta"]] for r in done], dtype=np.float64)
    coords = box.to_unit(coords_ab)
    files = [r["file"] for r in done]
    settings = {
        "embedder": embedder.name,
        "resolution": resolution,
        "n_samples": n_samples,
        "width": width,
        "depth": depth,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "val_fraction": val_fraction,
        "seed": seed,
        "alpha": list(box.alpha),
        "beta": list(box.beta),
        "points": hashlib.sha256("\n".join(files).encode()).hexdigest()[:16],
        "n_points": len(files),
    }
    reused = False
    net = None
    if net_path.is_file() and not refit:
        loaded, meta = load_free_energy(net_path, device)
        if json.loads(meta.get("settings", "null")) == settings:
            net, fit_meta, reused = loaded, json.loads(meta["fit"]), True
    if net is None:
        vectors = embed_files(
            embedder,
            [store.root / f for f in files],
            cache=store.root / "embeddings" / f"{embedder.name}.npz",
        )
        e = torch.from_numpy(vectors).float()
        e = e / e.norm(dim=1, keepdim=True).clamp(min=1e-12)
        post = kernel_posteriors(e, coords, resolution, device=device, progress=progress)
        fit = fit_free_energy(
            post,
            coords,
            n_samples=n_samples,
            width=width,
            depth=depth,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            val_fraction=val_fraction,
            seed=seed,
            device=device,
            progress=progress,
        )
        del post
        net, fit_meta = fit.net, _fit_record(fit)
        save_free_energy(
            net,
            net_path,
            {"settings": json.dumps(settings), "fit": json.dumps(fit_meta)},
        )
    field_ = metric_field(net, metric_resolution, box)
    point_metric = np.full((grid.n_alpha, grid.n_beta, 2, 2), np.nan)
    g = metric_tensor(net, coords).double().cpu().numpy()
    point_metric[[r["row"] for r in done], [r["col"] for r in done]] = box.metric_from_unit(g)
    result = FisherGeometry(
        embedder=embedder.name,
        box=box,
        alphas=grid.alphas(),
        betas=grid.betas(),
        net=net,
        n_samples=float(fit_meta["n_samples"]),
        resolution=resolution,
        field=field_,
        point_metric=point_metric,
        losses={k: fit_meta[k] for k in ("eval_steps", "train_loss", "val_loss", "best_step")},
        reused=reused,
        out_dir=out,
        settings=settings,
        stem=stem,
    )
    if parsed:
        result.add_geodesics(
            parsed,
            n_out=geodesic_points,
            iterations=geodesic_iterations,
            through_metric=through_metric,
            positive=positive,
            progress=progress,
        )
    result.paths = write_fisher(result, settings, stem)
    result.paths["network"] = net_path
    return result


def write_fisher(result: FisherGeometry, settings: dict, stem: str) -> dict[str, Path]:
    """`<stem>.npz` and `<stem>.json` in result.out_dir."""
    f = result.field
    arrays = {
        "alphas": f.alphas,
        "betas": f.betas,
        "metric": f.metric,
        "det": f.det,
        "eig_max": f.eig_max,
        "eig_min": f.eig_min,
        "free_energy": f.free_energy,
        "sweep_alphas": result.alphas,
        "sweep_betas": result.betas,
        "point_metric": result.point_metric,
        "point_det": result.point_det,
        "n_samples": np.array(result.n_samples),
        "resolution": np.array(result.resolution),
        "eval_steps": np.asarray(result.losses["eval_steps"], dtype=np.int64),
        "train_loss": np.asarray(result.losses["train_loss"], dtype=np.float64),
        "val_loss": np.asarray(result.losses["val_loss"], dtype=np.float64),
    }
    for k, geo in enumerate(result.geodesics):
        arrays[f"geodesic_{k}_curve"] = geo.curve
        arrays[f"geodesic_{k}_points"] = geo.points
        arrays[f"line_{k}_points"] = geo.line_points
    out = result.out_dir
    npz = out / f"{stem}.npz"
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    summary = {
        "settings": settings,
        "n_samples": result.n_samples,
        "reused_network": result.reused,
        "best_step": result.losses["best_step"],
        "best_val_loss": min(result.losses["val_loss"], default=None),
        "det_median": float(np.nanmedian(f.det)),
        "geodesics": [g.summary() for g in result.geodesics],
    }
    path = out / f"{stem}.json"
    write_text(path, json.dumps(summary, indent=1) + "\n")
    return {"npz": npz, "json": path}


def _check_settings(**values) -> None:
    """Integer settings, checked before anything is embedded or fitted."""
    least = {
        "resolution": 2,
        "metric_resolution": 2,
        "geodesic_points": 2,
        "geodesic_iterations": 0,
    }
    for name, value in values.items():
        if value is None and name == "resolution":
            continue
        low = least.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise InvalidArgumentError(f"{{param}} must be {what}, got {value!r}", name)


def _fit_record(fit: FreeEnergyFit) -> dict:
    return {
        "n_samples": fit.n_samples,
        "resolution": fit.resolution,
        "best_step": fit.best_step,
        "eval_steps": fit.eval_steps.tolist(),
        "train_loss": fit.train_loss.tolist(),
        "val_loss": fit.val_loss.tolist(),
    }


def _ab(point, box: UnitBox, name: str) -> np.ndarray:
    try:
        p = np.asarray(point, dtype=np.float64).reshape(2)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"{{param}} endpoints must be (alpha, beta) pairs, got {point!r}", name
        ) from err
    u = box.to_unit(p)
    if not np.isfinite(p).all() or (u < -1e-9).any() or (u > 1 + 1e-9).any():
        raise InvalidArgumentError(
            f"{{param}} endpoint ({p[0]:g}, {p[1]:g}) lies outside the sweep's box alpha "
            f"{box.alpha[0]:g}..{box.alpha[1]:g}, beta {box.beta[0]:g}..{box.beta[1]:g}",
            name,
        )
    return p


# -- boundaries --------------------------------------------------------------------------------------
def class_boundaries(classes: np.ndarray) -> np.ndarray:
    """Cells of a class map [n_alpha, n_beta] with a 4-neighbour of another class: bool, same shape."""
    c = np.asarray(classes)
    edge = np.zeros(c.shape, dtype=bool)
    diff_a = c[1:, :] != c[:-1, :]
    diff_b = c[:, 1:] != c[:, :-1]
    edge[1:, :] |= diff_a
    edge[:-1, :] |= diff_a
    edge[:, 1:] |= diff_b
    edge[:, :-1] |= diff_b
    return edge


@dataclass
class BoundaryContrast:
    """Mean of a per-cell value on class-boundary cells and on interior cells, and their ratio."""

    boundary_mean: float
    interior_mean: float
    boundary_cells: int
    interior_cells: int

    @property
    def ratio(self) -> float:
        return self.boundary_mean / self.interior_mean if self.interior_mean else math.nan


def boundary_contrast(values: np.ndarray, classes: np.ndarray) -> BoundaryContrast:
    """Compare `values` [n_alpha, n_beta] (e.g. `point_det`) on boundary vs interior cells of
    `classes` (nan values are left out)."""
    v = np.asarray(values, dtype=np.float64)
    edge = class_boundaries(classes)
    ok = np.isfinite(v)
    on, off = v[edge & ok], v[~edge & ok]
    return BoundaryContrast(
        float(on.mean()) if on.size else math.nan,
        float(off.mean()) if off.size else math.nan,
        int(on.size),
        int(off.size),
    )


@dataclass
class LinePairs:
    """Pairs of grid cells, (row, col) -> (row, col): `same`, whose straight line stays inside one
    class, and `crossing`, whose endpoints lie in different classes; `chord` lengths in cells."""

    same: list[tuple[tuple[int, int], tuple[int, int]]]
    crossing: list[tuple[tuple[int, int], tuple[int, int]]]

    @staticmethod
    def chord(pair) -> float:
        (r0, c0), (r1, c1) = pair
        return math.hypot(r1 - r0, c1 - c0)


def line_cells(start, end, per_cell: int = 4) -> np.ndarray:
    """The grid cells a straight segment between two cell centres passes through, read at
    `per_cell` samples per cell of length (nearest cell): [k, 2] (row, col), endpoints included."""
    a, b = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    k = max(2, int(math.ceil(per_cell * float(np.linalg.norm(b - a)))) + 1)
    t = np.linspace(0.0, 1.0, k)[:, None]
    return np.rint(a * (1 - t) + b * t).astype(np.int64)


def line_pairs(
    classes: np.ndarray,
    n: int = 3,
    *,
    min_cells: float = 5.0,
    max_cells: float = 9.0,
    min_gap: float = 3.0,
    margin: int = 1,
) -> LinePairs:
    """Up to `n` pairs of cells of a class map [n_alpha, n_beta] whose straight line stays inside
    one class, and up to `n` whose endpoints lie in different classes (the line crosses a
    boundary), for comparing geodesics with the straight line on either side of a boundary.

    Every endpoint is an interior cell (`class_boundaries` False) at least `margin` cells from the
    map's edge (a geodesic there could only bend one way); a `same` pair's line passes
    only through cells of its endpoints' class (`line_cells`). Chords are between `min_cells` and
    `max_cells` cell widths, so both kinds have comparable lengths. Deterministic: candidates are
    taken longest first (ties in row-major order of the endpoints), `same` pairs from classes not
    used yet before a class is used twice, each pair's midpoint at least `min_gap` cells from the
    midpoints of pairs already taken of its kind.
    """
    c = np.asarray(classes)
    if c.ndim != 2:
        raise InvalidArgumentError(
            f"{{param}} must be a 2-D class map, got shape {c.shape}", "classes"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"{{param}} must be an integer >= 0, got {n!r}", "n")
    if not 0 < min_cells <= max_cells:
        raise InvalidArgumentError(
            f"{{param}} must satisfy 0 < min_cells <= max_cells, got {min_cells!r}, {max_cells!r}",
            "min_cells",
        )
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise InvalidArgumentError(f"{{param}} must be an integer >= 0, got {margin!r}", "margin")
    keep = ~class_boundaries(c)
    keep[:margin], keep[len(keep) - margin :] = False, False
    keep[:, :margin], keep[:, keep.shape[1] - margin :] = False, False
    inside = np.argwhere(keep)  # [m, 2] row-major
    candidates = []
    for i in range(len(inside)):
        for j in range(i + 1, len(inside)):
            a, b = inside[i], inside[j]
            d = math.hypot(*(b - a))
            if min_cells <= d <= max_cells:
                candidates.append((-d, i, j))
    candidates.sort()
    same: list = []
    crossing: list = []
    used: set = set()
    for allow_reuse in (False, True):
        for _, i, j in candidates:
            a, b = inside[i], inside[j]
            if c[tuple(a)] != c[tuple(b)] or (not allow_reuse and c[tuple(a)] in used):
                continue
            if len(same) < n and _pair(a, b) not in same and _far(same, a, b, min_gap):
                cells = line_cells(a, b)
                if (c[cells[:, 0], cells[:, 1]] == c[tuple(a)]).all():
                    same.append(_pair(a, b))
                    used.add(c[tuple(a)])
    for _, i, j in candidates:
        a, b = inside[i], inside[j]
        if len(crossing) < n and c[tuple(a)] != c[tuple(b)] and _far(crossing, a, b, min_gap):
            crossing.append(_pair(a, b))
    return LinePairs(same, crossing)


def _pair(a, b) -> tuple[tuple[int, int], tuple[int, int]]:
    return (int(a[0]), int(a[1])), (int(b[0]), int(b[1]))


def _far(taken, a, b, gap: float) -> bool:
    mid = (np.asarray(a) + np.asarray(b)) / 2
    return all(np.linalg.norm(mid - (np.add(p, q) / 2)) >= gap for p, q in taken)


# -- images along a geodesic ----------------------------------------------------------------------
@dataclass
class GeodesicImages:
    """Images along a geodesic and along the straight line, `points` [k, 2] and `line_points`
    [k, 2] their (alpha, beta); `paths`: the files written (geodesic_00.png ..., line_00.png ...)."""

    geodesic: list
    line: list
    points: np.ndarray
    line_points: np.ndarray
    paths: list[Path] = field(default_factory=list)


def plane_latents(cfg, points: np.ndarray) -> torch.Tensor:
    """The sweep's latents at arbitrary (alpha, beta) points [k, 2]: z0 + a (z1 - z0) + b (z2 - z0)
    with the sweep's normalisation, [k, 16, h, w] float32 (the same rule the grid points follow)."""
    from flux_ir.sweep.grid import combine, normalise

    vertices = cfg.vertex_latents()
    p = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    z = combine(vertices, p[:, 0], p[:, 1])
    return normalise(z, cfg.grid.normalisation, vertices)


def geodesic_images(
    pipe,
    sweep_dir: str | Path,
    geo: SweepGeodesic,
    *,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
) -> GeodesicImages:
    """Generate the images at `geo.points` and at `geo.line_points` with the sweep's settings and
    vertex latents (through `flux_ir.sweep.generate.generate_batch`); with `out_dir`, write them
    there as geodesic_KK.png and line_KK.png."""
    from PIL import Image

    from flux_ir.sampling import encode_prompt
    from flux_ir.sweep.generate import generate_batch

    _, cfg, _ = open_sweep(sweep_dir)
    emb = encode_prompt(pipe, cfg.sampling)
    both = np.concatenate([geo.points, geo.line_points])
    z = plane_latents(cfg, both)
    images = []
    for lo in range(0, len(z), batch_size):
        pixels, _ = generate_batch(pipe, cfg, emb, z[lo : lo + batch_size])
        images += [Image.fromarray(a) for a in pixels.numpy()]
    k = len(geo.points)
    result = GeodesicImages(images[:k], images[k:], geo.points, geo.line_points)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for kind, ims in (("geodesic", result.geodesic), ("line", result.line)):
            for i, im in enumerate(ims):
                path = out / f"{kind}_{i:02d}.png"
                with atomic_path(path) as tmp:
                    im.save(tmp, format="PNG")
                result.paths.append(path)
    return result
