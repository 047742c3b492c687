"""Steering vectors: the mean difference of a block's image tokens between two prompt sets, per step.

    opts = SamplingOptions.from_spec(spec, width=64, height=64)
    vec = steering_vector(pipe, opts, toward=["a blue circle on a white background"],
                          away=["a red circle on a white background"], kind="single", block=3)
    vec.save("red_to_blue.safetensors"); vec = SteeringVector.load("red_to_blue.safetensors")
    with Intervention(pipe.transformer, vec.edits(scale=2.0), passes_per_step=opts.passes_per_step):
        images = generate(pipe, opts, seed=1).images

`vec.vectors[k]` ([D]) is the mean over prompts, seeds and image tokens of the block's output at
denoising step k for the `toward` prompts minus the same for the `away` prompts (conditional pass).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flux_ir.capture.options import CaptureOptions
from flux_ir.capture.select import Selection
from flux_ir.errors import InvalidArgumentError
from flux_ir.intervene.edits import Edit, Site, add
from flux_ir.io.atomic import atomic_path

if TYPE_CHECKING:
    from diffusers import FluxPipeline

    from flux_ir.sampling import SamplingOptions


@dataclass
class SteeringVector:
    """Per-step directions `vectors` [steps, D] (float32) for one block's image tokens."""

    kind: str
    block: int
    vectors: torch.Tensor
    info: dict = field(default_factory=dict)

    def edits(
        self, scale: float = 1.0, steps: Sequence[int] | None = None, passes: str = "both"
    ) -> list[tuple[Site, Edit]]:
        """Add `scale * vectors[step]` to the block's image tokens (at `steps`, default all)."""
        site = Site(self.kind, self.block, steps=steps, passes=passes)
        return [(site, add(lambda step: self.vectors[step], scale))]

    def save(self, path: str | Path) -> Path:
        """A safetensors file: the vectors, and kind, block and info as its metadata (no pickle)."""
        from safetensors.torch import save_file

        meta = {"kind": self.kind, "block": str(self.block), "info": json.dumps(self.info)}
        with atomic_path(path) as tmp:
            save_file({"vectors": self.vectors.contiguous()}, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "kind" not in meta or "vectors" not in f.keys():
                raise InvalidArgumentError(f"{{param}} {path} holds no steering vector", "path")
            vectors = f.get_tensor("vectors")
        return cls(meta["kind"], int(meta["block"]), vectors, json.loads(meta.get("info", "{}")))


def mean_tokens(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    prompts: Sequence[str],
    kind: str,
    block: int,
    seeds: Sequence[int] = (0,),
) -> torch.Tensor:
    """Mean over prompts, seeds and image tokens of a block's output per step: [steps, D] float32."""
    from flux_ir.capture.run import run_capture  # run_capture takes edits: it imports this package

    sel = Selection(double_blocks=(), single_blocks=(), streams="img")
    sel = replace(sel, **{f"{kind}_blocks": (block,)})
    total = None
    for prompt in prompts:
        for seed in seeds:
            run = CaptureOptions(replace(opts, prompt=prompt), seed=int(seed))
            _, cap = run_capture(pipe, run, selection=sel, progress=False)
            per_step = torch.stack(
                [
                    cap.image_tokens(kind, block, k).float().mean(dim=(0, 1))
                    for k in cap.captured_steps
                ]
            )
            total = per_step if total is None else total + per_step
    return total / (len(prompts) * len(seeds))


def steering_vector(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    toward: Sequence[str],
    away: Sequence[str],
    kind: str,
    block: int,
    seeds: Sequence[int] = (0,),
) -> SteeringVector:
    """The direction from the `away` prompts to the `toward` prompts at one block (module docstring)."""
    if not toward or not away:
        raise InvalidArgumentError("{param}: give at least one prompt on each side", "toward")
    Site(kind, block)  # checks kind
    vectors = mean_tokens(pipe, opts, toward, kind, block, seeds) - mean_tokens(
        pipe, opts, away, kind, block, seeds
    )
    info = {"toward": list(toward), "away": list(away), "seeds": [int(s) for s in seeds]}
    info["sampling"] = opts.to_dict()
    return SteeringVector(kind, block, vectors, info)
