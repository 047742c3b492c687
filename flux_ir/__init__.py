"""flux-ir: look inside FLUX.1 diffusion transformers.

    import flux_ir
    pipe, spec = flux_ir.load_pipeline("flux-tiny")
    opts = flux_ir.GenerationOptions("a photo of a cat", width=256, height=256, num_steps=4, seed=1)
    images, cap = flux_ir.run_capture(pipe, opts, model_name=spec.name)
    cap["single", 37, 3]                        # a block's output at a step
    cap = flux_ir.load_capture("capture_....pt")

models → capture → store → lens → plots: load a pipeline, record every block at every denoising
step, save the capture, decode each block as if it were the final prediction.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_pipeline": "flux_ir.models",
    "build_tiny_pipeline": "flux_ir.models",
    "build_random_pipeline": "flux_ir.models",
    "GenerationOptions": "flux_ir.capture",
    "BlockTrace": "flux_ir.capture",
    "Capture": "flux_ir.capture",
    "run_capture": "flux_ir.capture",
    "load_capture": "flux_ir.store",
    "save_capture": "flux_ir.store",
    "LensHead": "flux_ir.lens",
    "decode_capture": "flux_ir.lens",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import on first use, so `import flux_ir` stays cheap."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flux_ir' has no attribute {name!r}")
