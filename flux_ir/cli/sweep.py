"""`flux-ir sweep` / `grid_sweep.py` and `flux-ir analyze`: latent-grid sweeps and their analysis."""

from __future__ import annotations

from flux_ir.cli import flags, text
from flux_ir.errors import InvalidArgumentError


@flags(inversion_refine="--refine", direction_prompts="--direction_from/--direction_to")
def sweep(
    model: str = "flux-schnell",
    output_dir: str = "output/sweep",
    preset: str | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    true_cfg_scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    seeds=None,
    vertices: str | None = None,
    vertex_images=None,
    direction_from: str | None = None,
    direction_to: str | None = None,
    refine: int = 0,
    alpha="0,1",
    beta=None,
    n_alpha: int | None = None,
    n_beta: int | None = None,
    normalisation: str = "annulus",
    path: str | None = None,
    points: int | None = None,
    noise_level: float = 0.0,
    repeats: int = 1,
    noise_seed: int = 0,
    batch_size: int = 8,
    phases: bool = False,
    phase_pool: int = 4,
    phase_images: int = 0,
    offload: bool | str = False,
    device: str | None = None,
    weights: str = "pretrained",
    progress: bool = True,
    compile: bool | str = False,
    scheduler: str = "euler",
) -> None:
    """Generate a latent-grid sweep (or a 1-D latent path) of images into --output_dir.

    The grid is n_alpha x n_beta latents z0 + a(z1 - z0) + b(z2 - z0), normalised; with --path
    lerp|slerp --points N, a path of N latents from z0 to z1 instead; with --path direction, N
    latents from z0 along z2 - z1, --alpha in units of the annulus radius sqrt(d). The vertices are
    seeded noise, a file of latents, or real images inverted to the noise the sweep's sampling
    regenerates them from (--vertex_images). Re-running the same command resumes (finished points
    are skipped); a different sweep in the same directory is refused. Launch with `torchrun
    --nproc_per_node N` to shard the points over N GPUs.

    Args:
        model: flux-schnell, flux-dev, flux-dev-krea (hub weights), flux-tiny (built in code,
            random weights), flux-toy (shipped in the package), or a local diffusers FluxPipeline
            directory.
        output_dir: the sweep directory (images/, metadata.json, points.csv).
        preset: "hessian-paper": the paper's prompt, negative prompt and true CFG scale 5
            (default: none).
        prompt: the text prompt; overrides the preset's (default: the paper's "High quality
            picture, 4k, detailed").
        negative_prompt: the prompt that true classifier-free guidance steers away from; overrides
            the preset's (default: the preset's, else the model's: none; flux-toy: "").
        true_cfg_scale: true classifier-free guidance scale; above 1 with a negative prompt, each
            step runs two passes; overrides the preset's (default: the preset's, else the model's:
            1.0, off; flux-toy: 2.0).
        width, height: pixels, multiples of 16 (default 512; flux-toy: 128).
        num_steps: denoising steps (model default: 4 for schnell and flux-tiny, 16 for flux-toy,
            50 for dev and krea).
        guidance: distilled guidance scale (model default: 3.5 for dev and flux-tiny, 4.5 for
            krea; ignored by schnell and flux-toy).
        seeds: three seeds for the vertex latents z0, z1, z2 (default 0,123,200); two for a path
            (default 0,123).
        vertices: instead of seeds, a .npy or .safetensors file of the vertex latents [3, 16, H/8, W/8]
            ([2, 16, H/8, W/8] for a path); its sha256 is part of the sweep (default: none, the
            seeds make the vertices).
        vertex_images: instead of seeds, image files "a.png,b.png,c.png" (two for a lerp or slerp
            path; one, the start, with --direction_from/--direction_to) of exactly --width x
            --height pixels (other sizes are refused, not resized), inverted with the sweep's
            prompt and sampling; their sha256 are part of the sweep (default: none).
        direction_from, direction_to: with --path direction, two prompts that make the direction:
            both are rendered from the start latent z0 and inverted, the direction is the second
            minus the first (default: none, the direction is z2 - z1).
        refine: fixed-point passes per inversion step for --vertex_images and direction prompts
            (0: one model pass per step, the cost of sampling).
        alpha: the interval "start,end" of a (both ends are grid points); zoom in with a
            sub-interval such as 0.4,0.6, leave [0, 1] with e.g. -10,10. For a path, the
            interval of t (0,1: z0 to z1).
        beta: the interval "start,end" of b, as --alpha (default 0,1; a path has no b axis).
        n_alpha: points along a (default 10; a path takes --points instead).
        n_beta: points along b (default: --n_alpha).
        normalisation: annulus (norm sqrt(d)), std (z / z.std()), vertex (mean vertex norm), none.
        path: lerp (straight line, then normalised) or slerp (great-circle arc, norms interpolated
            linearly, then normalised) between z0 and z1, or direction (from z0 along z2 - z1,
            steps --alpha in annulus radii, then normalised), instead of a grid (default: none, a
            grid).
        points: points on the path (default 10, at least 2); images a000_b000.png, a001_b000.png, ...
        noise_level: standard deviation of the Gaussian noise added to every point before it is
            normalised, seeded per point (the Hessian-geometry paper's --noise_level).
        repeats: samples per grid point, each with its own noise (needs --noise_level > 0); images
            a000_b000_r00.png, a000_b000_r01.png, ...
        noise_seed: seeds the per-point noise.
        batch_size: images per pipeline call.
        phases: keep every step's x0 latent per point (for per-step phase maps in `analyze`).
        phase_pool: average-pooling factor of the kept x0 latents (must divide H/8 and W/8).
        phase_images: with --phases, also VAE-decode every step's x0 into thumbnails of this many
            pixels (0: off; costs one VAE decode per step and point), embedded by `analyze`.
        offload: False, True or "model" (diffusers model CPU offload), "sequential" or "group"
            (diffusers group offloading, one block at a time, prefetched on a CUDA stream).
        device: cuda, cuda:N or cpu (default: cuda when available; under torchrun each process
            takes the GPU of its LOCAL_RANK).
        weights: "pretrained" or "random" (the exact architecture with random weights, no
            download).
        progress: show a progress bar (points/s and ETA).
        compile: torch.compile the transformer blocks and the VAE decoder (bare --compile:
            "default"; or a mode: "max-autotune-no-cudagraphs", "reduce-overhead"); the first
            batch pays the compilation, images differ from eager ones by float rounding.
        scheduler: euler (FLUX's flow-matching Euler), dpm++2m, dpm++3m or unipc, on FLUX's noise
            levels; part of the sweep (with another than euler, the phases hold the x0 each step
            implies: for multistep solvers, their combined estimate).
    """
    from flux_ir.io.dirs import check_output_dir
    from flux_ir.models import LoadOptions, load_pipeline
    from flux_ir.sweep.config import SweepConfig
    from flux_ir.sweep.run import SweepRunOptions, run_sweep
    from flux_ir.sweep.shard import Distributed
    from flux_ir.sweep.store import SweepStore

    dist = Distributed.from_env()
    grid = grid_spec(
        alpha, beta, n_alpha, n_beta, normalisation, path, points, noise_level, repeats, noise_seed
    )
    prompts = None
    if direction_from is not None or direction_to is not None:
        if direction_from is None or direction_to is None:
            raise InvalidArgumentError("--direction_from and --direction_to go together")
        prompts = (text(direction_from), text(direction_to))
    load = LoadOptions.create(model, dist.device(device), offload, weights)
    spec = load.spec
    cfg = SweepConfig.from_spec(
        spec,
        preset=preset,
        model=spec.name if load.weights == "pretrained" else f"{spec.name} (random weights)",
        grid=grid,
        seeds=seeds,
        vertices=vertices,
        vertex_images=vertex_images,
        direction_prompts=prompts,
        inversion_refine=refine,
        dtype=load.dtype_name,
        prompt=text(prompt),
        negative_prompt=text(negative_prompt),
        true_cfg_scale=true_cfg_scale,
        width=width,
        height=height,
        num_steps=num_steps,
        guidance=guidance,
        scheduler=scheduler,
    )
    if phase_images and not phases:
        raise InvalidArgumentError("{param} needs --phases", "phase_images")
    run = SweepRunOptions(
        cfg, batch_size, phase_pool if phases else None, phase_images or None, compile or None
    )
    SweepStore(output_dir).check(cfg)  # a different sweep is refused before the model loads
    check_output_dir(output_dir)

    dist.init(load.device)
    try:
        if dist.is_main:
            n = cfg.grid.n_points
            print(
                f"loading {spec.name} ({load.weights_text}) on {load.device} for a {n}-point sweep "
                f"({dist.world} process(es)) ...",
                flush=True,
            )
        pipe, spec = load_pipeline(load)
        result = run_sweep(
            pipe,
            cfg,
            output_dir,
            batch_size=run.batch_size,
            phase_pool=run.phase_pool,
            phase_images=run.phase_images,
            dist=dist,
            progress=progress,
            compile=run.compile,
            extra_metadata={
                "model_source": spec.source,
                "offload": load.offload,
                "weights": load.weights,
            },
        )
        if dist.is_main:
            print(
                f"{result.skipped} point(s) already done; generated {result.generated} here "
                f"in {result.seconds:.1f} s"
            )
            print(f"sweep directory: {result.store.root}")
    finally:
        dist.close()


