"""flux-ir: look inside FLUX.1 diffusion transformers.

models → capture → store → lens: load a pipeline, record every block at every denoising step,
save the capture, decode each block as if it were the final prediction.
"""

__version__ = "0.1.0"
