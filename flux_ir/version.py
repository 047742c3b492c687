"""The package version, and the versions of the libraries a result depends on (recorded in metadata)."""

from __future__ import annotations

__version__ = "0.1.0"


def library_versions(*extra: str) -> dict[str, str]:
    """`{"flux_ir": ..., "torch": ..., "diffusers": ..., "transformers": ...}` plus the `extra` modules'."""
    from importlib import import_module

    out = {"flux_ir": __version__}
    for name in ("torch", "diffusers", "transformers", *extra):
        out[name] = str(import_module(name).__version__)
    return out
