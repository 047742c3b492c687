"""Lens: decode each block's output as if it were the final prediction."""

from flux_ir.lens.blocks import BlockStep, block_latents, block_steps, decode_capture
from flux_ir.lens.decode import TARGETS, LensHead, LensOptions, decode_packed, lens_latents

__all__ = [
    "TARGETS",
    "BlockStep",
    "LensHead",
    "LensOptions",
    "block_latents",
    "block_steps",
    "decode_capture",
    "decode_packed",
    "lens_latents",
]
