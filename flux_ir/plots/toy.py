"""Pictures of the toy model's science bars: when attributes settle over denoising, and where the
block lens beats decoding the current latent.

    steps = list(range(4))
    table = pd.DataFrame({"reader": "checker", "attribute": "shape", "step": steps,
                          "same": [0.2, 0.5, 0.9, 1.0], "settled": [0.1, 0.4, 0.9, 1.0]})
    fig = plot_settling(table, "settling.png")           # a line per attribute, written as PNG

`plot_settling` takes the table of `flux_ir.toy.bars.measure_settling` (columns reader, attribute,
step, same, settled; optional sigma); `plot_lens_baseline` the per-(block, step) table of
`flux_ir.toy.bars.measure_lens` (columns block, depth, step, relative).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from flux_ir.io.atomic import atomic_path

COLOURS = {"background": "tab:blue", "colour": "tab:orange", "shape": "tab:green"}
STYLES = {"checker": "-", "latent": "--"}
LABELS = {"checker": "checker on decoded x0", "latent": "latent reader on x0 latents"}


def _save(fig: Figure, path: str | Path | None) -> None:
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)


def plot_settling(
    table: pd.DataFrame, path: str | Path | None = None, *, title: str = "", value: str = "settled"
) -> Figure:
    """Share of points (y) whose reading of the step's x0 shows the final image's attribute and keeps
    showing it (`value` "settled"; "same": at that step, whatever comes later), per denoising step
    (x); one colour per attribute, solid for the checker, dashed for the latent reader. Written as
    PNG to `path` when given; returns the Figure."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for (reader, attribute), part in table.groupby(["reader", "attribute"], sort=False):
        part = part.sort_values("step")
        ax.plot(
            part.step,
            part[value],
            STYLES.get(reader, ":"),
            color=COLOURS.get(attribute),
            marker="o" if reader == "checker" else None,
            markersize=3,
            label=f"{attribute} ({LABELS.get(reader, reader)}, {int(part.get('points', pd.Series([0])).iloc[0])} pts)"
            if "points" in part
            else f"{attribute} ({LABELS.get(reader, reader)})",
        )
    steps = sorted(table.step.unique())
    ax.set_xticks(steps)
    ax.set_xlabel("denoising step whose x0 estimate is read")
    ax.set_ylabel("share of points settled" if value == "settled" else "share of points")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if "sigma" in table:
        sig = table.drop_duplicates("step").set_index("step").sigma
        top = ax.secondary_xaxis("top")
        top.set_xticks(steps[::2], [f"{sig[s]:.2f}" for s in steps[::2]])
        top.set_xlabel("sigma (noise level) at that step")
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)
    return fig


def plot_lens_baseline(
    table: pd.DataFrame, path: str | Path | None = None, *, title: str = ""
) -> Figure:
    """Heatmap of the relative improvement of each block's x0 lens over decoding x_k (rows: blocks in
    depth order, columns: steps; blue: the lens is closer to the final image, red: decoding x_k is),
    with each cell's value printed. Written as PNG to `path` when given; returns the Figure."""
    pivot = table.pivot_table(index=["depth", "block"], columns="step", values="relative")
    values = pivot.to_numpy()
    fig = Figure(
        figsize=(2.5 + 0.7 * values.shape[1], 1.2 + 0.32 * values.shape[0]), layout="constrained"
    )
    ax = fig.subplots()
    # symmetric log-like scale: relative improvement is <= 1 but may fall far below -1
    shown = np.sign(values) * np.log1p(np.abs(values))
    lim = max(float(np.nanmax(np.abs(shown))), 1e-6)
    im = ax.imshow(shown, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(
            j, i, f"{v:+.0%}" if abs(v) < 10 else f"{v:+.0f}x", ha="center", va="center", fontsize=6
        )
    ax.set_xticks(range(values.shape[1]), [str(s) for s in pivot.columns])
    ax.set_yticks(range(values.shape[0]), [b for _, b in pivot.index])
    ax.set_xlabel("denoising step")
    ax.set_ylabel("block (depth order)")
    fig.colorbar(im, ax=ax, label="sign · log(1 + |relative improvement|)")
    ax.set_title(
        title + ("\n" if title else "") + "x0 lens vs decoding x_k: relative improvement",
        fontsize=8,
    )
    _save(fig, path)
    return fig
