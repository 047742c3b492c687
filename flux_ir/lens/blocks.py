"""Apply the lens to a `Capture`: every (block, step) decoded as the final prediction, in batches.

    for item, images in decode_capture(pipe, cap, target="x0"):
        images[0].save(f"{item.name}.jpg")       # e.g. single_block_3_step_1.jpg

Items come in depth order (double blocks, then single blocks; steps within each block); their lens
latents are VAE-decoded in batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from PIL import Image
from tqdm.auto import tqdm

from flux_ir.capture.schema import KINDS, Capture
from flux_ir.lens.decode import (
    LensHead,
    LensOptions,
    check_capture_model,
    check_lens_target,
    decode_packed,
    lens_latents,
)


@dataclass(frozen=True)
class BlockStep:
    kind: str  # "double" or "single"
    index: int
    step: int

    @property
    def name(self) -> str:
        return f"{self.kind}_block_{self.index}_step_{self.step}"


def block_steps(
    cap: Capture, kinds: Iterable[str] = KINDS, steps: Iterable[int] | None = None
) -> list[BlockStep]:
    """All captured (block, step) pairs in depth order: double blocks first, then single."""
    steps = cap.captured_steps if steps is None else list(steps)
    idx = cap.block_indices
    return [BlockStep(kind, i, s) for kind in kinds for i in idx[kind] for s in steps]


def block_latents(
    head: LensHead, cap: Capture, item: BlockStep, target: str = "x0"
) -> torch.Tensor:
    """Lens latents [B, N, 64] for one (block, step); combines cond/uncond when true CFG ran."""
    ctx = cap.denoising_context
    k = item.step
    v = head.velocity(cap.image_tokens(item.kind, item.index, k), ctx["temb"][k])
    if cap.has_uncond:
        v_u = head.velocity(
            cap.image_tokens(item.kind, item.index, k, uncond=True), ctx["temb_uncond"][k]
        )
        v = v_u + ctx["true_cfg_scale"] * (v - v_u)
    t_curr, t_prev = ctx["timestep_pairs"][k]
    scheduler = cap.metadata.get("scheduler")
    return lens_latents(v, ctx["img_state"][k], t_curr, t_prev, target, scheduler)


def decode_capture(
    pipe: FluxPipeline,
    cap: Capture,
    items: list[BlockStep] | None = None,
    target: str = "x0",
    batch_size: int = 8,
    progress: bool = True,
    output_type: str = "pil",
) -> Iterator[tuple[BlockStep, list[Image.Image]]]:
    """Yield `(item, images)` for each (block, step); images has one entry per batch element.

    Lens latents of several items are VAE-decoded together in batches of `batch_size` latents.
    `output_type` "pt" yields image tensors [B, 3, H, W] in [0, 1] (on the VAE's device) instead.
    """
    LensOptions(target, batch_size)  # one check of both, before any work
    check_lens_target(target, cap.metadata.get("scheduler"))  # "next" needs a one-output step
    cap.check_image_tokens()
    temb = cap.denoising_context.get("temb")
    hidden = temb[0].shape[-1] if temb else None  # conditioning [B, D]: D is the blocks' width
    check_capture_model(pipe, cap.metadata, hidden)  # a traceback of shapes otherwise
    head = LensHead.from_pipeline(pipe)
    items = block_steps(cap) if items is None else items
    height, width = cap.metadata["height"], cap.metadata["width"]
    bar = tqdm(total=len(items), desc=f"lens ({target})", unit="img", disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        lat = [block_latents(head, cap, it, target) for it in chunk]
        per_item = lat[0].shape[0]
        images = decode_packed(pipe, torch.cat(lat), height, width, output_type)
        for j, it in enumerate(chunk):
            yield it, images[j * per_item : (j + 1) * per_item]
        bar.update(len(chunk))
    bar.close()
