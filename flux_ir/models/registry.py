"""Known FLUX.1 models and their defaults (steps, guidance, T5 sequence length).

    spec = resolve_model("flux-dev")          # registry name: spec.num_steps == 50, spec.guidance == 3.5
    # resolve_model("/path/to/pipeline")      # a local diffusers FluxPipeline directory

A local directory keeps the defaults written beside it by `save_pipeline` (a sidecar JSON), or takes
those of schnell or dev by whether its transformer has a guidance embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flux_ir.errors import InvalidArgumentError

SIDECAR = "flux_ir_model.json"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how it samples by default.

    `guidance` is None for models without a guidance embedding (FLUX.1-schnell): the value is ignored.
    `true_cfg_scale` > 1 with a `negative_prompt` samples with true classifier-free guidance (two
    passes per step) by default: flux-toy, trained with caption dropout, follows shapes better so.
    `source` is a hub repository id, a local directory, "builtin" for models built in code, or
    "package" for flux-toy, whose trained weights ship inside the package.
    """

    name: str
    source: str
    num_steps: int
    guidance: float | None
    max_sequence_length: int
    description: str = ""
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    size: int | None = None  # native width and height (flux-toy: 128); None: each command's default
    prompt: str | None = None  # a prompt the model knows (flux-toy: a scene); None: a general one

    def to_dict(self) -> dict:
        return asdict(self)


REGISTRY: dict[str, ModelSpec] = {
    "flux-schnell": ModelSpec(
        "flux-schnell",
        "black-forest-labs/FLUX.1-schnell",
        num_steps=4,
        guidance=None,
        max_sequence_length=256,
        description="FLUX.1-schnell, timestep-distilled, 4 steps, no guidance embedding",
    ),
    "flux-dev": ModelSpec(
        "flux-dev",
        "black-forest-labs/FLUX.1-dev",
        num_steps=50,
        guidance=3.5,
        max_sequence_length=512,
        description="FLUX.1-dev, guidance-distilled (gated: accept the licence on the hub)",
    ),
    "flux-dev-krea": ModelSpec(
        "flux-dev-krea",
        "black-forest-labs/FLUX.1-Krea-dev",
        num_steps=50,
        guidance=4.5,
        max_sequence_length=512,
        description="FLUX.1-Krea-dev, KREA fine-tune of FLUX.1-dev (gated)",
    ),
    "flux-tiny": ModelSpec(
        "flux-tiny",
        "builtin",
        num_steps=4,
        guidance=3.5,
        max_sequence_length=32,
        description="miniature FLUX built in code, random weights, runs offline on a CPU",
    ),
    "flux-toy": ModelSpec(
        "flux-toy",
        "package",
        num_steps=16,
        guidance=None,
        max_sequence_length=16,
        description="small FLUX trained on shape scenes (128x128); weights from train_toy.py, offline on a CPU",
        true_cfg_scale=2.0,
        negative_prompt="",
        size=128,
        prompt="a red circle on a blue background",
    ),
    "flux-toy-2": ModelSpec(
        "flux-toy-2",
        "package",
        num_steps=16,
        guidance=None,
        max_sequence_length=24,
        description="flux-toy grown and trained on scenes of one to three objects (128x128); "
        "weights from train_toy.py --world 2",
        true_cfg_scale=2.0,
        negative_prompt="",
        size=128,
        prompt="a large plain red circle left of a small striped blue square on a white background",
    ),
}


def is_local_pipeline_dir(path: str | Path) -> bool:
    """True if `path` is a directory holding a diffusers pipeline (`model_index.json`)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "model_index.json").is_file()


def resolve_model(model: str) -> ModelSpec:
    """Return the spec for a registry name or a local diffusers Flux pipeline directory.

    Raises InvalidArgumentError (before anything loads) for an unknown name.
    """
    if model in REGISTRY:
        return REGISTRY[model]
    path = Path(model).expanduser()
    if is_local_pipeline_dir(path):
        return _spec_from_directory(path)
    known = ", ".join(REGISTRY)
    if path.exists():
        raise InvalidArgumentError(
            f"{{param}} {model!r} is a path but holds no diffusers pipeline (no model_index.json). "
            f"Save one with `pipe.save_pretrained(dir)`, or pick a registry model: {known}.",
            "model",
        )
    raise InvalidArgumentError(
        f"{{param}} {model!r} is unknown; choose one of {known}, or pass a local directory that "
        "holds a diffusers FluxPipeline (saved with save_pretrained).",
        "model",
    )


def _spec_from_directory(path: Path) -> ModelSpec:
    """Defaults for a local directory: its flux-ir sidecar if present, else from its config."""
    sidecar = path / SIDECAR
    if sidecar.is_file():
        data = json.loads(sidecar.read_text())
        base = ModelSpec(**{k: data[k] for k in ModelSpec.__dataclass_fields__ if k in data})
        return replace(base, source=str(path.resolve()))
    transformer_cfg = path / "transformer" / "config.json"
    has_guidance = False
    if transformer_cfg.is_file():
        has_guidance = bool(json.loads(transformer_cfg.read_text()).get("guidance_embeds", False))
    like = REGISTRY["flux-dev" if has_guidance else "flux-schnell"]
    return replace(like, name=path.resolve().name, source=str(path.resolve()), description="")


def write_sidecar(spec: ModelSpec, directory: str | Path) -> None:
    """Record `spec` beside a saved pipeline so `resolve_model(directory)` keeps its defaults."""
    (Path(directory) / SIDECAR).write_text(json.dumps(spec.to_dict(), indent=2))
