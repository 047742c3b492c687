"""Errors flux-ir raises on purpose; each message says how to fix the problem."""


class FluxIRError(Exception):
    """Base class: an error a user can act on (printed without a traceback by the CLI)."""


class InvalidArgumentError(FluxIRError, ValueError):
    """A user-supplied argument is invalid; raised before any model loads."""


class ModelUnavailableError(FluxIRError):
    """Model weights could not be loaded (offline, gated repository, missing directory)."""


class CaptureFileError(FluxIRError):
    """A capture file is missing, truncated, corrupted or not a flux-ir capture."""
