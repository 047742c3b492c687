"""Store: capture files (`.pt`, the original tool's format, and streamed safetensors shards) and
their lazy, pickle-free loader."""

from flux_ir.capture.schema import Capture
from flux_ir.store.files import load_capture, save_capture, save_metadata_json
from flux_ir.store.shards import ShardWriter, open_shards

__all__ = [
    "Capture",
    "ShardWriter",
    "load_capture",
    "open_shards",
    "save_capture",
    "save_metadata_json",
]