def grid_spec(
    alpha,
    beta,
    n_alpha,
    n_beta,
    normalisation,
    path,
    points,
    noise_level=0.0,
    repeats=1,
    noise_seed=0,
):
    """The grid (or, with `path`, the 1-D path) of the command line; conflicting flags are refused."""
    from flux_ir.sweep.grid import GridSpec

    noise = dict(noise_level=noise_level, repeats=repeats, noise_seed=noise_seed)
    if path is None:
        if points is not None:
            raise InvalidArgumentError(
                "--points needs --path lerp|slerp|direction; a grid takes --n_alpha and --n_beta"
            )
        n_alpha = 10 if n_alpha is None else n_alpha
        return GridSpec(
            alpha=alpha,
            beta="0,1" if beta is None else beta,
            n_alpha=n_alpha,
            n_beta=n_alpha if n_beta is None else n_beta,
            normalisation=normalisation,
            **noise,
        )
    if n_alpha is not None or n_beta is not None:
        raise InvalidArgumentError(
            f"a path takes --points N, not --n_alpha/--n_beta (e.g. --path {path} --points 10)"
        )
    if beta is not None:
        raise InvalidArgumentError("a path has no beta axis; --alpha sets the interval of t")
    n = 10 if points is None else points
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InvalidArgumentError(f"--points must be an integer >= 2, got {points!r}")
    return GridSpec(
        alpha=alpha, n_alpha=n, n_beta=1, normalisation=normalisation, path=path, **noise
    )


