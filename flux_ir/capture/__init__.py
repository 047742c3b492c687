"""Capture: hooks on every FLUX block, and the `Capture` they produce."""

from flux_ir.capture.copy import AsyncCopier, HostCopier, SyncCopier
from flux_ir.capture.options import GenerationOptions
from flux_ir.capture.result import Capture
from flux_ir.capture.run import run_capture
from flux_ir.capture.select import Selection
from flux_ir.capture.trace import BlockTrace

__all__ = [
    "AsyncCopier",
    "BlockTrace",
    "Capture",
    "GenerationOptions",
    "HostCopier",
    "Selection",
    "SyncCopier",
    "run_capture",
]
