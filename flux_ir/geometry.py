"""FLUX.1's geometry: how pixels, latents and transformer tokens relate.

    >>> latent_shape(512, 768)          # (channels, H/8, W/8)
    (16, 64, 96)
    >>> token_grid(512, 768)            # image tokens per column and row: (H/16, W/16)
    (32, 48)
    >>> z = torch.zeros(2, 16, 8, 12)
    >>> pack_latents(z).shape           # [B, (h/2)(w/2), 64]
    torch.Size([2, 24, 64])
    >>> unpack_latents(pack_latents(z), 64, 96).shape
    torch.Size([2, 16, 8, 12])

The VAE downsamples 8x into 16 channels and the transformer packs 2x2 latent patches into one token of
64 values, so an image side is a multiple of 16 pixels and holds side/16 tokens.
"""

from __future__ import annotations

import torch

from flux_ir.errors import InvalidArgumentError

VAE_FACTOR = 8  # pixels per latent cell along a side
LATENT_CHANNELS = 16
PATCH = 2  # latent cells per token along a side
SIZE_MULTIPLE = VAE_FACTOR * PATCH  # 16 pixels per token along a side
TOKEN_DIM = LATENT_CHANNELS * PATCH * PATCH  # 64 values per packed token
MAX_SIDE = 8192  # larger sides exhaust memory long before they finish


def check_size(value, param: str) -> int:
    """A side of `value` pixels: a positive multiple of 16, at most MAX_SIDE; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        detail = f"at most {MAX_SIDE}" if ok else "a positive integer"
        raise InvalidArgumentError(
            f"{{param}} must be {detail} (pixels, a multiple of {SIZE_MULTIPLE}), got {value!r}",
            param,
        )
    if value % SIZE_MULTIPLE:
        lo = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
        raise InvalidArgumentError(
            f"{{param}} must be a positive multiple of {SIZE_MULTIPLE} (8x VAE downsampling and 2x2 "
            f"patch packing), got {value!r}; try {lo} or {lo + SIZE_MULTIPLE}.",
            param,
        )
    return value


def latent_shape(height: int, width: int) -> tuple[int, int, int]:
    """The unpacked latent shape (16, H/8, W/8) of an image of `height` x `width` pixels."""
    return LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR


def token_grid(height: int, width: int) -> tuple[int, int]:
    """Image tokens along each side, (H/16, W/16); their product is the image sequence length N."""
    return height // SIZE_MULTIPLE, width // SIZE_MULTIPLE


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """Unpacked latents [B, 16, h, w] -> packed tokens [B, (h/2)(w/2), 64], as diffusers packs them."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed tokens [B, N, 64] of a `height` x `width` image -> unpacked latents [B, 16, H/8, W/8]."""
    b, _, d = packed.shape
    h, w = height // VAE_FACTOR, width // VAE_FACTOR
    z = packed.view(b, h // PATCH, w // PATCH, d // (PATCH * PATCH), PATCH, PATCH)
    return z.permute(0, 3, 1, 4, 2, 5).reshape(b, d // (PATCH * PATCH), h, w)
