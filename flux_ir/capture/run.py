"""Generate with a FLUX pipeline while recording every block: the capture's entry point.

pipe, spec = load_pipeline("flux-tiny")
opts = GenerationOptions("a photo of a cat", width=256, height=256, num_steps=4, seed=1)
images, cap = run_capture(pipe, opts, model_name=spec.name)
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

import diffusers
import torch
import transformers
from diffusers import FluxPipeline
from PIL import Image

import flux_ir
from flux_ir.capture.copy import HostCopier
from flux_ir.capture.options import SIZE_MULTIPLE, GenerationOptions
from flux_ir.capture.result import Capture
from flux_ir.capture.select import Selection, resolve
from flux_ir.capture.trace import BlockTrace, PassRecord


def run_capture(
    pipe: FluxPipeline,
    opts: GenerationOptions,
    *,
    model_name: str = "unknown",
    double_blocks: Iterable[int] | None = None,
    single_blocks: Iterable[int] | None = None,
    steps: Iterable[int] | None = None,
    copier: HostCopier | None = None,
    extra_metadata: dict | None = None,
    selection: Selection | None = None,
    sink=None,
) -> tuple[list[Image.Image], Capture]:
    """Run `pipe` once with block hooks; return the generated images and the `Capture`.

    The initial noise comes from a CPU generator seeded with `opts.seed`, so the same seed gives the
    same capture on any device. Guidance is ignored by models without a guidance embedding.
    `selection` picks blocks, steps (negative: from the end), streams, storage dtype and reduction;
    with a `sink` (see `BlockTrace`) block tensors go to it step by step and the returned `Capture`
    holds only the denoising context and metadata.
    """
    sel = selection or Selection()
    if sel.double_blocks is not None:
        double_blocks = sel.double_blocks
    if sel.single_blocks is not None:
        single_blocks = sel.single_blocks
    if sel.steps is not None:
        steps = resolve(list(sel.steps), opts.num_steps, "steps")
    grid = (opts.height // SIZE_MULTIPLE, opts.width // SIZE_MULTIPLE)
    sel.check_grid(*grid)
    guidance = _effective_guidance(pipe, opts.guidance)
    final: dict[str, torch.Tensor] = {}

    def keep_latents(p, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    trace = BlockTrace(
        pipe.transformer,
        double_blocks=double_blocks,
        single_blocks=single_blocks,
        steps=steps,
        passes_per_step=2 if opts.true_cfg else 1,
        copier=copier,
        selection=Selection(streams=sel.streams, dtype=sel.dtype, reduce=sel.reduce),
        image_grid=grid,
        sink=sink,
    )
    with trace, torch.inference_mode():
        out = pipe(
            prompt=opts.prompt,
            negative_prompt=opts.negative_prompt,
            true_cfg_scale=opts.true_cfg_scale,
            width=opts.width,
            height=opts.height,
            num_inference_steps=opts.num_steps,
            guidance_scale=guidance if guidance is not None else 0.0,
            num_images_per_prompt=opts.num_images,
            generator=torch.Generator("cpu").manual_seed(opts.seed),
            max_sequence_length=opts.max_sequence_length,
            callback_on_step_end=keep_latents,
        )
    sigmas = [float(s) for s in pipe.scheduler.sigmas.cpu()]
    metadata = {
        "model": model_name,
        "prompt": opts.prompt,
        "negative_prompt": opts.negative_prompt,
        "width": opts.width,
        "height": opts.height,
        "num_steps": opts.num_steps,
        "seed": opts.seed,
        "guidance": guidance,
        "true_cfg_scale": opts.true_cfg_scale if opts.true_cfg else 1.0,
        "max_sequence_length": opts.max_sequence_length,
        "num_images": opts.num_images,
        "timesteps": sigmas[:-1],
        "sigmas": sigmas,
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "device": str(pipe._execution_device),
        "num_double_blocks": len(pipe.transformer.transformer_blocks),
        "num_single_blocks": len(pipe.transformer.single_transformer_blocks),
        "captured_double_blocks": trace.double_idx,
        "captured_single_blocks": trace.single_idx,
        "captured_steps": trace.records["cond"].steps,
        **sel.metadata(),
        "vae_scale_factor": pipe.vae_scale_factor,
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "vae_shift_factor": float(pipe.vae.config.shift_factor),
        "versions": {
            "flux_ir": flux_ir.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "run_id": uuid.uuid4().hex[:12],
        **(extra_metadata or {}),
    }
    capture = build_capture(trace.records, sigmas, guidance, final["latents"], plain(metadata))
    return out.images, capture


def build_capture(
    records: dict[str, PassRecord],
    sigmas: list[float],
    guidance: float | None,
    final_latents: torch.Tensor,
    metadata: dict,
) -> Capture:
    """Assemble the original tool's schema from the trace's per-pass records."""
    cond = records["cond"]
    n = len(cond.img_state)
    context = {
        "y": cond.y,
        "img_state": cond.img_state,
        "timestep_pairs": [(sigmas[k], sigmas[k + 1]) for k in range(n)],
        "txt_seq_len": cond.txt_seq_len,
        "guidance": guidance,
        "temb": cond.temb,
        "final_latents": final_latents.detach().to("cpu", copy=True),
        "true_cfg_scale": metadata["true_cfg_scale"],
    }
    cap = Capture(
        double_blocks=_double(cond),
        single_blocks=_single(cond),
        denoising_context=context,
        metadata=metadata,
    )
    if "uncond" in records:
        unc = records["uncond"]
        context.update(y_uncond=unc.y, temb_uncond=unc.temb, txt_seq_len_uncond=unc.txt_seq_len)
        cap.double_blocks_uncond = _double(unc)
        cap.single_blocks_uncond = _single(unc)
    return cap


def _double(rec: PassRecord) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    return {f"block_{i}": list(v) for i, v in sorted(rec.double.items())}


def _single(rec: PassRecord) -> dict[str, list[torch.Tensor]]:
    """Single-block outputs as the original tool stored them: `[txt; img]` along the sequence."""
    return {f"block_{i}": [joint_single(x) for x in v] for i, v in sorted(rec.single.items())}


def joint_single(value: torch.Tensor | tuple) -> torch.Tensor:
    """A single block's record as one tensor: `[txt; img]` (or the one stream that was captured)."""
    if isinstance(value, torch.Tensor):
        return value
    parts = [p for p in value if p is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def plain(obj):
    """Builtin types only (str subclasses such as torch's version become str), for weights_only loads."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return (
            type(obj)(plain(v) for v in obj)
            if type(obj) in (list, tuple)
            else list(map(plain, obj))
        )
    if isinstance(obj, bool) or obj is None:
        return obj
    for t in (int, float, str):
        if isinstance(obj, t):
            return t(obj)
    raise TypeError(f"metadata value {obj!r} of type {type(obj).__name__} is not a plain type")


def _effective_guidance(pipe: FluxPipeline, guidance: float | None) -> float | None:
    """None for models without a guidance embedding (schnell); the value is ignored there."""
    if not pipe.transformer.config.guidance_embeds:
        return None
    return 3.5 if guidance is None else float(guidance)


def timestamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d_%H%M%S")
