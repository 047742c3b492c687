"""Ablation: remove each block's contribution in turn and measure what the final image loses.

    table = block_importance(pipe, CaptureOptions.from_spec(spec, seed=0))   # a pandas DataFrame
    table.sort_values("effect", ascending=False).head()                         # the blocks that matter

Each block's image-token output (or text tokens, or both) is replaced by the edit (default: zero
ablation) at every step, one block per batch element; the effect is `mean |ablated - plain|` over the
final image's pixels in [0, 1], with the classifier's readings when one is given.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from flux_ir.capture import CaptureOptions
from flux_ir.errors import InvalidArgumentError
from flux_ir.intervene import Edit, Intervention, Site, zero
from flux_ir.sampling import generate


def block_importance(
    pipe: FluxPipeline,
    opts: CaptureOptions,
    *,
    edit: Callable[[], Edit] = zero,
    stream: str = "img",
    batch_size: int = 8,
    classify: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per block (depth order): kind, block, effect (and readings): see the module docstring."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(
            f"{{param}} must be a positive integer, got {batch_size!r}", "batch_size"
        )
    t = pipe.transformer
    blocks = [("double", i) for i in range(len(t.transformer_blocks))]
    blocks += [("single", i) for i in range(len(t.single_transformer_blocks))]
    s = opts.sampling

    def images(n: int, edits: list) -> torch.Tensor:
        with Intervention(t, edits, passes_per_step=s.passes_per_step):
            out = generate(pipe, s, prompts=[s.prompt] * n, seed=[opts.seed] * n, output_type="pt")
        return out.images.float().cpu()

    plain = images(1, [])
    rows = []
    for lo in tqdm(range(0, len(blocks), batch_size), desc="ablation", disable=not progress):
        chunk = blocks[lo : lo + batch_size]
        edits = [(Site(k, i, stream=stream, batch=(j,)), edit()) for j, (k, i) in enumerate(chunk)]
        ablated = images(len(chunk), edits)
        effect = (ablated - plain).abs().flatten(1).mean(1)
        found = classify(ablated) if classify is not None else {}
        for j, (kind, index) in enumerate(chunk):
            row = {"kind": kind, "block": index, "effect": float(effect[j])}
            row.update({name: int(values[j]) for name, values in found.items()})
            rows.append(row)
    return pd.DataFrame(rows)
