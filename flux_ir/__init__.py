"""flux-ir: look inside FLUX.1 diffusion transformers.

    import flux_ir
    pipe, spec = flux_ir.load_pipeline("flux-toy")
    opts = flux_ir.CaptureOptions.from_spec(spec, seed=1, prompt="a red circle on a blue background")
    images, cap = flux_ir.run_capture(pipe, opts, model_name=spec.name)
    cap["single", 7, 3]                         # a block's output at a step: [B, L + N, D]
    flux_ir.save_capture(cap, "capture.pt")
    cap = flux_ir.load_capture("capture.pt")    # memory-mapped, no pickled code runs

models → sampling → capture → store → lens → sweep → analysis → plots: load a pipeline, sample from
it, record every block at every denoising step, save the capture, decode each block as if it were the
final prediction, sweep latent grids.
"""

import logging
from importlib import import_module

from flux_ir.version import __version__


class _Quiet(logging.Filter):
    """Drops library notes that say nothing to flux-ir's users: transformers' note, on every import
    of diffusers, that two image processors fall back to PIL without torchvision (flux-ir needs
    neither), and the token-level notes on a prompt longer than the T5 length
    (`flux_ir.sampling.generate` says in words what the model reads instead)."""

    PHRASES = (
        "requires torchvision (not installed)",
        "max_sequence_length` is set to",
        "Token indices sequence length is longer than the specified maximum",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(phrase in message for phrase in self.PHRASES)


for _name in (
    "transformers.utils.import_utils",
    "transformers.tokenization_utils_base",
    "diffusers.pipelines.flux.pipeline_flux",
):
    logging.getLogger(_name).addFilter(_Quiet())

_EXPORTS = {
    "load_pipeline": "flux_ir.models",
    "build_tiny_pipeline": "flux_ir.models",
    "build_random_pipeline": "flux_ir.models",
    "SamplingOptions": "flux_ir.sampling",
    "generate": "flux_ir.sampling",
    "CaptureOptions": "flux_ir.capture",
    "Selection": "flux_ir.capture",
    "BlockTrace": "flux_ir.capture",
    "Capture": "flux_ir.capture",
    "run_capture": "flux_ir.capture",
    "load_capture": "flux_ir.store",
    "save_capture": "flux_ir.store",
    "LensHead": "flux_ir.lens",
    "decode_capture": "flux_ir.lens",
    "SweepConfig": "flux_ir.sweep",
    "run_sweep": "flux_ir.sweep",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import on first use, so `import flux_ir` stays cheap."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flux_ir' has no attribute {name!r}")
