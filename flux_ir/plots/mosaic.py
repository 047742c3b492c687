"""Labelled image grids: rows × columns of thumbnails with text labels, as one PIL image; the lens
mosaic of a capture (blocks in depth order down, captured steps across).

    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    grid = labelled_grid([[red, blue], [None, red]], row_labels=["double 0", "single 3"],
                         col_labels=["step 0", "step 1"], title="a lens mosaic")
    grid.save("mosaic.jpg")                 # None leaves a blank cell

    mosaic = lens_mosaic(pipe, cap)         # a capture's lens decodes as one PIL image, no files

Thumbnails are resized to `cell` pixels; labels use PIL's default font (no font files needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from flux_ir.lens import BlockStep, LensOptions, decode_capture

if TYPE_CHECKING:
    from diffusers import FluxPipeline

    from flux_ir.capture import Capture


def labelled_grid(
    images: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    cell: int = 96,
    pad: int = 2,
) -> Image.Image:
    """Compose `images[r][c]` (None leaves a blank cell) into a grid with labels on the left and top."""
    font = ImageFont.load_default()
    n_rows, n_cols = len(images), max((len(r) for r in images), default=0)
    label_w = 8 + 7 * max((len(s) for s in row_labels), default=0)
    title_h = 18 if title else 0
    head_h = 16
    width = label_w + n_cols * (cell + pad) + pad
    height = title_h + head_h + n_rows * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((label_w + c * (cell + pad) + 4, title_h + 2), label, fill="black", font=font)
    for r, row in enumerate(images):
        y = title_h + head_h + r * (cell + pad)
        draw.text((4, y + cell // 2 - 5), row_labels[r], fill="black", font=font)
        for c, img in enumerate(row):
            if img is not None:
                thumb = img.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)
                canvas.paste(thumb, (label_w + c * (cell + pad), y))
    return canvas


def lens_grid(
    cap: Capture, images: dict[BlockStep, Image.Image], target: str = "x0", cell: int = 96
) -> Image.Image:
    """The lens mosaic of `images` (one per captured (block, step); missing ones stay blank): blocks
    top to bottom in depth order, denoising steps left to right."""
    rows = [(kind, i) for kind, idx in cap.block_indices.items() for i in idx]
    steps = cap.captured_steps
    md = cap.metadata
    return labelled_grid(
        [[images.get(BlockStep(kind, i, s)) for s in steps] for kind, i in rows],
        row_labels=[f"{kind} {i}" for kind, i in rows],
        col_labels=[f"step {s}" for s in steps],
        title=f"{md['model']} | {md['prompt'][:60]} | lens target {target}",
        cell=cell,
    )


def lens_mosaic(
    pipe: FluxPipeline,
    cap: Capture,
    lens: LensOptions | None = None,
    *,
    progress: bool = True,
    cell: int = 96,
) -> Image.Image:
    """Decode every captured (block, step) of `cap` with the lens (`LensOptions`: target, batch) and
    return the mosaic as one PIL image (the first image of the batch), writing nothing."""
    lens = lens or LensOptions()
    thumbs = {
        item: images[0].resize((cell, cell), Image.Resampling.BILINEAR)
        for item, images in decode_capture(
            pipe, cap, None, lens.target, lens.batch_size, progress=progress
        )
    }
    return lens_grid(cap, thumbs, lens.target, cell)
