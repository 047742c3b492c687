"""Fisher-metric pictures: det g and the larger eigenvalue over the sweep, geodesics over the mosaic,
and the images along a geodesic beside those along the straight line.

    result = fisher_geometry(sweep_dir, PixelEmbedder(), width=8, steps=5, metric_resolution=8,
                             geodesics=[((0.0, 0.0), (1.0, 1.0))], geodesic_iterations=3,
                             progress=False)
    _, _, rows = open_sweep(sweep_dir)
    paths = plot_fisher(sweep_dir, rows, result)   # {"det": .../fisher_det_pixel32.png, ...}

Axes as in `flux_ir.plots.sweep`: beta left to right, alpha bottom to top. det g and the
eigenvalue are drawn on a logarithmic colour scale; where the fitted log Z is not convex (det g or
the eigenvalue not positive) the cell is grey. Figures are built without pyplot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import colors
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from flux_ir.analysis.fisher_sweep import FisherGeometry, GeodesicImages, SweepGeodesic
from flux_ir.plots.sweep import _extent, mosaic_array, save_figure

GEODESIC_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4")


def _log_image(ax, values: np.ndarray, extent, label: str, fig, cmap: str = "magma", alpha=1.0):
    masked = np.ma.masked_where(~(np.isfinite(values) & (values > 0)), values)
    cm = matplotlib.colormaps[cmap].with_extremes(bad="0.75")
    if masked.count():
        norm = colors.LogNorm(vmin=float(masked.min()), vmax=float(masked.max()))
    else:
        norm = None
    im = ax.imshow(
        masked, extent=extent, origin="lower", aspect="auto", cmap=cm, norm=norm, alpha=alpha
    )
    fig.colorbar(im, ax=ax, label=label)
    return im


def _axes(ax, title: str) -> None:
    ax.set_xlabel("beta (z2 - z0)")
    ax.set_ylabel("alpha (z1 - z0)")
    ax.set_title(title)


def metric_figure(result: FisherGeometry, which: str = "det") -> Figure:
    """Heatmap of det g (`which="det"`) or of the larger eigenvalue (`"eig_max"`) over the box."""
    f = result.field
    values = f.det if which == "det" else f.eig_max
    label = "det g" if which == "det" else "largest eigenvalue of g"
    fig = Figure(figsize=(6.5, 5.2))
    ax = fig.subplots()
    _log_image(ax, values, _extent(f.alphas, f.betas), label, fig)
    _axes(ax, f"Fisher metric: {label} ({result.embedder}, N = {result.n_samples:.3g})")
    return fig


def geodesics_figure(result: FisherGeometry, mosaic: np.ndarray | None = None) -> Figure:
    """Geodesics (lines, metric-equidistant points) and the straight lines (dashed), over the
    sweep's mosaic [H, W, 3] (when given) and over det g."""
    ncols = 2 if mosaic is not None else 1
    fig = Figure(figsize=(6.5 * ncols, 5.6), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    panels = []
    if mosaic is not None:
        axes[0].imshow(
            mosaic, extent=_extent(result.alphas, result.betas), origin="upper", aspect="auto"
        )
        panels.append((axes[0], "geodesics over the grid"))
    f = result.field
    _log_image(axes[-1], f.det, _extent(f.alphas, f.betas), "det g", fig)
    panels.append((axes[-1], "geodesics over det g"))
    for ax, title in panels:
        for k, geo in enumerate(result.geodesics):
            c = GEODESIC_COLOURS[k % len(GEODESIC_COLOURS)]
            ax.plot(geo.curve[:, 1], geo.curve[:, 0], color="white", lw=4, alpha=0.7)
            ax.plot(geo.curve[:, 1], geo.curve[:, 0], color=c, lw=2, label=f"geodesic {k}")
            ax.plot(geo.line_points[:, 1], geo.line_points[:, 0], color=c, lw=1.2, ls="--")
            ax.scatter(
                geo.points[:, 1], geo.points[:, 0], color=c, edgecolor="white", s=22, zorder=5
            )
        ax.set_xlim(*_extent(result.alphas, result.betas)[:2])
        ax.set_ylim(*_extent(result.alphas, result.betas)[2:])
        _axes(ax, title)
        if result.geodesics:
            ax.legend(loc="upper right", fontsize=8)
    return fig


def boundary_segments(classes: np.ndarray, alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """The edges between 4-neighbouring grid cells of different classes, classes [n_alpha, n_beta]
    on the sweep's alphas [n_alpha] and betas [n_beta]: segments [k, 2, 2] of (beta, alpha) points
    (x, y as drawn), each on the line halfway between the two cells' centres."""
    c = np.asarray(classes)
    a, b = np.asarray(alphas, dtype=np.float64), np.asarray(betas, dtype=np.float64)
    da = (a[-1] - a[0]) / (len(a) - 1) if len(a) > 1 else 1.0
    db = (b[-1] - b[0]) / (len(b) - 1) if len(b) > 1 else 1.0
    segs = []
    for i, j in np.argwhere(c[1:, :] != c[:-1, :]):  # between rows i and i + 1
        y = (a[i] + a[i + 1]) / 2
        segs.append([(b[j] - db / 2, y), (b[j] + db / 2, y)])
    for i, j in np.argwhere(c[:, 1:] != c[:, :-1]):  # between columns j and j + 1
        x = (b[j] + b[j + 1]) / 2
        segs.append([(x, a[i] - da / 2), (x, a[i] + da / 2)])
    return np.asarray(segs, dtype=np.float64).reshape(-1, 2, 2)


def class_geodesics_figure(
    result: FisherGeometry,
    classes: np.ndarray,
    groups: dict[str, Sequence[SweepGeodesic]],
    mosaic: np.ndarray | None = None,
    title: str = "",
) -> Figure:
    """det g over the box with the class boundaries of `classes` [n_alpha, n_beta] (white lines
    between cells of different classes) and, per named group of geodesics (e.g. "same class",
    "crossing"), each geodesic (solid) and its straight line (dashed) in the group's colour; beside
    it, with `mosaic` [H, W, 3], the same over the sweep's images."""
    ncols = 2 if mosaic is not None else 1
    fig = Figure(figsize=(6.5 * ncols, 5.6), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    extent = _extent(result.alphas, result.betas)
    panels = []
    if mosaic is not None:
        axes[0].imshow(mosaic, extent=extent, origin="upper", aspect="auto")
        panels.append((axes[0], "class boundaries and geodesics over the grid", "black"))
    f = result.field
    _log_image(axes[-1], f.det, _extent(f.alphas, f.betas), "det g", fig)
    panels.append((axes[-1], "det g, class boundaries, geodesics", "white"))
    segs = boundary_segments(classes, result.alphas, result.betas)
    for ax, panel_title, edge in panels:
        ax.add_collection(LineCollection(segs, colors=edge, linewidths=0.8, alpha=0.8))
        for k, (name, geos) in enumerate(groups.items()):
            c = GEODESIC_COLOURS[k % len(GEODESIC_COLOURS)]
            for i, geo in enumerate(geos):
                ax.plot(geo.curve[:, 1], geo.curve[:, 0], color="white", lw=3.5, alpha=0.6)
                ax.plot(geo.curve[:, 1], geo.curve[:, 0], color=c, lw=1.8,
                        label=f"{name}: geodesic" if i == 0 else None)  # fmt: skip
                ax.plot(geo.line_points[:, 1], geo.line_points[:, 0], color=c, lw=1.1, ls="--",
                        label=f"{name}: straight line" if i == 0 else None)  # fmt: skip
                ax.scatter([geo.start[1], geo.end[1]], [geo.start[0], geo.end[0]], color=c,
                           edgecolor="white", s=24, zorder=5)  # fmt: skip
        ax.set_xlim(*extent[:2])
        ax.set_ylim(*extent[2:])
        _axes(ax, panel_title)
        if groups:
            ax.legend(loc="upper right", fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def geodesic_strip(images: GeodesicImages, title: str = "") -> Figure:
    """Two rows: the images along the geodesic (top) and along the straight line (bottom), each
    labelled with its (alpha, beta)."""
    k = len(images.geodesic)
    fig = Figure(figsize=(1.6 * k, 3.9), layout="constrained")
    axes = fig.subplots(2, k, squeeze=False)
    for row, (ims, pts, name) in enumerate(
        ((images.geodesic, images.points, "geodesic"), (images.line, images.line_points, "line"))
    ):
        for i in range(k):
            ax = axes[row, i]
            ax.imshow(np.asarray(ims[i]))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"({pts[i, 0]:.2f}, {pts[i, 1]:.2f})", fontsize=7)
            if i == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    return fig


def plot_fisher(
    root: str | Path, rows: Sequence[dict], result: FisherGeometry, cell: int = 64
) -> dict[str, Path]:
    """Write fisher_det_<emb>.png, fisher_eig_<emb>.png and (with geodesics)
    fisher_geodesics_<emb>.png in result.out_dir."""
    out = Path(result.out_dir)
    emb = result.embedder
    paths = {
        "det": save_figure(metric_figure(result, "det"), out / f"fisher_det_{emb}.png"),
        "eig_max": save_figure(metric_figure(result, "eig_max"), out / f"fisher_eig_{emb}.png"),
    }
    if result.geodesics:
        mosaic = mosaic_array(Path(root), rows, len(result.alphas), len(result.betas), cell)
        paths["geodesics"] = save_figure(
            geodesics_figure(result, mosaic), out / f"fisher_geodesics_{emb}.png"
        )
    return paths
