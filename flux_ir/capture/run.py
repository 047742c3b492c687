"""Generate with a FLUX pipeline while recording every block: the capture's entry point.

    pipe, spec = load_pipeline("flux-tiny")
    opts = CaptureOptions.from_spec(spec, seed=1, prompt="a photo of a cat", width=64, height=64)
    images, cap = run_capture(pipe, opts, model_name=spec.name)
    cap["single", 3, 0]          # [B, L + N, D] at step 0

The images are the pipeline's own; the capture holds every selected block's output at every
selected step, the denoising context and the metadata (`flux_ir.capture.schema`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from PIL import Image

from flux_ir.capture.attention import AttentionOptions, AttentionTrace
from flux_ir.capture.copy import HostCopier, HostPool, host_pool
from flux_ir.capture.options import CaptureOptions
from flux_ir.capture.schema import Capture, build_capture
from flux_ir.capture.select import Selection
from flux_ir.capture.trace import BlockTrace
from flux_ir.intervene.edits import Edit, Site
from flux_ir.intervene.hooks import Intervention
from flux_ir.models.fingerprint import weights_fingerprint
from flux_ir.sampling import effective_guidance, generate
from flux_ir.version import library_versions


def run_capture(
    pipe: FluxPipeline,
    opts: CaptureOptions,
    *,
    model_name: str = "unknown",
    selection: Selection | None = None,
    copier: HostCopier | None = None,
    extra_metadata: dict | None = None,
    sink=None,
    progress: bool = True,
    edits: Sequence[tuple[Site, Edit]] = (),
    attention: AttentionOptions | None = None,
) -> tuple[list[Image.Image], Capture]:
    """Run `pipe` once with block hooks; return the generated images and the `Capture`.

    `selection` picks blocks, steps (negative: from the end), streams, storage dtype and reduction
    (default: everything); it is resolved here, once, against the model and `opts`' steps. With a
    `sink` (see `BlockTrace`) block tensors go to it step by step and the returned `Capture` holds only
    the denoising context and metadata. `progress` shows a denoising progress bar. `edits`
    ([(Site, Edit)], see `flux_ir.intervene`) change block outputs while the capture records them:
    the capture holds the edited activations and its metadata lists the edits (`interventions`).
    `attention` (an `AttentionOptions`) also records joint attention maps (`AttentionTrace`) into
    the capture: `cap.attention[kind, block, step]`, saved in its files.
    """
    sampling = opts.sampling
    transformer = pipe.transformer
    sel = (selection or Selection()).resolve(
        len(transformer.transformer_blocks),
        len(transformer.single_transformer_blocks),
        sampling.num_steps,
    )
    sel.check_grid(*sampling.token_grid)
    reserve = getattr(copier, "reserve", None)
    if reserve is not None:  # page-locking starts now, beside the text encoders and first steps
        total, per_step, largest = capture_nbytes(transformer, sel, sampling, opts.num_images)
        reserve(host_bytes_asked(total, per_step, sink is not None), largest)
    final: dict[str, torch.Tensor] = {}

    def keep_latents(p, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    trace = BlockTrace(
        transformer,
        sel,
        passes_per_step=sampling.passes_per_step,
        copier=copier,
        image_grid=sampling.token_grid,
        sink=sink,
    )
    intervention = Intervention(
        transformer, edits, passes_per_step=sampling.passes_per_step, num_steps=sampling.num_steps
    )
    maps = (
        contextlib.nullcontext()
        if attention is None
        else AttentionTrace(
            transformer,
            attention,
            num_steps=sampling.num_steps,
            passes_per_step=sampling.passes_per_step,
        )
    )
    # the edits' hooks run first, so the trace records edited outputs
    with intervention, trace, maps:
        out = generate(
            pipe,
            sampling,
            seed=opts.seed,
            num_images=opts.num_images,
            callback=keep_latents,
            progress=progress,
        )
    sigmas = [float(s) for s in pipe.scheduler.sigmas.cpu()]
    guidance = effective_guidance(pipe, sampling.guidance)
    metadata = {
        "model": model_name,
        "weights_fingerprint": weights_fingerprint(pipe),  # the weights loaded, not their name
        **sampling.to_dict(),  # every sampling setting, as asked; then what the model saw:
        "guidance": guidance,
        "true_cfg_scale": sampling.true_cfg_scale if sampling.true_cfg else 1.0,
        "seed": opts.seed,
        "num_images": opts.num_images,
        "scheduler_class": type(pipe.scheduler).__name__,
        "timesteps": sigmas[:-1],
        "sigmas": sigmas,
        "dtype": str(transformer.dtype).removeprefix("torch."),
        "device": str(pipe._execution_device),
        "num_double_blocks": len(transformer.transformer_blocks),
        "num_single_blocks": len(transformer.single_transformer_blocks),
        "captured_double_blocks": list(sel.double_blocks),
        "captured_single_blocks": list(sel.single_blocks),
        "captured_steps": trace.records["cond"].steps,
        **sel.metadata(),
        "vae_scale_factor": pipe.vae_scale_factor,
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "vae_shift_factor": float(pipe.vae.config.shift_factor),
        "versions": library_versions(),
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "run_id": uuid.uuid4().hex[:12],
        **({"interventions": intervention.describe()} if edits else {}),
        **(extra_metadata or {}),
    }
    capture = build_capture(
        trace.records, sigmas, guidance, final["latents"], metadata, getattr(maps, "passes", None)
    )
    return out.images, capture


STREAM_STEPS = 4  # steps of host memory a streaming sink holds at most (writer queue and slack)


@dataclass(frozen=True)
class TransformerShape:
    """What sizes a capture: the transformer's width, blocks, pooled-text width and dtype."""

    inner_dim: int
    num_double: int
    num_single: int
    pooled_projection_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, transformer) -> TransformerShape:
        """The shape of a loaded `FluxTransformer2DModel`."""
        return cls(
            int(transformer.inner_dim),
            len(transformer.transformer_blocks),
            len(transformer.single_transformer_blocks),
            int(transformer.config.pooled_projection_dim),
            transformer.dtype,
        )

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype) -> TransformerShape:
        """The shape a transformer config (`FluxTransformer2DModel`'s entries) will have in `dtype`."""
        return cls(
            int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
            int(config["num_layers"]),
            int(config["num_single_layers"]),
            int(config["pooled_projection_dim"]),
            dtype,
        )


