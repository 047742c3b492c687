"""Labelled image grids: rows × columns of thumbnails with text labels, as one PIL image.

    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    grid = labelled_grid([[red, blue], [None, red]], row_labels=["double 0", "single 3"],
                         col_labels=["step 0", "step 1"], title="a lens mosaic")
    grid.save("mosaic.jpg")                 # None leaves a blank cell

Thumbnails are resized to `cell` pixels; labels use PIL's default font (no font files needed).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


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
