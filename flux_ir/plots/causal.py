"""Pictures of a causal map (the block x step heatmap of patch effects, the patched images) and of
an ablation table (a bar per block).

    path = plot_causal_map(cmap, "causal_map.png")   # heatmap; readings that differ from the target's
    pixels = causal_grid(cmap)                       # [rows * h, steps * w, 3] uint8 thumbnails
    plot_block_importance(block_importance(pipe, opts), "ablation.png")   # a bar per block

Rows are blocks in depth order (double blocks first), columns denoising steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from flux_ir.io.atomic import atomic_path

CausalMap = Any  # flux_ir.workflows.patching.CausalMap (a later stage: not imported here)


def plot_causal_map(cmap: CausalMap, path: str | Path) -> Path:
    """The effect heatmap, with a dot on sites whose reading (e.g. the checker's colour) is the
    source's rather than the target's; written as PNG."""
    n_rows, n_steps = cmap.effect.shape
    fig = Figure(figsize=(2.5 + 0.45 * n_steps, 1.5 + 0.35 * n_rows), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(cmap.effect, cmap="magma", vmin=0, vmax=max(1.0, float(np.nanmax(cmap.effect))))
    fig.colorbar(im, ax=ax, label="effect: |patched - target| / |source - target|")
    ax.set_xticks(range(n_steps), [str(s) for s in cmap.steps])
    ax.set_yticks(range(n_rows), [f"{k} {i}" for k, i in cmap.rows])
    ax.set_xlabel("denoising step patched")
    ax.set_ylabel("block patched")
    flips = []
    for name, values in cmap.readings.items():
        want, was = cmap.source_readings.get(name), cmap.target_readings.get(name)
        if want is None or want == was:
            continue
        ys, xs = np.nonzero(values == want)
        ax.scatter(xs, ys, s=14, marker="o", facecolors="none", edgecolors="cyan", linewidths=1)
        flips.append(name)
    s, t = cmap.settings.get("source", {}), cmap.settings.get("target", {})
    title = f"patching {t.get('prompt', 'target')!r}\nwith {s.get('prompt', 'source')!r}"
    if flips:
        title += f"\n(circles: {', '.join(flips)} read as the source's)"
    ax.set_title(title, fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def causal_grid(cmap: CausalMap) -> np.ndarray:
    """The patched images' thumbnails as one uint8 [rows * h, steps * w, 3] array."""
    rows, steps, h, w, _ = cmap.thumbs.shape
    return cmap.thumbs.transpose(0, 2, 1, 3, 4).reshape(rows * h, steps * w, 3)


def plot_block_importance(table, path: str | Path, title: str = "") -> Path:
    """A bar per block (depth order) of an ablation table's `effect` (`block_importance`)."""
    labels = [f"{k[0]}{b}" for k, b in zip(table["kind"], table["block"])]
    fig = Figure(figsize=(2 + 0.35 * len(labels), 3), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(labels)), list(table["effect"]), color="tab:purple")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_xlabel("block zeroed (d: double, s: single)")
    ax.set_ylabel("mean |ablated - plain|")
    ax.set_title(title or "what each block's image tokens contribute", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)