def capture_nbytes(transformer, sel: Selection, sampling, num_images: int) -> tuple[int, int, int]:
    """Host bytes a capture will take: (whole run, one captured step, the largest tensor), with a
    margin for the ends of page-locked regions that tensors do not fill. `transformer`: the model
    or its `TransformerShape`; `sel` is resolved."""
    shape = (
        transformer
        if isinstance(transformer, TransformerShape)
        else TransformerShape.of(transformer)
    )
    b, passes = num_images, sampling.passes_per_step
    d = shape.inner_dim
    item = (sel.torch_dtype or shape.dtype).itemsize
    n_tokens = sampling.token_grid[0] * sampling.token_grid[1]
    n_img, n_txt = n_tokens, sampling.max_sequence_length
    if sel.reduce == "mean":
        n_img = n_txt = 1
    elif sel.pool:
        n_img //= sel.pool**2
    img = n_img * d * b * item if sel.streams != "txt" else 0
    txt = n_txt * d * b * item if sel.streams != "img" else 0
    blocks = (len(sel.double_blocks) + len(sel.single_blocks)) * (img + txt)
    model_item = shape.dtype.itemsize
    context = b * model_item * (n_tokens * 64 + shape.pooled_projection_dim + d)
    steps = sampling.num_steps if sel.steps is None else len(sel.steps)
    per_step = passes * blocks
    total = steps * per_step + passes * sampling.num_steps * context
    largest = img + txt if sel.single_blocks and sel.full else max(img, txt)
    return int(total * 1.15) + 2 * largest, int(per_step * 1.15), largest


def host_bytes_asked(total: int, per_step: int, streaming: bool) -> int:
    """What a capture asks the pool for: the whole run, or a few steps when a sink streams it."""
    return min(total, STREAM_STEPS * per_step) if streaming else total


def prepare_capture(
    model,
    opts: CaptureOptions,
    selection: Selection | None = None,
    *,
    streaming: bool = False,
    pool: HostPool | None = None,
) -> int:
    """Start page-locking the host memory a capture of `opts` will fill, in the background, and
    return at once with the bytes asked (0 where there is nothing to do: the pool does not
    page-lock, on a machine without CUDA, or the model's config is unknown before it loads).

    Call it before `load_pipeline` with the same `LoadOptions` (the memory is page-locked while the
    model loads), or with the loaded pipeline some time before the capture. Without it, the first
    capture of a process page-locks beside its own text encoding and denoising, and the driver's
    page-locking calls stall the kernel launches there (flux-dev 1024², 4 steps, on an H200: 1.74 s
    against 1.00 s with the pool grown beforehand; `benchmarks/diag_first_capture.py`).

    `model`: `LoadOptions`, a `FluxPipeline` or its transformer. `selection` as `run_capture`'s;
    `streaming`: the capture goes to a sink (shards), which holds a few steps at a time. `pool`:
    default the process's shared pool (`host_pool()`), the one `AsyncCopier` carves from.

        >>> from flux_ir.models import LoadOptions
        >>> load = LoadOptions.create("flux-toy", "cpu")
        >>> opts = CaptureOptions.from_spec(load.spec, seed=0)
        >>> pool = HostPool(pin=False, threads=1)     # the default pool page-locks on CUDA only
        >>> n = prepare_capture(load, opts, pool=pool)
        >>> n > 0 and pool.wait_idle(timeout=60) and pool.free_bytes >= n
        True
    """
    from flux_ir.models.loading import LoadOptions, transformer_config

    if pool is None:
        pool = host_pool()
        if not pool.pin:
            return 0
    if isinstance(model, LoadOptions):
        config = transformer_config(model)
        if config is None:
            return 0
        shape = TransformerShape.from_config(config, model.torch_dtype)
    else:
        shape = TransformerShape.of(getattr(model, "transformer", model))
    sampling = opts.sampling
    sel = (selection or Selection()).resolve(shape.num_double, shape.num_single, sampling.num_steps)
    total, per_step, _ = capture_nbytes(shape, sel, sampling, opts.num_images)
    nbytes = host_bytes_asked(total, per_step, streaming)
    pool.prefill(nbytes)
    return nbytes


def timestamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d_%H%M%S")
