"""Models: the registry of FLUX.1 variants, the in-code miniature, and loading."""

from flux_ir.models.loading import (
    OFFLOAD_MODES,
    default_device,
    default_dtype,
    load_pipeline,
    save_pipeline,
)
from flux_ir.models.registry import REGISTRY, ModelSpec, resolve_model
from flux_ir.models.tiny import build_tiny_pipeline

__all__ = [
    "OFFLOAD_MODES",
    "REGISTRY",
    "ModelSpec",
    "build_tiny_pipeline",
    "default_device",
    "default_dtype",
    "load_pipeline",
    "resolve_model",
    "save_pipeline",
]
