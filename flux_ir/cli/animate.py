"""`flux-ir animate`: GIF and MP4 movies of the denoising, from a capture run or a sweep."""

from __future__ import annotations

from flux_ir.cli import flags


@flags()
def animate(
    run_dir: str,
    fps: float = 4.0,
    double_blocks: str | int | tuple = "all",
    single_blocks: str | int | tuple = "all",
    points: str | int | tuple = "all",
    target: str = "x0",
    formats: str | tuple = "gif,mp4",
    size: int = 256,
    output_dir: str | None = None,
    model: str | None = None,
    device: str | None = None,
) -> None:
    """Write movies of the denoising: for a capture run, each block's lens decode over the steps;
    for a sweep, each point's x0 estimate over the steps. Every frame is labelled with its block (or
    the point's alpha and beta) and step.

    Args:
        run_dir: a capture run directory (`flux-ir capture`) or a sweep directory (`flux-ir sweep`;
            its points need step images: --phases --phase_images N).
        fps: frames (denoising steps) per second.
        double_blocks: double blocks to animate (a capture run): "all", "none", or indices and
            ranges like "0-3" (negative: from the end).
        single_blocks: single blocks to animate, the same syntax ("-1": the last).
        points: sweep points to animate by index ("all", or e.g. "0,4,8"; row-major, alpha rows).
        target: lens target of a capture run's movies: "x0" (the clean-image estimate) or "next"
            (one Euler step).
        formats: "gif,mp4", "gif" or "mp4".
        size: frame width in pixels (rounded up to a multiple of 16).
        output_dir: where the movies go (default: movies/ in RUN_DIR).
        model: the model that decodes lens images the run lacks (default: the one named in the
            run's metadata; loaded only when some are missing).
        device: cuda, cuda:N or cpu for that model (default: cuda when available).
    """
    from pathlib import Path

    from flux_ir.errors import InvalidArgumentError
    from flux_ir.workflows.movies import animate as make_movies
    from flux_ir.workflows.movies import check_movie_options
    from flux_ir.workflows.run_dirs import CaptureRun, run_kind

    formats = check_movie_options(fps, formats, size)
    kind = run_kind(run_dir)
    if kind is None:
        raise InvalidArgumentError(
            f"{{param}} {run_dir} is neither a capture run (flux-ir capture) nor a sweep "
            "directory (flux-ir sweep)",
            "run_dir",
        )
    pipe, name = None, None
    if kind == "capture" and _needs_model(run_dir, double_blocks, single_blocks, target):
        name = model or CaptureRun.open(run_dir).metadata.get("model")
    elif kind == "sweep" and _sweep_needs_model(run_dir, points):
        from flux_ir.analysis.sweep import open_sweep

        name = model or open_sweep(run_dir)[1].model.removesuffix(" (random weights)")
    if name is not None:
        from flux_ir.models import LoadOptions, load_pipeline

        load = LoadOptions.create(name, device)
        print(f"loading {load.spec.name} on {load.device} to decode the missing lens images ...")
        pipe, _ = load_pipeline(load)
    paths = make_movies(
        run_dir,
        output_dir,
        fps=fps,
        formats=formats,
        size=size,
        double_blocks=double_blocks,
        single_blocks=single_blocks,
        target=target,
        points=points,
        pipe=pipe,
        progress=True,
    )
    for path in paths:
        print(path)
    print(f"{len(paths)} movie(s) in {Path(paths[0]).parent}" if paths else "no movie written")


def _needs_model(run_dir, double_blocks, single_blocks, target) -> bool:
    """Whether any selected (block, step) lacks its lens decode on disk."""
    from flux_ir.lens import BlockStep
    from flux_ir.workflows.movies import selected_blocks
    from flux_ir.workflows.run_dirs import CaptureRun

    run = CaptureRun.open(run_dir)
    return any(
        not run.lens_file(BlockStep(kind, i, s), target).is_file()
        for kind, i in selected_blocks(run, double_blocks, single_blocks)
        for s in run.captured_steps
    )


def _sweep_needs_model(sweep_dir, points) -> bool:
    """Whether a selected point lacks step images but kept unpooled x0 latents to decode."""
    from flux_ir.analysis.sweep import open_sweep
    from flux_ir.capture.select import parse_indices, resolve
    from flux_ir.sweep.store import phase_image_file

    store, cfg, _ = open_sweep(sweep_dir)
    if (store.read_metadata() or {}).get("phase_pool") != 1:
        return False
    grid = cfg.grid.points()
    chosen = [grid[i] for i in resolve(parse_indices(points, "points"), len(grid), "points")]
    steps = range(cfg.sampling.num_steps)
    return any(not (store.phases / phase_image_file(p, k)).is_file() for p in chosen for k in steps)
