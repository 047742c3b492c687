"""One-dimensional paths: between two latents (linear with renormalisation, and spherical), and from
a latent along a direction.

    z0, z1 = vertex_latents((0, 123), height=64, width=64)   # [16, 8, 8] each
    zs = lerp_path(z0, z1, 9)    # [9, 16, 8, 8]: straight line, every point rescaled to norm sqrt(d)
    zs = slerp_path(z0, z1, 9)   # [9, 16, 8, 8]: great-circle arc, norms interpolated linearly
    grid = GridSpec(n_alpha=9, n_beta=1, path="slerp")           # a sweep's path
    z, before, after = path_latents(torch.stack([z0, z1]), grid, grid.points())
    zs = direction_at(z0, z1 - z0, torch.linspace(0, 0.5, 5))   # [5, 16, 8, 8]: steps of radius/8

Both include the end points. `direction_at(z, d, t)` is z + t sqrt(numel) d / |d|: step sizes t
in units of the annulus radius sqrt(numel) (the norm `normalise(..., "annulus")` scales to), so
t = 1 moves as far as a Gaussian noise latent is long; a sweep's `path="direction"` starts at z0
and moves along z2 - z1 (e.g. two inverted images, `flux_ir.inversion.invert_to_vertices`, or two
prompts' inverted renders, `flux_ir.inversion.prompt_direction`), then normalises. Latents are [C, h, w] (or any shape); computation is in float32.
`lerp_at` / `slerp_at` take the positions t [n] themselves (t outside [0, 1] extrapolates); every
point depends only on its own t, so a sweep's point does not depend on its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flux_ir.errors import InvalidArgumentError
from flux_ir.sweep.grid import GridPoint, GridSpec, add_noise, grid_latents, normalise


def _ts(n: int) -> torch.Tensor:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InvalidArgumentError(f"a path needs at least 2 points, got {n!r}")
    return torch.linspace(0.0, 1.0, n, dtype=torch.float64)


def lerp_path(
    z0: torch.Tensor, z1: torch.Tensor, n: int, normalisation: str = "annulus"
) -> torch.Tensor:
    """[n, *z0.shape]: (1 - t) z0 + t z1 for t in linspace(0, 1, n), then `normalise`d per point."""
    return normalise(lerp_at(z0, z1, _ts(n)), normalisation)


def lerp_at(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[n, *z0.shape] float32: (1 - t) z0 + t z1 for each t [n]."""
    t = t.to(torch.float32).view(-1, *[1] * z0.dim())
    return (1 - t) * z0.float() + t * z1.float()


def slerp_path(z0: torch.Tensor, z1: torch.Tensor, n: int) -> torch.Tensor:
    """[n, *z0.shape]: spherical interpolation of the directions, with the norm interpolated linearly.

    Falls back to the renormalised straight line when z0 and z1 are (anti)parallel.
    """
    return slerp_at(z0, z1, _ts(n))


def slerp_at(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[n, *z0.shape] float32: `slerp_path` at the positions t [n] (computed in float64)."""
    t = t.to(torch.float64)
    n = t.shape[0]
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


def direction_at(z: torch.Tensor, direction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[n, *z.shape] float32: z + t * sqrt(z.numel()) * direction / |direction| for each t [n]
    (steps in annulus radii; not normalised). A zero direction is refused."""
    d = direction.double().flatten()
    length = d.norm()
    if not torch.isfinite(length) or length == 0:
        raise InvalidArgumentError(
            "{param} is zero (or not finite): the two latents that define it are equal",
            "direction",
        )
    radius = math.sqrt(d.numel())
    t = t.to(torch.float64).view(-1, 1)
    z = z.double().flatten()[None] + t * (radius / length) * d[None]
    return z.float().view(t.shape[0], *direction.shape)


def direction_path(
    z: torch.Tensor, direction: torch.Tensor, steps, normalisation: str = "annulus"
) -> torch.Tensor:
    """[len(steps), *z.shape]: `direction_at` the given steps (annulus radii), then `normalise`d."""
    t = torch.as_tensor(steps, dtype=torch.float64).flatten()
    return normalise(direction_at(z, direction, t), normalisation)


def path_latents(
    vertices: torch.Tensor, spec: GridSpec, points: Sequence[GridPoint]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents [B, 16, h, w] float32 of path points (t = point.alpha between vertices [2, 16, h, w];
    for a direction path, t annulus radii from vertex 0 along vertex 2 - vertex 1, of [3, 16, h, w]),
    with their noise (if any), normalised by `spec.normalisation`, and their norms [B] before and
    after normalising."""
    t = torch.tensor([p.alpha for p in points], dtype=torch.float64)
    z0, z1 = vertices[0], vertices[1]
    if spec.path == "direction":
        z = direction_at(z0, vertices[2].float() - z1.float(), t)
    else:
        z = lerp_at(z0, z1, t) if spec.path == "lerp" else slerp_at(z0, z1, t)
    z = add_noise(z, spec, points)
    before = z.flatten(1).norm(dim=1)
    z = normalise(z, spec.normalisation, vertices)
    return z, before, z.flatten(1).norm(dim=1)


def sweep_latents(
    vertices: torch.Tensor, spec: GridSpec, points: Sequence[GridPoint]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sweep's latents: `path_latents` for a path spec, else `grid_latents`."""
    if spec.path is not None:
        return path_latents(vertices, spec, points)
    return grid_latents(vertices, spec, points)
