"""Activation patching from a capture: edits that put a recorded run's activations into another run.

    opts_a = SamplingOptions.from_spec(spec, prompt="a red circle", width=64, height=64)
    opts_b = SamplingOptions.from_spec(spec, prompt="a green square", width=64, height=64)
    _, source = run_capture(pipe, CaptureOptions(opts_a, seed=1))          # record a run ...
    edits = patch_edits(source, [Site("single", 3, steps=(0, 1))])          # ... patch it in
    with Intervention(pipe.transformer, edits, passes_per_step=opts_b.passes_per_step):
        images = generate(pipe, opts_b, seed=1).images

Each site reads the capture lazily, step by step (a shard capture opens only the shards it needs);
under true CFG the conditional pass is patched from the capture's conditional pass and the
unconditional pass from its unconditional one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace as with_fields
from typing import TYPE_CHECKING

import torch

from flux_ir.errors import InvalidArgumentError
from flux_ir.intervene.edits import Edit, Site, replace

if TYPE_CHECKING:
    from flux_ir.capture.schema import Capture


def recorded(cap: Capture, site: Site, uncond: bool = False) -> Callable[[int], torch.Tensor]:
    """`step -> the capture's activation at `site`` ([B, t, D]; temb: [B, D]), read when asked."""
    if site.kind == "temb":
        key = "temb_uncond" if uncond else "temb"
        return lambda step: cap.denoising_context[key][step]
    get = cap.image_tokens if site.stream == "img" else cap.text_tokens

    def at(step: int) -> torch.Tensor:
        x = get(site.kind, site.block, step, uncond=uncond)
        tokens = site.token_index(x.shape[1])
        return x if site.tokens is None else x[:, tokens]

    return at


def patch_edits(cap: Capture, sites: Iterable[Site]) -> list[tuple[Site, Edit]]:
    """Edits that replace each site's activations by `cap`'s, per pass (see the module docstring)."""
    out = []
    for site in sites:
        passes = ["cond", "uncond"] if site.passes == "both" else [site.passes]
        if not cap.has_uncond:
            if site.passes == "uncond":
                raise InvalidArgumentError(
                    "{param}: the capture ran no unconditional pass (no true CFG)", "passes"
                )
            passes = ["cond"]
        for name in passes:
            source = recorded(cap, site, uncond=name == "uncond")
            out.append((with_fields(site, passes=name), replace(source)))
    return out
