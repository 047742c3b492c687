"""Procedural shape scenes, rendered in torch (batched, on any device) with captions.

    scenes = make_scenes(64, size=128, seed=0)          # SceneBatch
    scenes.images                                       # [64, 3, 128, 128] float in [0, 1]
    scenes.captions[0]                                  # "a red circle on a blue background"

One flat-coloured shape (circle, square or upright triangle) of random size and position on a flat
background of another colour; colours jitter slightly around a fixed palette. Edges are anti-aliased
from signed distance fields. The same seed gives the same scenes on the same device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.70, 0.24),
    "blue": (0.16, 0.27, 0.86),
    "yellow": (0.92, 0.82, 0.16),
    "purple": (0.58, 0.24, 0.75),
    "white": (0.94, 0.94, 0.94),
}
COLOURS = tuple(PALETTE)
NEUTRAL_CAPTION = ""
COLOUR_JITTER = 0.03
SIZE_RANGE = (0.3, 0.6)  # half-extent of the shape, in units of half the image side


@dataclass
class SceneBatch:
    """Images [B, 3, H, W] in [0, 1]; indices [B] into SHAPES / COLOURS; one caption per image."""

    images: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    background: torch.Tensor

    @property
    def captions(self) -> list[str]:
        return [
            caption(SHAPES[s], COLOURS[c], COLOURS[b])
            for s, c, b in zip(self.shape.tolist(), self.colour.tolist(), self.background.tolist())
        ]


def caption(shape: str, colour: str, background: str | None = None) -> str:
    """ "a red circle on a blue background" (or "a red circle" without a background)."""
    text = f"a {colour} {shape}"
    return f"{text} on a {background} background" if background else text


def palette_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """[len(COLOURS), 3] RGB in [0, 1]."""
    return torch.tensor([PALETTE[c] for c in COLOURS], device=device)


def make_scenes(
    n: int,
    size: int = 128,
    seed: int | None = 0,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> SceneBatch:
    """`n` random scenes of `size`² pixels; pass `seed` or a `generator` on `device`."""
    if generator is None:
        generator = torch.Generator(device).manual_seed(0 if seed is None else seed)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    shape = torch.randint(len(SHAPES), (n,), generator=generator, device=device)
    colour = torch.randint(len(COLOURS), (n,), generator=generator, device=device)
    # background: any other colour
    offset = torch.randint(1, len(COLOURS), (n,), generator=generator, device=device)
    background = (colour + offset) % len(COLOURS)
    lo, hi = SIZE_RANGE
    radius = lo + (hi - lo) * uniform(n)
    centre = (uniform(n, 2) * 2 - 1) * (0.95 - radius[:, None])
    palette = palette_tensor(device)
    jitter = (uniform(2, n, 3) * 2 - 1) * COLOUR_JITTER
    fg = (palette[colour] + jitter[0]).clamp(0, 1)
    bg = (palette[background] + jitter[1]).clamp(0, 1)
    images = render(shape, centre, radius, fg, bg, size)
    return SceneBatch(images, shape, colour, background)


def render(
    shape: torch.Tensor,
    centre: torch.Tensor,
    radius: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Shapes [B] (SHAPES indices), centres [B, 2] (x, y in [-1, 1], y down), half-extents [B],
    colours [B, 3] -> images [B, 3, size, size] with anti-aliased edges."""
    device = centre.device
    axis = (torch.arange(size, device=device) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    px = x[None] - centre[:, 0, None, None]
    py = -(y[None] - centre[:, 1, None, None])  # y up for the triangle
    r = radius[:, None, None]
    sdf = torch.stack(
        [_circle(px, py, r), _square(px, py, 0.85 * r), _triangle(px, py, 1.1 * r)], dim=1
    )
    d = sdf.gather(1, shape[:, None, None, None].expand(-1, 1, size, size))  # [B, 1, H, W]
    coverage = (0.5 - d * size / 2).clamp(0, 1)  # distance in pixels -> area covered
    return bg[:, :, None, None] * (1 - coverage) + fg[:, :, None, None] * coverage


def _circle(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(px**2 + py**2) - r


def _square(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    qx, qy = px.abs() - r, py.abs() - r
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _triangle(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance to an upright equilateral triangle of half-side `r` centred at the origin."""
    k = math.sqrt(3.0)
    py = py + r / 2 / k  # centre the bounding box vertically (extent +-r*sqrt(3)/2)
    qx = px.abs() - r
    qy = py + r / k
    fold = qx + k * qy > 0
    qx, qy = (
        torch.where(fold, (qx - k * qy) / 2, qx),
        torch.where(fold, (-k * qx - qy) / 2, qy),
    )
    qx = qx - torch.maximum(torch.minimum(qx, torch.zeros_like(qx)), -2 * r)
    return -torch.sqrt(qx**2 + qy**2) * torch.sign(qy)
