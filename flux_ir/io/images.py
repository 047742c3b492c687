"""Saving PIL images atomically, with the sampling settings in EXIF."""

from __future__ import annotations

from pathlib import Path

from PIL import ExifTags, Image

from flux_ir.io.atomic import atomic_path


def save_image(image: Image.Image, path: str | Path, exif: Image.Exif | None = None) -> Path:
    """Write `image` as JPEG (quality 95) or PNG, by the suffix of `path`, under a temporary name."""
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        kwargs = {"quality": 95} if fmt == "JPEG" else {}
        image.save(tmp, format=fmt, exif=exif if exif is not None else Image.Exif(), **kwargs)
    return path


def sampling_exif(model: str, prompt: str) -> Image.Exif:
    """EXIF naming the software, the model and the prompt (as the original capture tool wrote it)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Software] = "flux-ir"
    exif[ExifTags.Base.Make] = "Black Forest Labs"
    exif[ExifTags.Base.Model] = model
    exif[ExifTags.Base.ImageDescription] = prompt
    return exif
