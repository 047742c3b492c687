"""What the explorer's server may touch: paths inside the served directory, files of a few types.

    root = Path("output").resolve()
    inside(root, "sweep/images/a000_b000.png")    # output/sweep/images/a000_b000.png
    # inside(root, "../secret") raises Forbidden: no ".." at all
    media_type(Path("a.png"))                      # "image/png"; None for .html, .js, .svg, ...

A relative path is refused when it is absolute, holds a ".." part, a backslash or a NUL, names a
hidden entry (".x": temporaries of writers and the like), or resolves (symbolic links followed)
outside the root. Files are served only as the data types listed in `MEDIA_TYPES` (images, movies,
CSV, JSON): nothing the browser would run (HTML, JavaScript, SVG) is ever sent from the served
directory; the page's own code ships in the package.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
}


class Forbidden(Exception):
    """A path or file the explorer does not serve (HTTP 403)."""


def inside(root: Path, rel: str) -> Path:
    """`root / rel`, resolved, or Forbidden; "" and "." are the root itself. `root` must be
    resolved already. The path need not exist."""
    if not isinstance(rel, str) or "\x00" in rel or "\\" in rel:
        raise Forbidden(f"refused path {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part == ".." for part in pure.parts):
        raise Forbidden(f"refused path {rel!r}: only paths inside the served directory")
    if any(part.startswith(".") for part in pure.parts if part != "."):
        raise Forbidden(f"refused path {rel!r}: hidden entries are not served")
    full = (root / pure).resolve()
    if full != root and not full.is_relative_to(root):
        raise Forbidden(f"refused path {rel!r}: it leads outside the served directory")
    return full


def relative(root: Path, path: Path) -> str:
    """`path` as the POSIX path relative to `root` that `inside` accepts ("" for the root)."""
    rel = path.resolve().relative_to(root).as_posix()
    return "" if rel == "." else rel


def media_type(path: Path) -> str | None:
    """The Content-Type a file is served as, or None when its type is not served."""
    return MEDIA_TYPES.get(path.suffix.lower())
