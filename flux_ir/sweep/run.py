"""A sweep's orchestration: claim the directory, share the points among processes, generate them in
batches, write the files behind the device, and finalise the tables.

    pipe, spec = load_pipeline("flux-tiny")
    cfg = SweepConfig.from_spec(spec, width=64, height=64, num_steps=2, grid=GridSpec(n_alpha=4, n_beta=4))
    result = run_sweep(pipe, cfg, "output/sweep", batch_size=8)

Re-running resumes: points whose image exists are skipped. The prompt is encoded once per sweep (only
when points are left); batches come from `flux_ir.sweep.generate`; PNG encoding (GIL-free,
`flux_ir.io.png`), the phase files and the points table are written by a `BackgroundWriter` while the
device computes the next batch.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from diffusers import FluxPipeline
from tqdm.auto import tqdm

from flux_ir.errors import InvalidArgumentError
from flux_ir.sampling import effective_guidance, encode_prompt
from flux_ir.sweep.config import SweepConfig
from flux_ir.sweep.generate import HostPixels, decode_steps, generate_batch, pool_steps
from flux_ir.sweep.grid import GridPoint
from flux_ir.sweep.paths import sweep_latents
from flux_ir.sweep.shard import Distributed
from flux_ir.sweep.store import SweepStore
from flux_ir.sweep.writer import BackgroundWriter
from flux_ir.version import library_versions


@dataclass(frozen=True)
class SweepRunOptions:
    """How a sweep runs (not what it generates): `batch_size` images per pipeline call;
    `phase_pool` (None: off) keeps each step's x0 latents average-pooled by that factor (it must
    divide the latent size); `phase_images` (None: off, needs `phase_pool`) also VAE-decodes each
    step's x0 into thumbnails of that many pixels (at least 8)."""

    cfg: SweepConfig
    batch_size: int = 8
    phase_pool: int | None = None
    phase_images: int | None = None

    def __post_init__(self) -> None:
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InvalidArgumentError(
                f"{{param}} must be a positive integer, got {b!r}", "batch_size"
            )
        pool = self.phase_pool
        if pool is not None:
            _, h, w = self.cfg.sampling.latent_shape
            if (
                isinstance(pool, bool)
                or not isinstance(pool, int)
                or pool < 1
                or h % pool
                or w % pool
            ):
                raise InvalidArgumentError(
                    f"{{param}} must be a positive integer dividing the latent size {h}x{w}, got {pool!r}",
                    "phase_pool",
                )
        size = self.phase_images
        if size is not None and (
            pool is None or isinstance(size, bool) or not isinstance(size, int) or size < 8
        ):
            raise InvalidArgumentError(
                f"{{param}} must be a thumbnail size >= 8 and needs phases kept (phase_pool), got {size!r}",
                "phase_images",
            )


@dataclass
class SweepResult:
    store: SweepStore
    generated: int  # points this process generated
    skipped: int  # points already done when the sweep started (all processes)
    seconds: float
    timings: dict = field(
        default_factory=dict
    )  # this process: encode_s, write_blocked_s, write_busy_s


def run_sweep(
    pipe: FluxPipeline,
    cfg: SweepConfig,
    out_dir,
    *,
    batch_size: int = 8,
    phase_pool: int | None = None,
    phase_images: int | None = None,
    dist: Distributed | None = None,
    progress: bool = True,
    extra_metadata: dict | None = None,
) -> SweepResult:
    """Generate every pending point of `cfg` into `out_dir`; resume if it holds the same sweep.

    Points are sharded over `dist`'s processes; each writes its images (atomically) and its part of the
    points table after every batch, so an interruption loses at most the batch in flight. Rank 0 merges
    `points.csv` and `metadata.json` once all processes are done. `phase_pool` (None: off) keeps the
    per-step x0 latents, average-pooled by that factor, in `phases/`; `phase_images` (None: off, needs
    `phase_pool`) also VAE-decodes every step's x0 and keeps it as a thumbnail of that many pixels.
    """
    SweepRunOptions(cfg, batch_size, phase_pool, phase_images)
    actual = str(pipe.transformer.dtype).removeprefix("torch.")
    if cfg.dtype is not None and cfg.dtype != actual:
        raise InvalidArgumentError(
            f"the sweep asks for dtype {cfg.dtype} but the pipeline runs in {actual}"
        )
    dist = dist or Distributed()
    store = SweepStore(out_dir)
    start = time.perf_counter()
    extra = sweep_metadata(pipe, cfg, batch_size, phase_pool, phase_images, dist, extra_metadata)
    store.check(cfg)  # every process: a different sweep stops them all before anything is written
    previous_pool = (store.read_metadata() or {}).get("phase_pool")
    if phase_pool is None:
        extra["phase_pool"] = previous_pool  # phases kept earlier stay described
    elif previous_pool not in (None, phase_pool):
        raise InvalidArgumentError(
            f"{store.root} keeps phases pooled by {previous_pool}; resume with {{param}} {previous_pool}",
            "phase_pool",
        )
    dist.barrier()
    if dist.is_main:
        store.claim(cfg, extra)
    dist.barrier()
    todo = store.pending(cfg.grid.points(), phases=phase_pool is not None)
    skipped = cfg.grid.n_alpha * cfg.grid.n_beta - len(todo)
    dist.barrier()  # all processes see the same pending list before any writes
    mine = dist.shard(todo)
    if phase_pool is not None:
        store.phases.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    if mine:
        timings = _generate(
            pipe, cfg, store, mine, batch_size, phase_pool, phase_images, dist, progress
        )
    dist.barrier()
    if dist.is_main:
        store.finalise(cfg, grid_norms(cfg), extra)
    dist.barrier()
    return SweepResult(store, len(mine), skipped, time.perf_counter() - start, timings)