@flags()
def analyze(
    sweep_dir: str,
    embedder: str = "clip",
    clip_model: str = "openai/clip-vit-large-patch14",
    device: str | None = None,
    phases: bool = True,
    cell: int = 64,
) -> None:
    """Embed a sweep's images, compute the Lipschitz field (and per-step phase maps), draw the plots.

    Args:
        sweep_dir: a directory written by `flux-ir sweep`.
        embedder: clip (transformers CLIP vision, --clip_model), clip-tiny (random miniature), or
            pixel (the image resized to 32x32; no weights).
        clip_model: hub id or local directory of a CLIP model.
        device: where CLIP runs: cuda, cuda:N or cpu (default: cuda when available).
        phases: also compute the per-step phase maps when the sweep kept them (--phases).
        cell: thumbnail size in the mosaic, pixels.
    """
    from flux_ir.analysis.embed import check_embedder, make_embedder
    from flux_ir.analysis.sweep import analyze_sweep, open_sweep
    from flux_ir.models.loading import check_device
    from flux_ir.plots.sweep import plot_sweep

    check_embedder(embedder)
    if not isinstance(cell, int) or cell < 4:
        raise InvalidArgumentError(f"{{param}} must be an integer >= 4, got {cell!r}", "cell")
    open_sweep(sweep_dir)  # not a sweep: fail before loading CLIP
    device = check_device(device)
    emb = make_embedder(embedder, clip_model=clip_model, device=device)
    result = analyze_sweep(sweep_dir, emb, phases=phases)
    _, _, rows = open_sweep(sweep_dir)
    paths = plot_sweep(sweep_dir, rows, result, cell=cell)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"analysis directory: {result.out_dir}")
