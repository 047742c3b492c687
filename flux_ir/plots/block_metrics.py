"""Heatmaps of a capture's per-block metrics: blocks down (depth order), denoising steps across.

    from flux_ir.analysis.block_metrics import block_metrics

    df = block_metrics(cap)
    fig = metric_heatmap(df, "cosine_to_last", stream="img")      # a matplotlib Figure
    paths = save_metric_heatmaps(df, "heatmaps")                  # one PNG per metric and stream

Figures are drawn without pyplot (importing this module never changes matplotlib's backend). A
metric that is NaN everywhere for a stream (no lens decodes, no CLIP scorer, text tokens) is skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from flux_ir.analysis.block_metrics import METRICS, metric_grid
from flux_ir.plots.sweep import save_figure

LABELS = {
    "norm": "mean token norm",
    "cosine_to_last": "cosine to the last block",
    "lens_distance": "lens decode's RMS distance to the final image",
    "clip_to_prompt": "lens decode's CLIP similarity to the prompt",
}


def metric_heatmap(df: pd.DataFrame, metric: str, stream: str = "img") -> Figure:
    """One metric of one stream as a heatmap (rows: blocks, columns: steps)."""
    table = metric_grid(df, metric, stream)
    n_rows, n_cols = table.shape
    fig = Figure(figsize=(min(3 + 0.45 * n_cols, 14), min(2 + 0.3 * n_rows, 16)))
    ax = fig.subplots()
    im = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=ax, label=LABELS.get(metric, metric))
    ax.set_yticks(range(n_rows), list(table.index))
    ax.set_xticks(range(n_cols), [str(c) for c in table.columns])
    ax.set_xlabel("denoising step")
    ax.set_ylabel("block (depth order)")
    ax.set_title(f"{LABELS.get(metric, metric)} ({stream} tokens)")
    fig.tight_layout()
    return fig


def save_metric_heatmaps(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write `{metric}_{stream}.png` for every metric with values; returns {"metric_stream": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stream in sorted(set(df["stream"])):
        part = df[df["stream"] == stream]
        for metric in METRICS:
            if metric not in part or not np.isfinite(part[metric].to_numpy(dtype=float)).any():
                continue
            key = f"{metric}_{stream}"
            paths[key] = save_figure(metric_heatmap(df, metric, stream), out / f"{key}.png")
    return paths
