"""One-dimensional paths between two latents: linear with renormalisation, and spherical.

    zs = lerp_path(z0, z1, 9)    # [9, 16, h, w]: straight line, every point rescaled to norm sqrt(d)
    zs = slerp_path(z0, z1, 9)   # [9, 16, h, w]: great-circle arc, norms interpolated linearly

Both include the end points. Latents are [C, h, w] (or any shape); computation is in float32.
"""

from __future__ import annotations

import torch

from flux_ir.errors import InvalidArgumentError
from flux_ir.sweep.grid import normalise


def _ts(n: int) -> torch.Tensor:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InvalidArgumentError(f"a path needs at least 2 points, got {n!r}")
    return torch.linspace(0.0, 1.0, n, dtype=torch.float64)


def lerp_path(
    z0: torch.Tensor, z1: torch.Tensor, n: int, normalisation: str = "annulus"
) -> torch.Tensor:
    """[n, *z0.shape]: (1 - t) z0 + t z1 for t in linspace(0, 1, n), then `normalise`d per point."""
    t = _ts(n).to(torch.float32).view(-1, *[1] * z0.dim())
    z = (1 - t) * z0.float() + t * z1.float()
    return normalise(z, normalisation)


def slerp_path(z0: torch.Tensor, z1: torch.Tensor, n: int) -> torch.Tensor:
    """[n, *z0.shape]: spherical interpolation of the directions, with the norm interpolated linearly.

    Falls back to the renormalised straight line when z0 and z1 are (anti)parallel.
    """
    t = _ts(n)
    a, b = z0.double().flatten(), z1.double().flatten()
    na, nb = a.norm(), b.norm()
    cos = torch.clamp(torch.dot(a / na, b / nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    if torch.sin(omega).abs() < 1e-8:
        direction = torch.stack([(1 - s) * a / na + s * b / nb for s in t])
        direction = direction / direction.norm(dim=1, keepdim=True)
    else:
        w0 = torch.sin((1 - t) * omega) / torch.sin(omega)
        w1 = torch.sin(t * omega) / torch.sin(omega)
        direction = w0[:, None] * (a / na) + w1[:, None] * (b / nb)
    norms = (1 - t) * na + t * nb
    return (direction * norms[:, None]).float().view(n, *z0.shape)
