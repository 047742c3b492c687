"""Read a shape scene back from its pixels: background, shape colour and shape class.

    images = make_scenes(4, size=64, seed=0).images   # [B, 3, H, W] in [0, 1]
    result = check_images(images)
    result.shape, result.colour          # [B] indices into SHAPES (or NO_SHAPE) / COLOURS

Geometry, not learning: the background is the median of the border pixels; the shape is the largest
connected region of pixels far from it (a stray pixel of VAE noise elsewhere neither joins it nor
stretches its bounding box); its colour is the nearest palette colour to the shape's median pixel; its class comes from how
much of its bounding box it fills (square 1, circle pi/4, upright triangle 1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from flux_ir.toy.scenes import palette_tensor

NO_SHAPE = -1
FILL_SQUARE = 0.89  # above: square (fill 1.0)
FILL_CIRCLE = 0.64  # above: circle (fill 0.785); below: triangle (fill 0.5)
MIN_AREA = 0.01  # fraction of the image a shape must cover to count
FOREGROUND_DISTANCE = 0.25  # RGB distance from the background that marks a shape pixel


@dataclass
class CheckResult:
    """Per image [B]: shape index (NO_SHAPE if none found), colour and background indices,
    fill ratio of the bounding box and area fraction."""

    shape: torch.Tensor
    colour: torch.Tensor
    background: torch.Tensor
    fill: torch.Tensor
    area: torch.Tensor


def _background_and_mask(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Background colour [B, 3] (median of the border pixels) and shape pixels [B, H, W]."""
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1
    )
    bg = border.median(dim=-1).values
    return bg, (images - bg[:, :, None, None]).norm(dim=1) > FOREGROUND_DISTANCE


@torch.no_grad()
def shape_token_mask(images: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """Which image tokens a scene's shape touches: images [B, 3, H, W] in [0, 1] -> bool
    [B, H/patch, W/patch] (FLUX's token grid for patch 16), for edits addressed to the shape."""
    _, mask = _background_and_mask(images.float())
    return torch.nn.functional.max_pool2d(mask.float()[:, None], patch)[:, 0] > 0


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """Each image's largest 8-connected region of `mask` [B, H, W] (bool), holes filled."""
    out = np.zeros(mask.shape, dtype=bool)
    eight = np.ones((3, 3), dtype=bool)
    for i, m in enumerate(mask.cpu().numpy()):
        labels, n = ndimage.label(ndimage.binary_fill_holes(m), structure=eight)
        if n:
            out[i] = labels == (np.bincount(labels.ravel())[1:].argmax() + 1)
    return torch.from_numpy(out).to(mask.device)


@torch.no_grad()
def check_images(images: torch.Tensor) -> CheckResult:
    """Classify images [B, 3, H, W] (float in [0, 1])."""
    images = images.float()
    b, _, h, w = images.shape
    bg, mask = _background_and_mask(images)  # [B, 3], [B, H, W]
    mask = largest_component(mask)
    area = mask.flatten(1).sum(1).float()
    rows, cols = mask.any(2), mask.any(1)  # [B, H], [B, W]
    height = _extent(rows).float()
    width = _extent(cols).float()
    fill = area / (height * width).clamp(min=1)
    pixels = images.permute(0, 2, 3, 1)  # [B, H, W, 3]
    colour = torch.empty(b, 3, device=images.device)
    for i in range(b):  # median of the masked pixels (the mean would mix in edge pixels)
        sel = pixels[i][mask[i]]
        colour[i] = sel.median(dim=0).values if len(sel) else bg[i]
    palette = palette_tensor(images.device)
    shape = torch.where(
        fill > FILL_SQUARE,
        1,
        torch.where(fill > FILL_CIRCLE, 0, 2),
    )
    shape = torch.where(area / (h * w) < MIN_AREA, NO_SHAPE, shape)
    return CheckResult(
        shape=shape,
        colour=torch.cdist(colour, palette).argmin(1),
        background=torch.cdist(bg, palette).argmin(1),
        fill=fill,
        area=area / (h * w),
    )


def _extent(occupied: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> [B] number of positions from the first to the last True (0 if none)."""
    idx = torch.arange(occupied.shape[1], device=occupied.device)
    first = torch.where(occupied, idx, occupied.shape[1]).min(1).values
    last = torch.where(occupied, idx, -1).max(1).values
    return (last - first + 1).clamp(min=0)
