"""Store: capture files (`.pt`, the original tool's format, and streamed safetensors shards) and
their lazy, pickle-free loader, with checksums recorded at write time (`verify_capture`); activation
datasets (`open_dataset`, `TokenDataset`, `TokenStream`)."""

from flux_ir.capture.schema import Capture
from flux_ir.store.dataset import ActivationDataset, TokenDataset, TokenStream, open_dataset
from flux_ir.store.files import (
    Verified,
    load_capture,
    save_capture,
    save_metadata_json,
    verify_capture,
)
from flux_ir.store.shards import ShardWriter, open_shards

__all__ = [
    "ActivationDataset",
    "Capture",
    "ShardWriter",
    "TokenDataset",
    "TokenStream",
    "Verified",
    "load_capture",
    "open_dataset",
    "open_shards",
    "save_capture",
    "save_metadata_json",
    "verify_capture",
]
