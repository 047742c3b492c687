"""What a sweep generates: a model, its sampling settings, the vertex latents and the grid.

    cfg = SweepConfig.from_spec(resolve_model("flux-toy"), grid=GridSpec(n_alpha=4, n_beta=4))
    cfg.sampling.width, cfg.sampling.true_cfg       # flux-toy's own defaults: 128, True
    cfg = SweepConfig.from_spec(resolve_model("flux-dev"), preset="hessian-paper")  # 512², paper's prompts
    SweepConfig.from_signature(cfg.signature()) == cfg      # what a resumed sweep must match

Everything that decides a sweep's images is here; `signature()` is what a resumed sweep must match.
Validation happens on construction, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flux_ir.capture.options import check_seed
from flux_ir.errors import InvalidArgumentError
from flux_ir.sampling import SamplingOptions
from flux_ir.sweep.grid import GridSpec, file_sha256, load_vertices, vertex_latents

if TYPE_CHECKING:
    from flux_ir.models.registry import ModelSpec

# The prompts of "Hessian Geometry of Latent Space in Generative Models" (Lobashev et al., 2025).
PRESETS: dict[str, dict] = {
    "hessian-paper": {
        "prompt": "High quality picture, 4k, detailed",
        "negative_prompt": "blurry, ugly, stock photo",
        "true_cfg_scale": 5.0,
    },
}
DEFAULT_PROMPT = PRESETS["hessian-paper"]["prompt"]
DEFAULT_SIZE = 512  # pixels, for models without a native size
DEFAULT_SEEDS = (0, 123, 200)


@dataclass(frozen=True)
class SweepConfig:
    """A sweep's settings: `model` (its name, recorded), `sampling`, the `grid` (or path), and the
    vertex latents from `seeds` (default 0,123,200; a path: 0,123; kept modulo 2**64, as torch uses
    them) or from a `vertices` file (its sha256 is filled in: a resume must use the same latents);
    `dtype`: the pipeline's dtype, when the caller wants it part of the sweep. The weights' identity
    (`flux_ir.models.weights_fingerprint`) is checked by `run_sweep` once the model is loaded."""

    model: str
    sampling: SamplingOptions
    grid: GridSpec = field(default_factory=GridSpec)
    seeds: tuple[int, ...] | None = None
    vertices: str | None = None
    vertices_sha256: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingOptions):
            raise InvalidArgumentError(
                f"{{param}} must be a SamplingOptions, got {type(self.sampling).__name__}",
                "sampling",
            )
        n = self.grid.n_vertices
        what = "three integers (one per vertex z0, z1, z2)" if n == 3 else "two integers (z0, z1)"
        seeds = DEFAULT_SEEDS[:n] if self.seeds is None else self.seeds
        seeds = seeds.split(",") if isinstance(seeds, str) else seeds
        try:
            seeds = tuple(int(s) for s in seeds)
        except (TypeError, ValueError) as err:
            example = ",".join(map(str, DEFAULT_SEEDS[:n]))
            raise InvalidArgumentError(
                f"{{param}} must be {what} such as {example}, got {self.seeds!r}", "seeds"
            ) from err
        if len(seeds) != n:
            kind = f"a {self.grid.path} path" if self.grid.path else "a grid"
            raise InvalidArgumentError(
                f"{{param}} must be {what} for {kind}, got {self.seeds!r}", "seeds"
            )
        # as torch's generator takes them: -1 and 2**64 - 1 make the same noise, recorded alike
        object.__setattr__(self, "seeds", tuple(check_seed(s, "seeds") for s in seeds))
        if self.vertices is not None:  # exists, readable, right shape
            s = self.sampling
            load_vertices(self.vertices, s.height, s.width, n)
            object.__setattr__(self, "vertices_sha256", file_sha256(self.vertices))

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        *,
        preset: str | None = None,
        grid: GridSpec | None = None,
        seeds: tuple[int, ...] | None = None,
        vertices: str | None = None,
        dtype: str | None = None,
        model: str | None = None,
        **sampling: Any,
    ) -> SweepConfig:
        """The model's sampling defaults (its native size, else 512²; the paper's prompt), then the
        `preset`'s prompts, then the `sampling` overrides (None keeps a default)."""
        base: dict[str, Any] = {"prompt": DEFAULT_PROMPT}
        if spec.size is None:
            base["width"] = base["height"] = DEFAULT_SIZE
        if preset is not None:
            if preset not in PRESETS:
                raise InvalidArgumentError(
                    f"{{param}} {preset!r} is unknown; choose one of {', '.join(PRESETS)}.",
                    "preset",
                )
            base.update(PRESETS[preset])
        base.update({k: v for k, v in sampling.items() if v is not None})
        return cls(
            model=model or spec.name,
            sampling=SamplingOptions.from_spec(spec, **base),
            grid=grid or GridSpec(),
            seeds=seeds,
            vertices=vertices,
            dtype=dtype,
        )

    def vertex_latents(self):
        """[3, 16, H/8, W/8] float32 ([2, ...] for a path): from `vertices` if given, else `seeds`."""
        s = self.sampling
        if self.vertices is not None:
            return load_vertices(self.vertices, s.height, s.width, self.grid.n_vertices)
        return vertex_latents(self.seeds, s.height, s.width)

    def signature(self) -> dict:
        """Plain dict of every setting; two sweeps with equal signatures produce the same images.
        (The vertices file may move: its content, the sha256, is what must match; the scheduler is
        recorded when it is not FLUX's Euler.)"""
        sampling = self.sampling.to_dict()
        if sampling["scheduler"] == "euler":  # the default: sweeps made before the field resume
            del sampling["scheduler"]
        return {
            "model": self.model,
            **sampling,
            "seeds": list(self.seeds),
            "grid": self.grid.to_dict(),
            "vertices_sha256": self.vertices_sha256,
            "dtype": self.dtype,
        }

    @classmethod
    def from_signature(cls, d: dict) -> SweepConfig:
        """The config a signature describes (a sweep from a vertices file keeps its hash, not its path)."""
        d = dict(d)
        grid = d.pop("grid")
        grid = GridSpec(**{**grid, "alpha": tuple(grid["alpha"]), "beta": tuple(grid["beta"])})
        names = SamplingOptions.__dataclass_fields__
        sampling = SamplingOptions(**{k: d.pop(k) for k in list(d) if k in names})
        return cls(sampling=sampling, grid=grid, seeds=tuple(d.pop("seeds")), **d)
