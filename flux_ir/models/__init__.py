"""Models: the registry of FLUX.1 variants, the in-code miniature, and loading."""

from flux_ir.models.fingerprint import weights_fingerprint
from flux_ir.models.loading import (
    OFFLOAD_MODES,
    WEIGHTS,
    LoadOptions,
    default_device,
    default_dtype,
    load_pipeline,
    save_pipeline,
    transformer_config,
)
from flux_ir.models.random_init import build_random_pipeline
from flux_ir.models.registry import REGISTRY, ModelSpec, resolve_model
from flux_ir.models.tiny import build_tiny_pipeline

__all__ = [
    "OFFLOAD_MODES",
    "LoadOptions",
    "REGISTRY",
    "WEIGHTS",
    "ModelSpec",
    "build_random_pipeline",
    "build_tiny_pipeline",
    "default_device",
    "default_dtype",
    "load_pipeline",
    "transformer_config",
    "resolve_model",
    "save_pipeline",
    "weights_fingerprint",
]
