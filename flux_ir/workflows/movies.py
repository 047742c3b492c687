"""Movies of the denoising: each block's lens decode over the steps (a capture run), and a sweep
point's x0 estimate over the steps (a sweep that kept step images), as GIF and MP4.

    run_dir = capture_to_dir(pipe, spec, opts, "output")        # decodes every block (x0)
    paths = animate(run_dir, fps=2, single_blocks="-1", double_blocks="none")
    # output/<run>/movies/single_block_3_x0.gif, .mp4: one frame per captured step, labelled
    # animate(sweep_dir, points="0,4"): a sweep made with --phases --phase_images N

A capture run's frames are its lens decodes in `decoded/` (target x0) or `decoded_next/`; decodes
that are missing are made with `pipe` (and saved there), so a run captured without decoding, or a
target it did not decode, needs the model. A sweep's frames are its step thumbnails
(`phases/a000_b000_s00.png`, written with `--phases --phase_images N`); where a point has only its
pooled x0 latents, `pipe` decodes them when they were kept unpooled (`--phase_pool 1`). Each frame
carries its block (or the point's alpha and beta) and step; movies go to `<dir>/movies/` unless
`out_dir` says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from diffusers import FluxPipeline
from PIL import Image

from flux_ir.capture.select import parse_indices, resolve
from flux_ir.errors import InvalidArgumentError
from flux_ir.lens import TARGETS, BlockStep
from flux_ir.plots.frames import MOVIE_FORMATS, labelled_frame, write_movie
from flux_ir.sweep.grid import GridPoint
from flux_ir.sweep.store import phase_image_file
from flux_ir.workflows.run_dirs import CaptureRun, run_kind


def check_movie_options(fps: float, formats: Sequence[str], size: int) -> tuple[str, ...]:
    """Validate the common settings; returns the formats as a tuple."""
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps <= 60:
        raise InvalidArgumentError(f"{{param}} must be a number in (0, 60], got {fps!r}", "fps")
    if isinstance(formats, str):
        formats = [f for f in formats.replace(" ", "").split(",") if f]
    formats = tuple(formats)
    if not formats or any(f not in MOVIE_FORMATS for f in formats):
        raise InvalidArgumentError(
            f"{{param}} must be gif, mp4 or gif,mp4, got {','.join(formats) or 'nothing'}",
            "formats",
        )
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 4096:
        raise InvalidArgumentError(
            f"{{param}} must be an integer number of pixels in [16, 4096], got {size!r}", "size"
        )
    return formats


def animate(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    fps: float = 4.0,
    formats: Sequence[str] = MOVIE_FORMATS,
    size: int = 256,
    double_blocks="all",
    single_blocks="all",
    target: str = "x0",
    points="all",
    pipe: FluxPipeline | None = None,
    progress: bool = False,
) -> list[Path]:
    """Movies of a capture run (one per selected block) or of a sweep (one per selected point);
    returns the files written. `double_blocks`, `single_blocks` and `points` take "all", "none",
    or indices and ranges like "0-3,7" (points by their index in the sweep)."""
    kind = run_kind(run_dir)
    if kind == "capture":
        return animate_capture(
            run_dir,
            out_dir,
            fps=fps,
            formats=formats,
            size=size,
            double_blocks=double_blocks,
            single_blocks=single_blocks,
            target=target,
            pipe=pipe,
            progress=progress,
        )
    if kind == "sweep":
        return animate_sweep(
            run_dir, out_dir, fps=fps, formats=formats, size=size, points=points, pipe=pipe
        )
    raise InvalidArgumentError(
        f"{{param}} {run_dir} is neither a capture run (flux-ir capture) nor a sweep directory "
        "(flux-ir sweep)",
        "run_dir",
    )


def selected_blocks(run: CaptureRun, double_blocks="all", single_blocks="all") -> list:
    """[(kind, index)] of the captured blocks that the selection names, in depth order."""
    md = run.metadata
    captured = run.block_indices
    out = []
    for kind, spec in (("double", double_blocks), ("single", single_blocks)):
        name = f"{kind}_blocks"
        n = int(md.get(f"num_{kind}_blocks", len(captured[kind])))
        wanted = parse_indices(spec, name)
        chosen = captured[kind] if wanted is None else resolve(wanted, n, name)
        missing = [i for i in chosen if i not in captured[kind]]
        if missing:
            raise InvalidArgumentError(
                f"{{param}}: {kind} block(s) {', '.join(map(str, missing))} were not captured "
                f"(captured: {', '.join(map(str, captured[kind])) or 'none'})",
                name,
            )
        out += [(kind, i) for i in chosen]
    if not out:
        raise InvalidArgumentError("no block selected; choose some with {param}", "single_blocks")
    return out


def animate_capture(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    fps: float = 4.0,
    formats: Sequence[str] = MOVIE_FORMATS,
    size: int = 256,
    double_blocks="all",
    single_blocks="all",
    target: str = "x0",
    pipe: FluxPipeline | None = None,
    progress: bool = False,
) -> list[Path]:
    """One movie per selected block: its lens decode (`target` x0 or next) at every captured step."""
    formats = check_movie_options(fps, formats, size)
    if target not in TARGETS:
        raise InvalidArgumentError(
            f"{{param}} {target!r} is unknown; choose one of {', '.join(TARGETS)}.", "target"
        )
    run = CaptureRun.open(run_dir)
    blocks = selected_blocks(run, double_blocks, single_blocks)
    steps = run.captured_steps
    items = [BlockStep(kind, i, s) for kind, i in blocks for s in steps]
    missing = [it for it in items if not run.lens_file(it, target).is_file()]
    if missing:
        if pipe is None:
            raise InvalidArgumentError(
                f"{len(missing)} lens decode(s) ({target}) are missing in {run.decoded_dir(target)}; "
                "pass the model that made the capture to decode them",
                "model",
            )
        from flux_ir.workflows.metrics_run import decode_missing

        decode_missing(run, pipe, missing, target, progress=progress)
    out = Path(out_dir) if out_dir is not None else run.root / "movies"
    n = int(run.metadata.get("num_steps", len(steps)))
    paths = []
    for kind, i in blocks:
        frames = []
        for s in steps:
            with Image.open(run.lens_file(BlockStep(kind, i, s), target)) as im:
                caption = f"{kind} block {i} | step {s}/{n - 1} | lens {target}"
                frames.append(labelled_frame(im, caption, size))
        for fmt in formats:
            paths.append(write_movie(out / f"{kind}_block_{i}_{target}.{fmt}", frames, fps))
    return paths


def animate_sweep(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    fps: float = 4.0,
    formats: Sequence[str] = MOVIE_FORMATS,
    size: int = 256,
    points="all",
    pipe: FluxPipeline | None = None,
) -> list[Path]:
    """One movie per selected point: its x0 estimate at every denoising step."""
    from flux_ir.analysis.sweep import open_sweep

    formats = check_movie_options(fps, formats, size)
    store, cfg, _ = open_sweep(sweep_dir)
    grid_points = cfg.grid.points()
    wanted = parse_indices(points, "points")
    chosen = [grid_points[i] for i in resolve(wanted, len(grid_points), "points")]
    steps = cfg.sampling.num_steps
    out = Path(out_dir) if out_dir is not None else store.root / "movies"
    paths = []
    for p in chosen:
        frames = [
            labelled_frame(im, f"a={p.alpha:.4g} b={p.beta:.4g} | step {k}/{steps - 1} | x0", size)
            for k, im in enumerate(point_steps(store, cfg, p, pipe))
        ]
        stem = Path(p.file).stem
        for fmt in formats:
            paths.append(write_movie(out / f"{stem}_x0.{fmt}", frames, fps))
    return paths


def point_steps(store, cfg, point: GridPoint, pipe: FluxPipeline | None = None) -> list:
    """A sweep point's x0 estimate at every step, as PIL images: its step thumbnails, else its
    kept x0 latents decoded with `pipe` (only when kept unpooled)."""
    steps = cfg.sampling.num_steps
    files = [store.phases / phase_image_file(point, k) for k in range(steps)]
    if all(f.is_file() for f in files):
        images = []
        for f in files:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        return images
    latents = store.phases / Path(point.file).with_suffix(".npy").name
    meta = store.read_metadata() or {}
    if not latents.is_file() or meta.get("phase_pool") != 1 or pipe is None:
        raise InvalidArgumentError(
            f"{{param}}: point {point.index} ({point.file}) has no step images in {store.phases}; "
            "sweep with --phases --phase_images N (or --phases --phase_pool 1 and pass the model)",
            "points",
        )
    import torch

    from flux_ir.geometry import pack_latents
    from flux_ir.lens.decode import decode_packed

    x0 = torch.from_numpy(store.load_phases(point).astype(np.float32))  # [steps, C, h, w]
    s = cfg.sampling
    packed = pack_latents(x0).to(pipe._execution_device, pipe.transformer.dtype)
    return decode_packed(pipe, packed, s.height, s.width)
