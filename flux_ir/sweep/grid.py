"""The latent grid: three vertex latents, the parallelogram they span, and its normalisation.

    spec = GridSpec(alpha=(0.0, 1.0), beta=(0.0, 1.0), n_alpha=10, n_beta=10, normalisation="annulus")
    vertices = vertex_latents((0, 123, 200), height=512, width=512)      # [3, 16, 64, 64] float32
    z, before, after = grid_latents(vertices, spec, spec.points()[:8])   # [8, 16, 64, 64], [8], [8]

A point is `z = z0 + a (z1 - z0) + b (z2 - z0)` for `a` on `n_alpha` values spread evenly over
`alpha` and `b` on `n_beta` values over `beta` (both ends included). Zooming in is choosing
sub-intervals; scalars far outside [0, 1] (10x, 1000x) are allowed. Every point is then normalised:

- `annulus`: scaled to norm sqrt(d), the radius where d-dimensional Gaussian noise concentrates;
- `std`: `z / z.std()` (the Hessian-geometry paper's code);
- `vertex`: scaled to the mean norm of the three vertices;
- `none`: left as is.

With `path="lerp"` or `"slerp"` the spec is a 1-D path between two vertices `z0, z1` instead: row k
of `n_alpha` (one column) sits at t = alpha_k on the path (see `flux_ir.sweep.paths`); files, tables
and resuming are those of an `n_alpha` x 1 grid. With `path="direction"` the path starts at z0 and
moves along the direction z2 - z1, t = alpha_k in units of the annulus radius sqrt(d)
(`flux_ir.sweep.paths.direction_at`).

Stochastic grids (the paper's `--noise_level`): with `noise_level` > 0 every point gets `noise_level * randn`
added before it is normalised, drawn from a CPU generator seeded by the point alone
(`point_noise_seed(noise_seed, row, col, repeat)`); with `repeats` k each location is generated k
times, each with its own noise (files a000_b000_r00.png ... ; `GridPoint.repeat`).

Latents are computed in float32 on the CPU from the vertices alone, so a point's latent does not
depend on the batch or the process that generates it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import latent_shape

NORMALISATIONS = ("annulus", "std", "vertex", "none")
PATHS = ("lerp", "slerp", "direction")
MAX_REPEATS = 10_000  # files are named _r0000 at most


@dataclass(frozen=True)
class GridPoint:
    """One grid point: `row` indexes alpha, `col` indexes beta; `index = row * n_beta + col`, or with
    repeats (`repeat` of `repeats`) `index = (row * n_beta + col) * repeats + repeat`."""

    index: int
    row: int
    col: int
    alpha: float
    beta: float
    repeat: int | None = None  # None: a grid without repeats
    repeats: int = 1

    @property
    def file(self) -> str:
        if self.repeat is None:
            return f"a{self.row:03d}_b{self.col:03d}.png"
        width = max(2, len(str(self.repeats - 1)))
        return f"a{self.row:03d}_b{self.col:03d}_r{self.repeat:0{width}d}.png"


@dataclass(frozen=True)
class GridSpec:
    """An `n_alpha` x `n_beta` grid over the intervals `alpha` and `beta`, and its normalisation;
    with `path` ("lerp" or "slerp"), `n_alpha` points at t in `alpha` on a path from z0 to z1
    ("direction": from z0 along z2 - z1, t in annulus radii). `noise_level`: the standard deviation
    of the Gaussian noise each point gets before normalising (0: none); `repeats`: samples per
    location, each with other noise; `noise_seed`: seeds every point's noise generator."""

    alpha: tuple[float, float] = (0.0, 1.0)
    beta: tuple[float, float] = (0.0, 1.0)
    n_alpha: int = 10
    n_beta: int = 10
    normalisation: str = "annulus"
    path: str | None = None
    noise_level: float = 0.0
    repeats: int = 1
    noise_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_interval("alpha", self.alpha))
        object.__setattr__(self, "beta", check_interval("beta", self.beta))
        for name in ("n_alpha", "n_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(
                    f"{{param}} must be a positive integer (points along that axis), got {value!r}",
                    name,
                )
        check_normalisation(self.normalisation)
        if self.path is not None:
            if self.path not in PATHS:
                raise InvalidArgumentError(
                    f"{{param}} {self.path!r} is unknown; choose one of {', '.join(PATHS)}.", "path"
                )
            if self.n_beta != 1 or self.n_alpha < 2:
                raise InvalidArgumentError(
                    f"a {self.path} path is one axis of at least 2 points (n_alpha >= 2, n_beta = 1), "
                    f"got {self.n_alpha} x {self.n_beta}",
                    "n_alpha",
                )
        noise = self.noise_level
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0:
            raise InvalidArgumentError(
                f"{{param}} must be a number >= 0 (the noise's standard deviation), got {noise!r}",
                "noise_level",
            )
        if not math.isfinite(noise):
            raise InvalidArgumentError(f"{{param}} must be finite, got {noise!r}", "noise_level")
        object.__setattr__(self, "noise_level", float(noise))
        r = self.repeats
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_REPEATS:
            raise InvalidArgumentError(
                f"{{param}} must be an integer from 1 to {MAX_REPEATS} (samples per point), got {r!r}",
                "repeats",
            )
        if r > 1 and self.noise_level == 0:
            raise InvalidArgumentError(
                f"{{param}} {r} needs --noise_level > 0: without noise every repeat is the same image",
                "repeats",
            )
        seed = self.noise_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InvalidArgumentError(
                f"{{param}} must be an integer from 0 to 2**63 - 1, got {seed!r}", "noise_seed"
            )

    @property
    def n_vertices(self) -> int:
        """Vertex latents the spec needs: z0, z1 for a path, z0, z1, z2 for a grid (and for a
        direction path: its start z0 and the direction z2 - z1)."""
        return 2 if self.path in ("lerp", "slerp") else 3

    @property
    def n_points(self) -> int:
        """Images the sweep generates: n_alpha x n_beta locations x repeats."""
        return self.n_alpha * self.n_beta * self.repeats

    def alphas(self) -> np.ndarray:
        """[n_alpha] float64, both interval ends included (a single point sits at the start)."""
        return np.linspace(*self.alpha, self.n_alpha)

    def betas(self) -> np.ndarray:
        return np.linspace(*self.beta, self.n_beta)

    @property
    def spacing(self) -> tuple[float, float]:
        """(d_alpha, d_beta) between neighbouring points (nan along an axis of one point)."""
        da = (self.alpha[1] - self.alpha[0]) / (self.n_alpha - 1) if self.n_alpha > 1 else math.nan
        db = (self.beta[1] - self.beta[0]) / (self.n_beta - 1) if self.n_beta > 1 else math.nan
        return da, db

    def points(self) -> list[GridPoint]:
        """Every point, row by row (alpha), then column (beta), then repeat."""
        alphas, betas = self.alphas(), self.betas()
        k = self.repeats
        if k == 1:
            return [
                GridPoint(r * self.n_beta + c, r, c, float(alphas[r]), float(betas[c]))
                for r in range(self.n_alpha)
                for c in range(self.n_beta)
            ]
        return [
            GridPoint((r * self.n_beta + c) * k + j, r, c, float(alphas[r]), float(betas[c]), j, k)
            for r in range(self.n_alpha)
            for c in range(self.n_beta)
            for j in range(k)
        ]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alpha"], d["beta"] = list(self.alpha), list(self.beta)
        if self.path is None:
            d.pop("path")  # grids keep the signature they had before paths existed
        if self.noise_level == 0:  # and before stochastic grids
            for key in ("noise_level", "repeats", "noise_seed"):
                d.pop(key)
        return d


