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


EXIF_TEXT_BYTES = 16_000  # per text field: JPEG's EXIF segment holds at most 64 KB in all
UNICODE = b"UNICODE\x00"  # EXIF UserComment's character code for UCS-2 text


def sampling_exif(model: str, prompt: str) -> Image.Exif:
    """EXIF naming the software, the model and the prompt (as the original capture tool wrote it):
    the prompt as UTF-8 in ImageDescription and as Unicode in the Exif UserComment, each cut to
    about 16 KB (with a trailing "…") so that any prompt fits; the run's metadata keeps it whole."""
    exif = Image.Exif()
    exif[ExifTags.Base.Software] = "flux-ir"
    exif[ExifTags.Base.Make] = "Black Forest Labs"
    exif[ExifTags.Base.Model] = model
    exif[ExifTags.Base.ImageDescription] = _cut(prompt, "utf-8").encode("utf-8")
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = UNICODE + _cut(
        prompt, "utf-16-le"
    ).encode("utf-16-le")
    return exif


def exif_prompt(path: str | Path) -> str | None:
    """The prompt a flux-ir image carries in its EXIF (None if it has none)."""
    with Image.open(path) as im:
        exif = im.getexif()
    comment = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(comment, bytes) and comment.startswith(UNICODE):
        return comment[len(UNICODE) :].decode("utf-16-le")
    return exif.get(ExifTags.Base.ImageDescription)


def _cut(text: str, encoding: str) -> str:
    """`text`, shortened (ending in "…") until it encodes to at most EXIF_TEXT_BYTES bytes."""
    if len(text.encode(encoding)) <= EXIF_TEXT_BYTES:
        return text
    n = EXIF_TEXT_BYTES // (4 if encoding == "utf-8" else 2)
    while len((text[:n] + "…").encode(encoding)) > EXIF_TEXT_BYTES:
        n -= 1
    return text[:n] + "…"
