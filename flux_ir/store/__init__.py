"""Store: the `Capture` container and its files."""

from flux_ir.capture.result import Capture
from flux_ir.store.atomic import atomic_path
from flux_ir.store.files import load_capture, save_capture, save_metadata_json
from flux_ir.store.shards import ShardWriter, open_shards

__all__ = [
    "Capture",
    "ShardWriter",
    "atomic_path",
    "load_capture",
    "open_shards",
    "save_capture",
    "save_metadata_json",
]
