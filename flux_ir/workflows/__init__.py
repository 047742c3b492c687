"""Workflows: runs that combine the stages and write a directory (a capture run on disk)."""

from flux_ir.workflows.capture_run import CaptureRunOptions, capture_to_dir, decode_to_dir

__all__ = ["CaptureRunOptions", "capture_to_dir", "decode_to_dir"]
