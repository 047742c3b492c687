"""Capture: hooks on every FLUX block, and the `Capture` they produce."""

from flux_ir.capture.attention import (
    AttentionMaps,
    AttentionOptions,
    AttentionTrace,
    load_attention,
    save_attention,
    token_indices,
)
from flux_ir.capture.copy import AsyncCopier, HostCopier, SyncCopier, make_copier
from flux_ir.capture.options import CaptureOptions
from flux_ir.capture.run import prepare_capture, run_capture
from flux_ir.capture.schema import Capture
from flux_ir.capture.select import Selection
from flux_ir.capture.trace import BlockTrace

__all__ = [
    "AsyncCopier",
    "BlockTrace",
    "Capture",
    "CaptureOptions",
    "HostCopier",
    "Selection",
    "SyncCopier",
    "make_copier",
    "prepare_capture",
    "run_capture",
    "AttentionMaps",
    "AttentionOptions",
    "AttentionTrace",
    "load_attention",
    "save_attention",
    "token_indices",
]
