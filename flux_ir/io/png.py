"""PNG files from uint8 pixel arrays, encoded without holding Python's GIL for the compression.

    pixels = np.zeros((16, 16, 3), dtype=np.uint8)   # [H, W, 3] (or [H, W, 4], [H, W]) uint8
    data = encode_png(pixels)                        # PNG bytes
    write_png("black.png", pixels)                   # atomically: a PNG that exists is complete

Pillow compresses PNG data inside one C call that keeps the GIL, so a thread encoding images stalls a
main thread that is busy launching GPU kernels. Here the rows are filtered with numpy (whole-image
array operations) and compressed with Python's zlib, which releases the GIL; only a few Python
statements per image hold it. The file is a standard 8-bit PNG (greyscale, RGB or RGBA): every row
takes the filter (None, Sub, Up, Average or Paeth) with the smallest sum of absolute values, the
heuristic of libpng and Pillow, so sizes are close to Pillow's. Decoding gives the pixels back
exactly.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from flux_ir.io.atomic import atomic_path

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def filter_rows(pixels: np.ndarray) -> np.ndarray:
    """[H, W, C] uint8 -> [H, 1 + W*C] uint8: each row prefixed by its filter type, then filtered."""
    h, w, c = pixels.shape
    x = pixels.reshape(h, w * c).astype(np.int16)
    left = np.zeros_like(x)
    left[:, c:] = x[:, :-c]
    up = np.zeros_like(x)
    up[1:] = x[:-1]
    up_left = np.zeros_like(x)
    up_left[:, c:] = up[:, :-c]
    p = left + up - up_left
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    candidates = np.stack([x, x - left, x - up, x - (left + up) // 2, x - paeth])  # [5, H, W*C]
    filtered = candidates.astype(np.uint8)  # modulo 256
    # libpng's heuristic: the filter whose bytes, read as signed, have the smallest absolute sum
    cost = np.abs(filtered.view(np.int8).astype(np.int32)).sum(axis=2)  # [5, H]
    best = cost.argmin(axis=0)  # [H]
    rows = filtered[best, np.arange(h)]  # [H, W*C]
    return np.concatenate([best.astype(np.uint8)[:, None], rows], axis=1)


def encode_png(pixels: np.ndarray, level: int = 6) -> bytes:
    """PNG bytes of `pixels`: [H, W] or [H, W, C] uint8 with C in (1, 3, 4)."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in COLOUR_TYPES:
        raise ValueError(
            f"PNG pixels must be uint8 [H, W] or [H, W, 1|3|4], got {pixels.dtype} {pixels.shape}"
        )
    h, w, c = pixels.shape
    header = struct.pack(">IIBBBBB", w, h, 8, COLOUR_TYPES[c], 0, 0, 0)
    # Z_FILTERED suits filtered rows (as libpng and Pillow use); compressing releases the GIL
    deflate = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_FILTERED)
    data = deflate.compress(filter_rows(pixels).tobytes()) + deflate.flush()
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def write_png(path: str | Path, pixels: np.ndarray, level: int = 6) -> Path:
    """Encode and write `pixels` to `path` under a temporary name, then rename."""
    data = encode_png(pixels, level)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
