"""What a sweep generates: a model, its sampling settings, the vertex latents and the grid.

    cfg = SweepConfig.from_spec(resolve_model("flux-toy"), grid=GridSpec(n_alpha=4, n_beta=4))
    cfg.sampling.width, cfg.sampling.true_cfg       # flux-toy's own defaults: 128, True
    cfg = SweepConfig.from_spec(resolve_model("flux-dev"), preset="hessian-paper")  # 512², paper's prompts
    SweepConfig.from_signature(cfg.signature()) == cfg      # what a resumed sweep must match

Everything that decides a sweep's images is here; `signature()` is what a resumed sweep must match.
Validation happens on construction, before any model loads.

Vertices come from seeds (Gaussian noise), from a file of latents (`vertices`), or from real images
(`vertex_images`: files of exactly the sampling size, inverted to the noise the sweep's own sampling
regenerates them from, `flux_ir.inversion`; their sha256 are part of the signature, so a resume with
a changed image is refused). A direction path (`GridSpec(path="direction")`) starts at vertex 0 and
moves along vertex 2 - vertex 1; with `direction_prompts` (from, to) those two are the inverted
renders of the two prompts from the start latent. Image and prompt vertices need the pipeline:
`run_sweep` inverts them once and keeps them in the sweep directory (`vertices.safetensors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flux_ir.capture.options import check_seed
from flux_ir.errors import InvalidArgumentError
from flux_ir.inversion import load_image
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
    (`flux_ir.models.weights_fingerprint`) is checked by `run_sweep` once the model is loaded.
    `vertex_images`: image files (one per vertex; one, the start, with `direction_prompts`) inverted
    to the vertex latents (their sha256 are filled in); `inversion_refine`: fixed-point passes per
    inversion step (`flux_ir.inversion.invert_latents`)."""

    model: str
    sampling: SamplingOptions
    grid: GridSpec = field(default_factory=GridSpec)
    seeds: tuple[int, ...] | None = None
    vertices: str | None = None
    vertices_sha256: str | None = None
    dtype: str | None = None
    vertex_images: tuple[str, ...] | None = None
    vertex_images_sha256: tuple[str, ...] | None = None
    direction_prompts: tuple[str, str] | None = None
    inversion_refine: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingOptions):
            raise InvalidArgumentError(
                f"{{param}} must be a SamplingOptions, got {type(self.sampling).__name__}",
                "sampling",
            )
        self._check_direction_prompts()
        n = self.n_given_vertices
        self._check_vertex_images(n)
        if self.images_given:
            if self.seeds not in (None, ()) or self.vertices is not None:
                raise InvalidArgumentError(
                    "{param} replace the seeds and the vertices file; give one of them",
                    "vertex_images",
                )
            object.__setattr__(self, "seeds", ())
            return
        what = {
            3: "three integers (one per vertex z0, z1, z2)",
            2: "two integers (z0, z1)",
            1: "one integer (the start z0)",
        }[n]
        seeds = DEFAULT_SEEDS[:n] if self.seeds is None else self.seeds
        seeds = seeds.split(",") if isinstance(seeds, str) else seeds
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = (seeds,)  # one seed, as a command line parses "--seeds 7"
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

    @property
    def images_given(self) -> bool:
        return self.vertex_images is not None or self.vertex_images_sha256 is not None

    @property
    def n_given_vertices(self) -> int:
        """Vertices the user gives (seeds, latents or images): the grid's, or 1 (the start) when
        `direction_prompts` make the direction."""
        return 1 if self.direction_prompts is not None else self.grid.n_vertices

    @property
    def needs_pipeline(self) -> bool:
        """Whether the vertex latents come from the model (image inversion or prompt renders)."""
        return self.images_given or self.direction_prompts is not None

    def _check_direction_prompts(self) -> None:
        p = self.direction_prompts
        if p is None:
            return
        if isinstance(p, str):
            raise InvalidArgumentError(
                f"{{param}} must be two prompts (from, to), got one text {p!r}", "direction_prompts"
            )
        p = tuple(p)
        if len(p) != 2 or not all(isinstance(x, str) for x in p) or p[0] == p[1]:
            raise InvalidArgumentError(
                f"{{param}} must be two different prompts (from, to), got {p!r}",
                "direction_prompts",
            )
        if self.grid.path != "direction":
            raise InvalidArgumentError(
                "{param} make the direction of a direction path; use path='direction' "
                "(--path direction)",
                "direction_prompts",
            )
        object.__setattr__(self, "direction_prompts", p)
        if self.vertices is not None:
            raise InvalidArgumentError(
                "{param} invert renders of the start latent; give the start by one seed or one "
                "vertex image, not a vertices file",
                "direction_prompts",
            )

    def _check_vertex_images(self, n: int) -> None:
        r = self.inversion_refine
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise InvalidArgumentError(
                f"{{param}} must be a non-negative integer (fixed-point passes per step), got {r!r}",
                "inversion_refine",
            )
        if not self.images_given:
            return
        kind = {3: "three (z0, z1, z2)", 2: "two (z0, z1)", 1: "one (the start)"}[n]
        if self.vertex_images is not None:
            paths = self.vertex_images
            paths = tuple(p for p in paths.split(",") if p) if isinstance(paths, str) else paths
            paths = tuple(str(p) for p in paths)
            if len(paths) != n:
                raise InvalidArgumentError(
                    f"{{param}} must be {kind} image file(s) for this sweep, got {len(paths)}",
                    "vertex_images",
                )
            s = self.sampling
            for path in paths:  # exists, is an image of the sampling size
                load_image(path, s.width, s.height, "vertex_images")
            object.__setattr__(self, "vertex_images", paths)
            object.__setattr__(self, "vertex_images_sha256", tuple(file_sha256(p) for p in paths))
        sha = tuple(self.vertex_images_sha256)
        if len(sha) != n:
            raise InvalidArgumentError(
                f"{{param}} must hold {kind} sha256 value(s), got {len(sha)}",
                "vertex_images_sha256",
            )
        object.__setattr__(self, "vertex_images_sha256", sha)

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        *,
        preset: str | None = None,
        grid: GridSpec | None = None,
        seeds: tuple[int, ...] | None = None,
        vertices: str | None = None,
        vertex_images: tuple[str, ...] | str | None = None,
        direction_prompts: tuple[str, str] | None = None,
        inversion_refine: int = 0,
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
            vertex_images=vertex_images,
            direction_prompts=direction_prompts,
            inversion_refine=inversion_refine,
            dtype=dtype,
        )

    def vertex_latents(self):
        """[3, 16, H/8, W/8] float32 ([2, ...] for a lerp or slerp path): from `vertices` if given,
        else `seeds`. Image and prompt vertices need the model: `flux_ir.sweep.run.sweep_vertices`."""
        s = self.sampling
        if self.needs_pipeline:
            raise InvalidArgumentError(
                "the vertex latents of image vertices (or direction prompts) come from inverting "
                "them with the model: use flux_ir.sweep.run.sweep_vertices(pipe, cfg, store)"
            )
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
            **self._inversion_signature(),
        }

    def _inversion_signature(self) -> dict:
        """Image and prompt vertices' settings (absent otherwise: older sweeps keep their signature)."""
        d: dict = {}
        if self.images_given:
            d["vertex_images_sha256"] = list(self.vertex_images_sha256)
        if self.direction_prompts is not None:
            d["direction_prompts"] = list(self.direction_prompts)
        if self.needs_pipeline:
            d["inversion_refine"] = self.inversion_refine
        return d

    @classmethod
    def from_signature(cls, d: dict) -> SweepConfig:
        """The config a signature describes (a sweep from a vertices file keeps its hash, not its path)."""
        d = dict(d)
        grid = d.pop("grid")
        grid = GridSpec(**{**grid, "alpha": tuple(grid["alpha"]), "beta": tuple(grid["beta"])})
        names = SamplingOptions.__dataclass_fields__
        sampling = SamplingOptions(**{k: d.pop(k) for k in list(d) if k in names})
        for key in ("vertex_images_sha256", "direction_prompts"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(sampling=sampling, grid=grid, seeds=tuple(d.pop("seeds")), **d)