def _generate(
    pipe: FluxPipeline,
    cfg: SweepConfig,
    store: SweepStore,
    points: Sequence[GridPoint],
    batch_size: int,
    phase_pool: int | None,
    phase_images: int | None,
    dist: Distributed,
    progress: bool,
) -> dict:
    """Generate `points` batch by batch; files are written on a background thread. Returns timings."""
    vertices = cfg.vertex_latents()
    t0 = time.perf_counter()
    cond = encode_prompt(pipe, cfg.sampling)
    encode_s = time.perf_counter() - t0
    bar = tqdm(
        total=len(points),
        unit="pt",
        desc=f"sweep {dist.rank}/{dist.world}" if dist.world > 1 else "sweep",
        disable=not progress,
        position=dist.rank,
        dynamic_ncols=True,
    )
    encoders = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))

    def write(batch, pixels: HostPixels, x0, thumbs, before, after) -> None:
        images = pixels.numpy()

        def save(k: int) -> None:
            for step, thumb in enumerate(thumbs[k] if thumbs is not None else []):
                store.save_phase_image(batch[k], step, thumb)
            if x0 is not None:
                store.save_phases(batch[k], x0[k].numpy())
            store.save_image(batch[k], images[k])  # last: an image marks the point done

        list(encoders.map(save, range(len(batch))))  # PNG compression runs without the GIL
        rows = [point_row(p, float(b), float(a)) for p, b, a in zip(batch, before, after)]
        store.append_points(rows, dist.rank)
        bar.update(len(batch))

    writer = BackgroundWriter(max_pending=2)
    with bar, encoders, writer:
        for lo in range(0, len(points), batch_size):
            batch = points[lo : lo + batch_size]
            z, before, after = sweep_latents(vertices, cfg.grid, batch)
            keep = phase_pool if phase_images is None else 1  # decoding needs the full x0
            pixels, x0 = generate_batch(pipe, cfg, cond, z, keep)
            thumbs = None
            if phase_images is not None:
                thumbs = decode_steps(pipe, cfg, x0, phase_images)
                x0 = pool_steps(x0, phase_pool)
            writer.submit(write, batch, pixels, x0, thumbs, before, after)
    return {
        "encode_s": encode_s,
        "write_blocked_s": writer.blocked_s,
        "write_busy_s": writer.busy_s,
    }


def point_row(point: GridPoint, norm_before: float, norm_after: float) -> dict:
    """One row of the points table."""
    return {
        "index": point.index,
        "row": point.row,
        "col": point.col,
        "alpha": point.alpha,
        "beta": point.beta,
        "norm_before": norm_before,
        "norm_after": norm_after,
        "file": f"images/{point.file}",
        "done": True,
    }


def grid_norms(cfg: SweepConfig, chunk: int = 256) -> dict[int, tuple[float, float]]:
    """Every point's latent norm before and after normalising (computed from the seeds, in chunks)."""
    vertices = cfg.vertex_latents()
    points = cfg.grid.points()
    norms: dict[int, tuple[float, float]] = {}
    for lo in range(0, len(points), chunk):
        part = points[lo : lo + chunk]
        _, before, after = sweep_latents(vertices, cfg.grid, part)
        norms.update({p.index: (float(b), float(a)) for p, b, a in zip(part, before, after)})
    return norms


def sweep_metadata(
    pipe: FluxPipeline,
    cfg: SweepConfig,
    batch_size: int,
    phase_pool: int | None,
    phase_images: int | None,
    dist: Distributed,
    extra: dict | None,
) -> dict:
    """Run facts recorded beside the settings (they may change when a sweep is resumed)."""
    return {
        "guidance_effective": effective_guidance(pipe, cfg.sampling.guidance),
        "true_cfg": cfg.sampling.true_cfg,
        "latent_shape": list(cfg.sampling.latent_shape),
        "batch_size": batch_size,
        "processes": dist.world,
        "phase_pool": phase_pool,
        "phase_images": phase_images,
        "device": str(pipe._execution_device),
        "pipeline_dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "versions": library_versions("numpy"),
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        **(extra or {}),
    }