def check_interval(name: str, value: Sequence[float] | str) -> tuple[float, float]:
    """Parse `(lo, hi)` or "lo,hi"; lo < hi, both finite."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"{{param}} must be two numbers 'start,end' such as 0,1, got {value!r}", name
        ) from err
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        raise InvalidArgumentError(
            f"{{param}} interval {lo},{hi} is empty or not finite; give start < end, e.g. 0,1", name
        )
    return lo, hi


def check_normalisation(mode: str) -> str:
    if mode not in NORMALISATIONS:
        raise InvalidArgumentError(
            f"{{param}} {mode!r} is unknown; choose one of {', '.join(NORMALISATIONS)}.",
            "normalisation",
        )
    return mode


def vertex_latents(seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """Standard Gaussian latents [len(seeds), 16, H/8, W/8] float32, one CPU generator per seed."""
    shape = latent_shape(height, width)
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    )


def load_vertices(path: str | Path, height: int, width: int, count: int = 3) -> torch.Tensor:
    """Vertex latents [count, 16, H/8, W/8] float32 from a .npy file (no pickles) or a .safetensors
    file (one tensor named `vertices`, or `count` named `z0`, `z1`, ...)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidArgumentError(
            f"{{param}} {path} does not exist; give a .npy or .safetensors file", "vertices"
        )
    try:
        if path.suffix == ".npy":
            v = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
            v = (
                tensors["vertices"]
                if "vertices" in tensors
                else torch.stack([tensors[f"z{k}"] for k in range(count)])
            )
        else:
            raise InvalidArgumentError(
                f"{{param}} {path}: use a .npy or .safetensors file", "vertices"
            )
    except (KeyError, ValueError, OSError) as err:
        if isinstance(err, InvalidArgumentError):
            raise
        raise InvalidArgumentError(
            f"{{param}} {path} could not be read: {err}", "vertices"
        ) from err
    expected = (count, *latent_shape(height, width))
    if tuple(v.shape) != expected:
        raise InvalidArgumentError(
            f"{{param}} {path} holds shape {tuple(v.shape)}; a {width}x{height} sweep needs {expected}",
            "vertices",
        )
    return v.to(torch.float32)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def combine(vertices: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Vertices [3, C, h, w], alpha and beta [B] -> z0 + alpha (z1 - z0) + beta (z2 - z0), [B, C, h, w]."""
    z0, z1, z2 = vertices.to(torch.float32)
    a = alpha.to(torch.float32).view(-1, 1, 1, 1)
    b = beta.to(torch.float32).view(-1, 1, 1, 1)
    return z0 + a * (z1 - z0) + b * (z2 - z0)


def normalise(z: torch.Tensor, mode: str, vertices: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise each latent of z [B, ...] independently (see the module docstring)."""
    check_normalisation(mode)
    if mode == "none":
        return z
    flat = z.flatten(1)
    if mode == "std":
        return z / flat.std(dim=1).view(-1, *[1] * (z.dim() - 1))
    if mode == "annulus":
        radius = math.sqrt(flat.shape[1])
    else:
        if vertices is None:
            raise InvalidArgumentError("normalisation 'vertex' needs the vertex latents")
        radius = float(vertices.flatten(1).norm(dim=1).mean())
    return z * (radius / flat.norm(dim=1)).view(-1, *[1] * (z.dim() - 1))


def point_noise_seed(noise_seed: int, row: int, col: int, repeat: int | None) -> int:
    """The seed of one point's noise generator: the first 8 bytes (big-endian, top bit cleared) of
    sha256("noise_seed:row:col:repeat") (repeat 0 without repeats), so a point's noise depends on
    nothing but the point."""
    text = f"{noise_seed}:{row}:{col}:{0 if repeat is None else repeat}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def point_noise(spec: GridSpec, points: Sequence[GridPoint], shape) -> torch.Tensor:
    """`spec.noise_level * randn(shape)` per point: [B, *shape] float32, one seeded CPU generator each."""
    return spec.noise_level * torch.stack(
        [
            torch.randn(
                tuple(shape),
                generator=torch.Generator("cpu").manual_seed(
                    point_noise_seed(spec.noise_seed, p.row, p.col, p.repeat)
                ),
            )
            for p in points
        ]
    )


def add_noise(z: torch.Tensor, spec: GridSpec, points: Sequence[GridPoint]) -> torch.Tensor:
    """z [B, ...] plus each point's noise (unchanged when `spec.noise_level` is 0)."""
    if spec.noise_level == 0:
        return z
    return z + point_noise(spec, points, z.shape[1:])


def grid_latents(
    vertices: torch.Tensor, spec: GridSpec, points: Sequence[GridPoint]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents [B, 16, h, w] float32 for `points` (with their noise, if any), and their norms [B]
    before and after normalising."""
    alpha = torch.tensor([p.alpha for p in points], dtype=torch.float64)
    beta = torch.tensor([p.beta for p in points], dtype=torch.float64)
    z = add_noise(combine(vertices, alpha, beta), spec, points)
    before = z.flatten(1).norm(dim=1)
    z = normalise(z, spec.normalisation, vertices)
    return z, before, z.flatten(1).norm(dim=1)
