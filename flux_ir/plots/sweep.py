"""Sweep pictures: image mosaic on alpha/beta axes, Lipschitz heatmap, overlay, per-step phases.

    result = analyze_sweep(sweep_dir, PixelEmbedder())
    _, _, rows = open_sweep(sweep_dir)
    paths = plot_sweep(sweep_dir, rows, result)   # {"mosaic": .../analysis/mosaic.png, "lipschitz": ...}

Figures are matplotlib `Figure` objects drawn without pyplot, so importing this module never changes
matplotlib's backend (a notebook's inline plots keep working).

Axes: beta runs left to right (columns), alpha bottom to top (rows); every cell is centred on its
(beta, alpha) grid value, so the mosaic, the heatmap and the overlay line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from flux_ir.analysis.sweep import SweepAnalysis
from flux_ir.io.atomic import atomic_path


def mosaic_array(
    root: Path, rows: Sequence[dict], n_alpha: int, n_beta: int, cell: int = 64
) -> np.ndarray:
    """uint8 [n_alpha * cell, n_beta * cell, 3]; array row 0 holds the largest alpha (drawn at the top)."""
    canvas = np.full((n_alpha * cell, n_beta * cell, 3), 255, dtype=np.uint8)
    for r in rows:
        if not r["done"]:
            continue
        with Image.open(root / r["file"]) as im:
            thumb = np.asarray(im.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR))
        y = (n_alpha - 1 - r["row"]) * cell
        x = r["col"] * cell
        canvas[y : y + cell, x : x + cell] = thumb
    return canvas


def _extent(alphas: np.ndarray, betas: np.ndarray) -> tuple[float, float, float, float]:
    da = (alphas[-1] - alphas[0]) / (len(alphas) - 1) if len(alphas) > 1 else 1.0
    db = (betas[-1] - betas[0]) / (len(betas) - 1) if len(betas) > 1 else 1.0
    return betas[0] - db / 2, betas[-1] + db / 2, alphas[0] - da / 2, alphas[-1] + da / 2


def _figure(n_alpha: int, n_beta: int, ncols: int = 1):
    width = min(4 + 0.25 * n_beta, 16) * ncols
    height = min(3.5 + 0.25 * n_alpha, 16)
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, ncols, squeeze=False)


def _axes(ax, title: str) -> None:
    ax.set_xlabel("beta (z2 - z0)")
    ax.set_ylabel("alpha (z1 - z0)")
    ax.set_title(title)


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_sweep(
    root: str | Path, rows: Sequence[dict], result: SweepAnalysis, cell: int = 64
) -> dict[str, Path]:
    """Write mosaic.png, lipschitz_<emb>.png, overlay_<emb>.png (and phases_<emb>.png) in result.out_dir."""  # noqa: E501
    root = Path(root)
    alphas, betas = result.alphas, result.betas
    n_alpha, n_beta = len(alphas), len(betas)
    extent = _extent(alphas, betas)
    mosaic = mosaic_array(root, rows, n_alpha, n_beta, cell)
    out = result.out_dir
    paths: dict[str, Path] = {}

    fig, ax = _figure(n_alpha, n_beta)
    ax[0, 0].imshow(mosaic, extent=extent, origin="upper", aspect="auto")
    _axes(ax[0, 0], f"{n_alpha}x{n_beta} grid")
    paths["mosaic"] = save_figure(fig, out / "mosaic.png")

    fig, ax = _figure(n_alpha, n_beta)
    im = ax[0, 0].imshow(result.field, extent=extent, origin="lower", aspect="auto", cmap="magma")
    fig.colorbar(im, ax=ax[0, 0], label="Lipschitz estimate")
    _axes(ax[0, 0], f"Lipschitz field ({result.embedder})")
    paths["lipschitz"] = save_figure(fig, out / f"lipschitz_{result.embedder}.png")

    fig, ax = _figure(n_alpha, n_beta)
    ax[0, 0].imshow(mosaic, extent=extent, origin="upper", aspect="auto")
    im = ax[0, 0].imshow(
        result.field, extent=extent, origin="lower", aspect="auto", cmap="magma", alpha=0.55
    )
    fig.colorbar(im, ax=ax[0, 0], label="Lipschitz estimate")
    _axes(ax[0, 0], f"Lipschitz field over the grid ({result.embedder})")
    paths["overlay"] = save_figure(fig, out / f"overlay_{result.embedder}.png")

    if result.phase_fields is not None:
        space = f"decoded, {result.embedder}" if result.phase_space == "image" else "latent space"
        paths["phases"] = plot_phases(
            result.phase_fields, alphas, betas, out / f"phases_{result.embedder}.png", space
        )
    return paths


def plot_phases(
    fields: np.ndarray,
    alphas: np.ndarray,
    betas: np.ndarray,
    path: Path,
    space: str = "latent space",
) -> Path:
    """One heatmap per denoising step of fields [steps, n_alpha, n_beta], each on its own colour scale."""
    steps = fields.shape[0]
    ncols = min(steps, 6)
    nrows = -(-steps // ncols)
    fig = Figure(figsize=(3.6 * ncols, 3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    extent = _extent(alphas, betas)
    for k, ax in enumerate(axes.flat):
        if k >= steps:
            ax.axis("off")
            continue
        im = ax.imshow(fields[k], extent=extent, origin="lower", aspect="auto", cmap="magma")
        fig.colorbar(im, ax=ax)
        ax.set_title(f"step {k}: x0 estimate")
        ax.set_xlabel("beta")
        ax.set_ylabel("alpha")
    fig.suptitle(f"Lipschitz field of the x0 estimate per denoising step ({space})")
    return save_figure(fig, path)
