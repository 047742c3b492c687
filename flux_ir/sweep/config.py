"""What a sweep generates: model, prompts, sampling settings, vertex seeds and the grid.

    cfg = SweepConfig(model="flux-tiny", width=64, height=64, num_steps=2, grid=GridSpec(n_alpha=4, n_beta=4))
    cfg = SweepConfig.from_preset("hessian-paper", model="flux-schnell", ...)   # the paper's prompts

Everything that decides a sweep's images is here; `signature()` is what a resumed sweep must match.
Validation happens on construction, before any model loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flux_ir.capture.options import validate_size
from flux_ir.errors import InvalidArgumentError
from flux_ir.sweep.grid import GridSpec, file_sha256, load_vertices, vertex_latents

# The prompts of "Hessian Geometry of Latent Space in Generative Models" (Lobashev et al., 2025).
PRESETS: dict[str, dict] = {
    "hessian-paper": {
        "prompt": "High quality picture, 4k, detailed",
        "negative_prompt": "blurry, ugly, stock photo",
        "true_cfg_scale": 5.0,
    },
}
DEFAULT_SEEDS = (0, 123, 200)


@dataclass(frozen=True)
class SweepConfig:
    """A sweep's settings. `guidance` is ignored by models without a guidance embedding (schnell)."""

    model: str = "flux-schnell"
    prompt: str = "High quality picture, 4k, detailed"
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    width: int = 512
    height: int = 512
    num_steps: int = 4
    guidance: float | None = None
    max_sequence_length: int = 256
    seeds: tuple[int, ...] | None = None  # default 0,123,200 (a path: 0,123)
    grid: GridSpec = field(default_factory=GridSpec)
    vertices: str | None = None  # a file of vertex latents, used instead of `seeds`
    vertices_sha256: str | None = (
        None  # filled in from the file: a resume must use the same latents
    )
    dtype: str | None = None  # the pipeline's dtype, when the caller wants it part of the sweep

    def __post_init__(self) -> None:
        validate_size(self.width, self.height)
        if (
            isinstance(self.num_steps, bool)
            or not isinstance(self.num_steps, int)
            or self.num_steps < 1
        ):
            raise InvalidArgumentError(
                f"--num_steps must be a positive integer, got {self.num_steps!r}"
            )
        if not isinstance(self.prompt, str):
            raise InvalidArgumentError(f"--prompt must be text, got {self.prompt!r}")
        if float(self.true_cfg_scale) < 1.0:
            raise InvalidArgumentError(
                f"--true_cfg_scale must be >= 1 (1 disables it), got {self.true_cfg_scale}"
            )
        n = self.grid.n_vertices
        what = "three integers (one per vertex z0, z1, z2)" if n == 3 else "two integers (z0, z1)"
        seeds = DEFAULT_SEEDS[:n] if self.seeds is None else self.seeds
        seeds = tuple(seeds) if not isinstance(seeds, str) else tuple(seeds.split(","))
        try:
            seeds = tuple(int(s) for s in seeds)
        except (TypeError, ValueError) as err:
            example = ",".join(map(str, DEFAULT_SEEDS[:n]))
            raise InvalidArgumentError(
                f"--seeds must be {what} such as {example}, got {self.seeds!r}"
            ) from err
        if len(seeds) != n:
            kind = f"a {self.grid.path} path" if self.grid.path else "a grid"
            raise InvalidArgumentError(f"--seeds must be {what} for {kind}, got {self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
        if self.vertices is not None:  # exists, readable, right shape
            load_vertices(self.vertices, self.height, self.width, n)
            object.__setattr__(self, "vertices_sha256", file_sha256(self.vertices))
        object.__setattr__(self, "true_cfg_scale", float(self.true_cfg_scale))

    @classmethod
    def from_preset(cls, preset: str, **kw) -> SweepConfig:
        if preset not in PRESETS:
            raise InvalidArgumentError(
                f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}."
            )
        return cls(**{**PRESETS[preset], **kw})

    @property
    def true_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0 and self.negative_prompt is not None

    def vertex_latents(self):
        """[3, 16, H/8, W/8] float32 ([2, ...] for a path): from `vertices` if given, else `seeds`."""
        if self.vertices is not None:
            return load_vertices(self.vertices, self.height, self.width, self.grid.n_vertices)
        return vertex_latents(self.seeds, self.height, self.width)

    def signature(self) -> dict:
        """Plain dict of every setting; two sweeps with equal signatures produce the same images."""
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["grid"] = self.grid.to_dict()
        d.pop("vertices")  # the file may move; its content (sha256) is what must match
        return d

    @classmethod
    def from_signature(cls, d: dict) -> SweepConfig:
        d = dict(d)
        d["grid"] = GridSpec(
            **{**d["grid"], "alpha": tuple(d["grid"]["alpha"]), "beta": tuple(d["grid"]["beta"])}
        )
        d["seeds"] = tuple(d["seeds"])
        return cls(**d)  # a sweep from a vertices file keeps its hash but not the path
