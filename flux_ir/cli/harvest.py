"""`flux-ir harvest`: many prompts and seeds captured into an activation dataset."""

from __future__ import annotations

from flux_ir.cli import flags, text


@flags(selection="--single_blocks")
def harvest(
    prompts: str,
    model: str = "flux-schnell",
    output_dir: str = "output/harvest",
    seeds=None,
    seeds_per_prompt: int = 1,
    first_seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    true_cfg_scale: float | None = None,
    scheduler: str | None = None,
    double_blocks: str | int | tuple = "none",
    single_blocks: str | int | tuple = "all",
    steps: str | int | tuple = "all",
    streams: str = "img",
    store_dtype: str | None = None,
    reduce: str | None = None,
    tokens_per_image: int | None = None,
    token_seed: int = 0,
    passes: str = "cond",
    batch_size: int = 8,
    shard_mb: float = 256.0,
    copy: str = "auto",
    offload: bool | str = False,
    device: str | None = None,
    weights: str = "pretrained",
    progress: bool = True,
) -> None:
    """Capture the chosen blocks over many prompts and seeds into an activation dataset: sharded
    safetensors and an index table in --output_dir.

    The expected size is printed before the model loads, and the harvest is refused when the disk
    cannot hold it. Re-running the same command resumes (finished shards are kept, a partial one is
    made again). Launch with `torchrun --nproc_per_node N --no-python flux-ir harvest ...` (and
    --nnodes/--node_rank/--master_addr on each of several nodes sharing the directory) to share the
    shards out over the processes, one GPU each.

    Args:
        prompts: a prompt file: .txt (one prompt a line), .csv (a prompt column; optional seed(s),
            width, height, num_steps, guidance, negative_prompt, true_cfg_scale, scheduler) or
            .yaml (a list of prompts or entries with those fields, or a mapping with prompts: and
            defaults, as in the sampling notes: sample_steps, guidance_scale, sampler).
        model: flux-schnell, flux-dev, flux-dev-krea (hub weights), flux-tiny (built in code,
            random weights), flux-toy (shipped in the package), or a local diffusers FluxPipeline
            directory.
        output_dir: the dataset directory (harvest.json, shards/, index/, index.csv).
        seeds: seeds for every prompt without its own, e.g. 0,1,2 (default: --seeds_per_prompt).
        seeds_per_prompt: seeds per prompt without its own: entry i gets first_seed + i * n ... +
            n - 1.
        first_seed: the first of those seeds.
        width, height: image size in pixels, multiples of 16, for entries that do not say
            (default: the model's, 256 for models without one).
        num_steps: denoising steps for entries that do not say (default: the model's).
        guidance: distilled guidance scale for entries that do not say (default: the model's;
            ignored by schnell and flux-toy).
        negative_prompt: negative prompt for entries that do not say (true CFG; default: the
            model's: none; flux-toy: "").
        true_cfg_scale: true CFG scale for entries that do not say (default: the model's: 1, off;
            flux-toy: 2).
        scheduler: euler, dpm++2m, dpm++3m or unipc for entries that do not say (default: euler,
            FLUX's own).
        double_blocks, single_blocks: blocks to keep: "all", "none", or indices and ranges like
            "0-5,18" (negative: from the end).
        steps: denoising steps to keep, the same syntax ("0,-1": first and last).
        streams: "img" (image tokens), "txt" (text tokens) or "both".
        store_dtype: float32, float16 or bfloat16 (default: the model's dtype).
        reduce: "mean" (over tokens) or "poolK" (K x K pooling of image tokens) before keeping
            (default: none, every token).
        tokens_per_image: keep this many random image tokens per image (the same positions at
            every step and block; default: all).
        token_seed: seed of the token subsampling.
        passes: "cond" (the conditional pass) or "both" (with true CFG also the unconditional).
        batch_size: images per pipeline call.
        shard_mb: MiB a shard grows to before the next one starts (in whole batches).
        copy: how activations reach host memory: auto (page-locked side-stream copies on CUDA,
            plain on the CPU), pinned, pageable or sync.
        offload: False, True or "model", "sequential" or "group" (diffusers CPU offload).
        device: cuda, cuda:N or cpu (default: cuda when available; under torchrun each process
            takes the GPU of its LOCAL_RANK).
        weights: "pretrained" or "random" (the exact architecture with random weights).
        progress: show a progress bar (images/s and ETA).
    """
    from flux_ir.capture import Selection
    from flux_ir.capture.copy import COPIERS
    from flux_ir.errors import InvalidArgumentError
    from flux_ir.io.atomic import human_bytes
    from flux_ir.io.dirs import check_output_dir
    from flux_ir.models import LoadOptions, load_pipeline
    from flux_ir.sweep.shard import Distributed
    from flux_ir.workflows.harvest import (
        HarvestOptions,
        check_disk,
        claim_directory,
        identity,
        model_architecture,
        plan_harvest,
        read_prompts,
        run_harvest,
    )

    dist = Distributed.from_env()
    load = LoadOptions.create(model, dist.device(device), offload, weights)
    spec = load.spec
    entries = read_prompts(
        prompts,
        spec,
        seeds=None if seeds is None else seeds,
        seeds_per_prompt=seeds_per_prompt,
        first_seed=first_seed,
        width=width,
        height=height,
        num_steps=num_steps,
        guidance=guidance,
        negative_prompt=text(negative_prompt),
        true_cfg_scale=true_cfg_scale,
        scheduler=scheduler,
    )
    selection = Selection.parse(double_blocks, single_blocks, steps, streams, store_dtype, reduce)
    opts = HarvestOptions(selection, tokens_per_image, token_seed, passes, batch_size, shard_mb)
    if copy not in ("auto", *COPIERS):
        raise InvalidArgumentError(
            f"{{param}} {copy!r}: choose one of auto, {', '.join(COPIERS)}", "copy"
        )
    out = check_output_dir(output_dir)
    name = spec.name if load.weights == "pretrained" else f"{spec.name} (random weights)"
    arch = model_architecture(spec)
    if arch is not None:  # the size before the model loads
        from flux_ir.store.dataset import committed_shards

        plan = plan_harvest(entries, opts, arch, load.dtype_name)
        claim = identity(plan, name, None)
        if (out / "harvest.json").is_file():
            claim_directory(out, plan, {**claim, **_their_fingerprint(out)}, {})
        done = set(committed_shards(out))
        if dist.is_main:
            print(f"harvest: {plan.describe(done)}", flush=True)
        left = sum(s.nbytes for s in plan.shards if s.index not in done)
        check_disk(out, left)
        if dist.is_main and left:
            print(f"to write: {human_bytes(left)} into {out}", flush=True)
    dist.init(load.device)
    try:
        if dist.is_main:
            print(
                f"loading {spec.name} ({load.weights_text}) on {load.device} "
                f"({dist.world} process(es)) ...",
                flush=True,
            )
        pipe, spec = load_pipeline(load)
        result = run_harvest(
            pipe,
            entries,
            out,
            opts,
            model_name=name,
            dist=dist,
            copier=copy,
            progress=progress,
            extra_metadata={"model_source": spec.source, "weights": load.weights},
        )
        if dist.is_main:
            print(repr(result))
            print(f"dataset directory: {result.root}")
    finally:
        dist.close()


def _their_fingerprint(out) -> dict:
    """The weights fingerprint a dataset records (compared once the model is loaded)."""
    from flux_ir.store.dataset import read_manifest

    return {"weights_fingerprint": read_manifest(out)["identity"].get("weights_fingerprint")}
