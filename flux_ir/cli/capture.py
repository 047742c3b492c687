"""`capture_sample.py` / `flux-ir capture`: generate one image and capture every block."""

from __future__ import annotations

import random

from flux_ir.cli import flags, text

CAPTURE_FLAGS = dict(
    store_format="--format",
    decode="--should_decode_intermediates",
    target="--decode_target",
    batch_size="--decode_batch_size",
)


@flags(**CAPTURE_FLAGS)
def capture(
    model: str = "flux-schnell",
    width: int | None = None,
    height: int | None = None,
    prompt: str | None = None,
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
    copy: str = "pinned",
    compile: bool = False,
    multi_gpu: bool = False,
    scheduler: str = "euler",
) -> None:
    """Generate with FLUX while recording every double- and single-stream block at every step.

    Args:
        model: flux-schnell, flux-dev, flux-dev-krea (hub weights), flux-tiny (built in code,
            random weights), flux-toy (shipped in the package), or a local diffusers FluxPipeline
            directory.
        width, height: image size in pixels, multiples of 16 (default 256; flux-toy: 128).
        prompt: the text prompt (default: the model's own; flux-toy: "a red circle on a blue
            background", others: "a beautiful landscape").
        seed: noise seed, drawn on a CPU generator (default: a random seed; recorded in the
            metadata).
        num_steps: denoising steps (model default: 4 for schnell and flux-tiny, 16 for flux-toy,
            50 for dev and krea).
        guidance: distilled guidance scale (model default: 3.5 for dev and flux-tiny, 4.5 for
            krea; ignored by schnell and flux-toy).
        offload: False, True or "model" (diffusers model CPU offload), "sequential" or "group"
            (diffusers group offloading, one block at a time, prefetched on a CUDA stream).
        device: cuda, cuda:N or cpu (default: cuda when available).
        output_dir: where the run directory is created.
        should_decode_intermediates: decode every block with the lens and draw the mosaic.
        decode_target: "x0" (the clean-image estimate) or "next" (one Euler step, the original tool's).
        add_sampling_metadata: write the prompt into the image's EXIF metadata.
        negative_prompt: the prompt that true classifier-free guidance steers away from (model
            default: none; flux-toy: the empty prompt "").
        true_cfg_scale: true classifier-free guidance scale; above 1 with a negative prompt, each
            step runs a conditional and an unconditional pass (model default: 1.0, off; flux-toy:
            2.0).
        decode_batch_size: latents per VAE decode call.
        weights: "pretrained" or "random" (the exact architecture with random weights, no download).
        double_blocks, single_blocks: blocks to capture: "all", "none", or indices and ranges like
            "0-5,18" (negative: from the end).
        steps: denoising steps to capture, same syntax ("0,-1": first and last).
        streams: "both", "img" (image tokens) or "txt" (text tokens).
        store_dtype: float32, float16 or bfloat16 (cast on the device; default: the model's dtype).
        reduce: "mean" (over tokens) or "poolK" (K x K pooling of image tokens), on the device
            (default: none, whole tensors).
        format: "pt" (one file at the end) or "shards" (safetensors shards streamed per step,
            for large runs: host memory stays bounded).
        copy: "pinned" (side-stream copies straight into page-locked host memory, made while
            the model loads and reused by every capture of the process),
            "pageable" (every copy staged into ordinary host memory, none page-locked) or "sync"
            (blocking `.cpu()`).
        compile: torch.compile every block's forward (hooks stay outside the graphs); the first
            step pays the compilation.
        multi_gpu: spread the pipeline's components (transformer, text encoders, VAE) over every
            visible GPU with diffusers' device_map="balanced", for models too large for one GPU;
            needs 2 or more GPUs and weights from the hub or a local directory (not flux-tiny,
            flux-toy or --weights random), without --offload or --device.
        scheduler: euler (FLUX's flow-matching Euler), dpm++2m, dpm++3m (DPM-Solver++ multistep)
            or unipc (UniPC), all on FLUX's noise levels; recorded in the metadata. The next
            decode target needs euler.
    """
    from flux_ir.capture import CaptureOptions, Selection, make_copier, prepare_capture
    from flux_ir.io.dirs import check_output_dir
    from flux_ir.lens import LensOptions
    from flux_ir.models import LoadOptions, load_pipeline
    from flux_ir.models.compile import compile_blocks
    from flux_ir.workflows import CaptureRunOptions, capture_to_dir

    load = LoadOptions.create(model, device, offload, weights, multi_gpu=multi_gpu)
    opts = CaptureOptions.from_spec(
        load.spec,
        seed=random.randrange(2**31) if seed is None else seed,
        prompt=text(prompt),
        width=width,
        height=height,
        num_steps=num_steps,
        guidance=guidance,
        negative_prompt=text(negative_prompt),
        true_cfg_scale=true_cfg_scale,
        scheduler=scheduler,
    )
    if should_decode_intermediates:
        from flux_ir.models.schedulers import check_lens_target

        check_lens_target(decode_target, scheduler)
    run = CaptureRunOptions(
        selection=Selection.parse(
            double_blocks, single_blocks, steps, streams, store_dtype, reduce
        ),
        decode=LensOptions(decode_target, decode_batch_size)
        if should_decode_intermediates
        else None,
        store_format=format,
        add_sampling_metadata=bool(add_sampling_metadata),
    )
    copier = make_copier(copy)
    out = check_output_dir(output_dir)
    if copy == "pinned":  # page-locked while the model loads, not beside the first steps
        prepare_capture(load, opts, run.selection, streaming=format == "shards")

    spec = load.spec
    where = "the GPUs (device map: balanced)" if load.multi_gpu else load.device
    print(
        f"loading {spec.name} ({load.weights_text}) on {where} (offload: {load.offload}) ...",
        flush=True,
    )
    pipe, spec = load_pipeline(load)
    if compile:
        compile_blocks(pipe.transformer)
    s = opts.sampling
    print(
        f"capturing {s.num_steps} steps at {s.width}x{s.height}, seed {opts.seed} ...", flush=True
    )
    run_dir = capture_to_dir(
        pipe,
        spec,
        opts,
        out,
        run,
        copier=copier,
        extra_metadata={
            "offload": load.offload,
            "weights": load.weights,
            "compiled": bool(compile),
            "multi_gpu": load.multi_gpu,
            **({"device_map": dict(pipe.hf_device_map or {})} if load.multi_gpu else {}),
        },
    )
    print(f"run directory: {run_dir}")
