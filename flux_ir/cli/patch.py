"""`flux-ir patch`: activation patching between two prompts, written as a block x step causal map."""

from __future__ import annotations

from flux_ir.cli import flags, text


@flags(selection="--double_blocks")
def patch(
    source_prompt: str,
    model: str = "flux-toy",
    prompt: str | None = None,
    seed: int = 0,
    source_seed: int | None = None,
    width: int | None = None,
    height: int | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    double_blocks: str | int | tuple = "all",
    single_blocks: str | int | tuple = "all",
    steps: str | int | tuple = "all",
    stream: str = "img",
    span: str = "step",
    batch_size: int = 8,
    device: str | None = None,
    weights: str = "pretrained",
    output_dir: str = "output/patch",
    progress: bool = True,
) -> None:
    """Patch the target run (--prompt) with the source run's (--source_prompt) activations, one
    (block, step) site at a time, and write the causal map: causal_map.json / .csv, causal_map.png
    (heatmap) and causal_grid.png (the patched images) in --output_dir.

    Launch with `torchrun --nproc_per_node N --no-python flux-ir patch ...` (and --nnodes/--node_rank/
    --master_addr on each of several nodes) to share the batches of sites out over the processes, one
    GPU each; the first process writes the same files as a one-process run.

    Args:
        source_prompt: the prompt whose activations are patched in.
        model: flux-toy (default; its checker reads colour, shape and background of every patched
            image), flux-tiny, flux-schnell, flux-dev, flux-dev-krea, or a local FluxPipeline directory.
        prompt: the target prompt (default: the model's).
        seed: the target run's noise seed.
        source_seed: the source run's noise seed (default: the same as --seed).
        width: image width in pixels, a multiple of 16 (default: the model's).
        height: image height in pixels, a multiple of 16 (default: the model's).
        num_steps: denoising steps (default: the model's).
        guidance: distilled guidance scale (model default; ignored by schnell and flux-toy).
        double_blocks: double blocks to patch: "all", "none", or indices and ranges like "0-3".
        single_blocks: single blocks to patch, the same syntax ("-1": the last).
        steps: denoising steps to patch, the same syntax.
        stream: "img" (image tokens) or "txt" (text tokens) of each block.
        span: "step" (the site's step alone), "from" (its step and every later one) or "until"
            (every step up to its own).
        batch_size: patched runs per pipeline call (one site per batch element).
        device: cuda, cuda:N or cpu (default: cuda when available; under torchrun each process
            takes the GPU of its LOCAL_RANK).
        weights: "pretrained" or "random" (the architecture with random weights).
        output_dir: where the map's files are written.
        progress: show a progress bar over the sites.
    """
    from flux_ir.capture import CaptureOptions, Selection
    from flux_ir.io.dirs import check_output_dir
    from flux_ir.models import LoadOptions, load_pipeline
    from flux_ir.sweep.shard import Distributed
    from flux_ir.workflows.patching import PatchOptions, causal_map

    dist = Distributed.from_env()
    load = LoadOptions.create(model, dist.device(device), None, weights)
    sampling = dict(width=width, height=height, num_steps=num_steps, guidance=guidance)
    target = CaptureOptions.from_spec(load.spec, seed=seed, prompt=text(prompt), **sampling)
    source = CaptureOptions.from_spec(
        load.spec,
        seed=seed if source_seed is None else source_seed,
        prompt=text(source_prompt),
        **sampling,
    )
    selection = Selection.parse(double_blocks, single_blocks, steps)
    how = PatchOptions(stream, span, batch_size)
    out = check_output_dir(output_dir)
    classify = None
    if load.spec.name == "flux-toy":
        from flux_ir.toy.checker import check_images

        def classify(images):
            found = check_images(images)
            return {"colour": found.colour, "shape": found.shape, "background": found.background}

    dist.init(load.device)
    try:
        if dist.is_main:
            print(
                f"loading {load.spec.name} on {load.device} ({dist.world} process(es)) ...",
                flush=True,
            )
        pipe, _ = load_pipeline(load)
        cmap = causal_map(
            pipe,
            target,
            source,
            selection=selection,
            stream=how.stream,
            span=how.span,
            batch_size=how.batch_size,
            classify=classify,
            progress=bool(progress),
            dist=dist,
        )
        if dist.is_main:
            paths = cmap.save(out)
            print(repr(cmap))
            for name, path in paths.items():
                print(f"{name}: {path}")
    finally:
        dist.close()
