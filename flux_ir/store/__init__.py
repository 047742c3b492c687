"""Store: the `Capture` container and its files."""

from flux_ir.capture.result import Capture
from flux_ir.store.atomic import atomic_path
from flux_ir.store.files import load_capture, save_capture, save_metadata_json

__all__ = ["Capture", "atomic_path", "load_capture", "save_capture", "save_metadata_json"]
