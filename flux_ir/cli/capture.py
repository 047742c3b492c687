"""`capture_sample.py` / `flux-ir capture`: generate one image and capture every block."""

from __future__ import annotations

import random

import torch

from flux_ir.capture import GenerationOptions
from flux_ir.capture.copy import COPIERS, make_copier
from flux_ir.capture.options import validate_output_dir
from flux_ir.capture.select import Selection
from flux_ir.errors import InvalidArgumentError
from flux_ir.lens.decode import check_target
from flux_ir.models import load_pipeline, resolve_model
from flux_ir.models.compile import compile_blocks
from flux_ir.models.loading import check_weights, normalize_offload


def capture(
    model: str = "flux-schnell",
    width: int | None = None,
    height: int | None = None,
    prompt: str = "a beautiful landscape",
    seed: int | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    offload: bool | str = False,
    device: str | None = None,
    output_dir: str = "output",
    should_decode_intermediates: bool = True,
    decode_target: str = "x0",
    add_sampling_metadata: bool = True,
    negative_prompt: str | None = None,
    true_cfg_scale: float | None = None,
    decode_batch_size: int = 8,
    weights: str = "pretrained",
    double_blocks: str | int | tuple = "all",
    single_blocks: str | int | tuple = "all",
    steps: str | int | tuple = "all",
    streams: str = "both",
    store_dtype: str | None = None,
    reduce: str | None = None,
    format: str = "pt",
    copy: str = "async",
    compile: bool = False,
) -> None:
    """Generate with FLUX while recording every double- and single-stream block at every step.

    Args:
        model: flux-schnell, flux-dev, flux-dev-krea, flux-tiny, flux-toy, or a local diffusers FluxPipeline directory.
        width, height: image size in pixels, multiples of 16 (default 256; flux-toy: 128).
        prompt: the text prompt.
        seed: noise seed (random if omitted; recorded in the metadata).
        num_steps: denoising steps (model default: 4 for schnell/tiny, 50 for dev/krea).
        guidance: distilled guidance scale (model default; ignored by schnell).
        offload: False, True/"model" (diffusers model CPU offload), "sequential" or "group"
            (diffusers group offloading, one block at a time, prefetched on a CUDA stream).
        device: cuda or cpu (default: cuda when available).
        output_dir: where the run directory is created.
        should_decode_intermediates: decode every block with the lens and draw the mosaic.
        decode_target: "x0" (the clean-image estimate) or "next" (one Euler step, the original tool's).
        add_sampling_metadata: write the prompt into the image's EXIF metadata.
        negative_prompt, true_cfg_scale: true classifier-free guidance (two passes per step) when
            scale > 1 (model default: off, except flux-toy: 2.0 against the empty prompt).
        decode_batch_size: latents per VAE decode call.
        weights: "pretrained" or "random" (the exact architecture with random weights, no download).
        double_blocks, single_blocks: blocks to capture: "all", "none", or indices and ranges like
            "0-5,18" (negative: from the end).
        steps: denoising steps to capture, same syntax ("0,-1": first and last).
        streams: "both", "img" (image tokens) or "txt" (text tokens).
        store_dtype: float32, float16 or bfloat16 (cast on the device; default: the model's dtype).
        reduce: "mean" (over tokens) or "poolK" (K x K pooling of image tokens), on the device.
        format: "pt" (one file at the end) or "shards" (safetensors shards streamed per step,
            for large runs: host memory stays bounded).
        copy: "async" (side-stream copies, drained into ordinary host tensors; use it with
            --format shards), "pinned" (copies straight into page-locked host memory, which the
            process keeps: faster once it has captured before) or "sync" (blocking `.cpu()`).
        compile: torch.compile every block's forward (hooks stay outside the graphs); the first
            step pays the compilation.
    """
    from flux_ir.runs import capture_to_dir

    spec = resolve_model(str(model))
    width = (spec.size or 256) if width is None else width
    height = (spec.size or 256) if height is None else height
    seed = random.randrange(2**31) if seed is None else seed
    opts = GenerationOptions(
        prompt=prompt,
        width=width,
        height=height,
        num_steps=spec.num_steps if num_steps is None else num_steps,
        seed=seed,
        guidance=spec.guidance if guidance is None else guidance,
        negative_prompt=spec.negative_prompt if negative_prompt is None else negative_prompt,
        true_cfg_scale=float(spec.true_cfg_scale if true_cfg_scale is None else true_cfg_scale),
        max_sequence_length=spec.max_sequence_length,
    )
    check_target(decode_target)
    offload_mode = normalize_offload(offload)
    check_weights(weights)
    device = check_device(device)
    selection = Selection.parse(double_blocks, single_blocks, steps, streams, store_dtype, reduce)
    if should_decode_intermediates and (selection.streams == "txt" or selection.reduce):
        raise InvalidArgumentError(
            "the lens needs every image token: with --streams txt or --reduce, also pass "
            "--should_decode_intermediates False."
        )
    if format not in FORMATS:
        raise InvalidArgumentError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if copy not in COPIERS:
        raise InvalidArgumentError(f"--copy {copy!r}: choose one of {', '.join(COPIERS)}")
    if decode_batch_size < 1:
        raise InvalidArgumentError(f"--decode_batch_size must be >= 1, got {decode_batch_size}")
    out = validate_output_dir(output_dir)

    print(
        f"loading {spec.name} ({weights} weights) on {device} (offload: {offload_mode}) ...",
        flush=True,
    )
    pipe, spec = load_pipeline(spec, device=device, offload=offload_mode, weights=weights)
    pipe.set_progress_bar_config(disable=False, desc="denoising", leave=False)
    if compile:
        compile_blocks(pipe.transformer)
    print(f"capturing {opts.num_steps} steps at {width}x{height}, seed {seed} ...", flush=True)
    run_dir = capture_to_dir(
        pipe,
        spec,
        opts,
        out,
        decode=should_decode_intermediates,
        decode_target=decode_target,
        decode_batch_size=decode_batch_size,
        add_sampling_metadata=add_sampling_metadata,
        extra_metadata={"offload": offload_mode, "weights": weights, "compiled": bool(compile)},
        selection=selection,
        copier=make_copier(copy),
        store_format=format,
    )
    print(f"run directory: {run_dir}")


FORMATS = ("pt", "shards")


def check_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidArgumentError(
            f"--device {device!r} is not a device name; use cuda, cuda:0 or cpu."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            "--device cuda was asked for but CUDA is not available; use --device cpu."
        )
    return str(dev)
