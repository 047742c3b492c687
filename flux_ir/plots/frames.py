"""Movie frames: an image scaled to a fixed size with a caption strip beneath, and movie files.

    frame = labelled_frame(Image.new("RGB", (64, 64), "red"), "single 3 | step 2/16", size=128)
    frame.shape                                  # (160, 128, 3) uint8: sides multiples of 16
    write_movie("red.gif", [frame, frame], fps=4)           # GIF, looping (Pillow)

`write_movie` writes GIF with Pillow (a fast octree palette per frame) and MP4 (H.264, yuv420p,
playable in browsers) through imageio's ffmpeg plugin with the ffmpeg binary of the `imageio-ffmpeg`
wheel; both under a temporary name, renamed when complete. Frame sides are multiples of 16, as H.264 encoders
want them, so the MP4 is not rescaled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flux_ir.io.atomic import atomic_path

MOVIE_FORMATS = ("gif", "mp4")
CAPTION_H = 24  # pixels of the caption strip (before rounding the frame to multiples of 16)


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def labelled_frame(image: Image.Image | np.ndarray, caption: str, size: int = 256) -> np.ndarray:
    """`image` scaled (bicubic) to `size` pixels wide (height by its aspect ratio) above a black
    strip with `caption` in white: uint8 [H, W, 3] with H and W rounded up to multiples of 16."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    im = im.convert("RGB")
    width = _round16(size)
    height = max(1, round(im.height * width / im.width))
    canvas = Image.new("RGB", (width, _round16(height + CAPTION_H)), "black")
    canvas.paste(im.resize((width, height), Image.Resampling.BICUBIC), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    draw.text((6, height + 4), caption, fill="white", font=font)
    return np.asarray(canvas)


def write_movie(path: str | Path, frames: Sequence[np.ndarray], fps: float = 4.0) -> Path:
    """Write frames (uint8 [H, W, 3], all one size) as a GIF (looping) or an MP4, by the suffix."""
    import imageio.v2 as imageio

    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in MOVIE_FORMATS:
        raise ValueError(f"movie format {kind!r}: use one of {', '.join(MOVIE_FORMATS)}")
    if not frames:
        raise ValueError("a movie needs at least one frame")
    stack = np.stack([np.asarray(f, dtype=np.uint8) for f in frames])  # [T, H, W, 3]
    with atomic_path(path) as tmp:
        if kind == "gif":  # Pillow's fast octree palette per frame (its default is much slower)
            images = [
                Image.fromarray(f).quantize(
                    256, Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
                )
                for f in stack
            ]
            images[0].save(
                tmp,
                format="GIF",
                save_all=True,
                append_images=images[1:],
                duration=round(1000.0 / fps),
                loop=0,
                optimize=False,
            )
        else:
            with imageio.get_writer(
                tmp,
                format="FFMPEG",
                mode="I",
                fps=fps,
                codec="libx264",
                pixelformat="yuv420p",
                macro_block_size=16,
                ffmpeg_log_level="error",
            ) as writer:
                for frame in stack:
                    writer.append_data(frame)
    return path
