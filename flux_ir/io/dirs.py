"""Output directories: created if needed and checked writable before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from flux_ir.errors import InvalidArgumentError


def check_output_dir(path: str | Path, param: str = "output_dir") -> Path:
    """Create `path` if needed and check that it is a writable directory; returns it."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidArgumentError(
            f"{{param}} {path} cannot be created: {err.strerror}", param
        ) from err
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise InvalidArgumentError(
            f"{{param}} {path} is not a writable directory; choose another.", param
        )
    return path
