"""Attention maps drawn over the generated image: one heatmap per block, token and step.

    words = token_indices(pipe, "a cat", ["cat"])
    opts = SamplingOptions.from_spec(resolve_model("flux-tiny"), prompt="a cat", width=64, height=64)
    with AttentionTrace(pipe.transformer, tokens=words, steps="0,-1", num_steps=opts.num_steps) as trace:
        image = generate(pipe, opts, seed=0).images[0]
    grid = attention_overlay(image, trace.maps)        # rows: blocks; columns: token x step
    grid = attention_overlay(image, trace.maps, tokens="cat", blocks=[("single", -1)], steps=[-1])

Each cell blends a colour map of one [H/16, W/16] map, upsampled bilinearly to the image, over the
image. By default every cell is scaled to its own maximum (`normalise="cell"`: where a map looks,
not how much); `normalise="grid"` shares one scale across the picture. Colour maps come from
matplotlib's registry (no pyplot, no backend switch); the grid is a PIL image (`labelled_grid`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageFont, ImageOps

from flux_ir.capture.attention import AttentionMaps
from flux_ir.errors import InvalidArgumentError
from flux_ir.plots.mosaic import labelled_grid

NORMALISE = ("cell", "grid")


def heatmap_overlay(
    image: Image.Image,
    values: np.ndarray,
    vmax: float,
    *,
    size: int | None = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
    grey: bool = True,
) -> Image.Image:
    """`image` (resized to `size`², default its own size; in grey, so that colour means attention)
    with `values` [h, w] / `vmax`, upsampled bilinearly and coloured by `cmap`, blended in with
    weight `alpha`."""
    base = (ImageOps.grayscale(image) if grey else image).convert("RGB")
    if size is not None:
        base = base.resize((size, size), Image.Resampling.BILINEAR)
    field = Image.fromarray(np.asarray(values, dtype=np.float32) / max(float(vmax), 1e-12), "F")
    field = np.clip(np.asarray(field.resize(base.size, Image.Resampling.BILINEAR)), 0.0, 1.0)
    heat = colormaps[cmap](field)[..., :3] * 255.0
    out = (1.0 - alpha) * np.asarray(base, dtype=np.float32) + alpha * heat
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def attention_overlay(
    image: Image.Image,
    maps: AttentionMaps,
    tokens: str | int | Sequence[str | int] | None = None,
    *,
    blocks: Sequence[tuple[str, int]] | None = None,
    steps: Sequence[int] | None = None,
    direction: str | None = None,
    batch: int = 0,
    cell: int = 96,
    alpha: float = 0.6,
    cmap: str = "inferno",
    normalise: str = "cell",
    title: str | None = None,
) -> Image.Image:
    """A labelled grid: rows are blocks in depth order, columns each token's maps at each step.

    tokens: names or T5 positions (None: every recorded token). blocks: (kind, index) pairs, negative
    indices from the end (None: every recorded block). steps: denoising steps (None: every recorded
    one). direction: needed when both were recorded. batch: which image of the batch.
    """
    if normalise not in NORMALISE:
        raise InvalidArgumentError(
            f"{{param}} {normalise!r}: choose one of {', '.join(NORMALISE)}", "normalise"
        )
    if tokens is None:
        tokens = list(maps.tokens)
    elif isinstance(tokens, str | int):
        tokens = [tokens]
    token_pos = [maps.token(t) for t in tokens]
    if blocks is None:
        blocks = [(kind, i) for kind, idx in maps.blocks.items() for i in idx]
    steps = maps.steps if steps is None else list(steps)
    cells = [
        [maps[kind, i, s, direction][batch, t].numpy() for t in token_pos for s in steps]
        for kind, i in blocks
    ]
    top = max((float(c.max()) for row in cells for c in row), default=1.0)
    images = [
        [
            heatmap_overlay(
                image,
                c,
                c.max() if normalise == "cell" else top,
                size=cell,
                alpha=alpha,
                cmap=cmap,
            )
            for c in row
        ]
        for row in cells
    ]
    names = [maps.tokens[t] for t in token_pos]
    n = maps.num_blocks
    row_labels = [f"{kind} {i + n[kind] if i < 0 else i}" for kind, i in blocks]
    col_labels = [
        _fit(name, f" s{s + maps.num_steps if s < 0 else s}", cell - 6)
        for name in names
        for s in steps
    ]
    direction = direction or "/".join(maps.directions)
    if title is None:
        title = (
            f"{direction} attention ({maps.pass_name} pass, heads {maps.heads}, {normalise} scale)"
        )
    return labelled_grid(images, row_labels, col_labels, title=title, cell=cell)


def _fit(name: str, suffix: str, width: int) -> str:
    """`name + suffix`, the name shortened (ending in ".") until it fits `width` pixels."""
    font = ImageFont.load_default()
    label = name + suffix
    while len(name) > 1 and font.getlength(label) > width:
        name = name[:-1]
        label = name + "." + suffix
    return label
