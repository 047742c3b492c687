"""Errors flux-ir raises on purpose; each message says how to fix the problem.

Argument errors speak in library terms: `InvalidArgumentError(param="width")` writes the parameter's
name where its message says `{param}`, and the command line renders the same error with the flag
(`err.render("--width")`).

    >>> err = InvalidArgumentError("{param} must be positive, got -1", param="num_steps")
    >>> str(err)
    'num_steps must be positive, got -1'
    >>> err.render("--num_steps")
    '--num_steps must be positive, got -1'
"""

from __future__ import annotations


class FluxIRError(Exception):
    """Base class: an error a user can act on (printed without a traceback by the CLI)."""


class InvalidArgumentError(FluxIRError, ValueError):
    """A user-supplied argument is invalid; raised where the setting is constructed, before any
    model loads. `param` names the argument; `{param}` in the message stands for its name."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def render(self, name: str | None = None) -> str:
        """The message with `name` (default: the parameter's own name) where it says `{param}`."""
        name = name or self.param
        return self.message if name is None else self.message.replace("{param}", name)

    def __str__(self) -> str:
        return self.render()


class ModelUnavailableError(FluxIRError):
    """Model weights could not be loaded (offline, gated repository, missing directory)."""


class CaptureFileError(FluxIRError):
    """A capture file is missing, truncated, corrupted or not a flux-ir capture."""
