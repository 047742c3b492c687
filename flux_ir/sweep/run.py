"""A sweep's orchestration: claim the directory, share the points among processes, generate them in
batches, write the files behind the device, and finalise the tables.

    pipe, spec = load_pipeline("flux-tiny")
    cfg = SweepConfig.from_spec(spec, width=64, height=64, num_steps=2, grid=GridSpec(n_alpha=4, n_beta=4))
    result = run_sweep(pipe, cfg, "output/sweep", batch_size=8)

Re-running resumes: points whose image (and promised phase files) exist are skipped, with the same
settings, weights (fingerprint) and phases only. Vertices from images or prompts are inverted once
(`sweep_vertices`) and kept in the directory's `vertices.safetensors`, which later runs read. Each point is claimed before it is generated
(`flux_ir.sweep.store.PointClaims`), so two runs started on one directory share the work. The prompt
is encoded once per sweep (only when points are left); batches come from `flux_ir.sweep.generate`;
PNG encoding (GIL-free, `flux_ir.io.png`), the phase files and the points table are written by a
`BackgroundWriter` while the device computes the next batch.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from flux_ir.errors import InvalidArgumentError
from flux_ir.inversion import invert_renders, invert_to_vertices
from flux_ir.io.atomic import atomic_path
from flux_ir.models.compile import check_compile_mode, compile_pipeline
from flux_ir.models.fingerprint import weights_fingerprint
from flux_ir.sampling import effective_guidance, encode_prompt
from flux_ir.sweep.config import SweepConfig
from flux_ir.sweep.generate import HostPixels, decode_steps, generate_batch, pool_steps
from flux_ir.sweep.grid import GridPoint, vertex_latents
from flux_ir.sweep.paths import sweep_latents
from flux_ir.sweep.shard import Distributed
from flux_ir.sweep.store import (
    BUSY,
    CLAIMED,
    ELSEWHERE,
    FINGERPRINT,
    PointClaims,
    SweepStore,
)
from flux_ir.sweep.writer import BackgroundWriter
from flux_ir.version import library_versions

WAIT_S = 0.5  # between looks at points another process on this host is generating
VERTICES = "vertices.safetensors"  # inverted vertex latents of image / prompt vertices


@dataclass(frozen=True)
class SweepRunOptions:
    """How a sweep runs (not what it generates): `batch_size` images per pipeline call;
    `phase_pool` (None: off) keeps each step's x0 latents average-pooled by that factor (it must
    divide the latent size); `phase_images` (None: off, needs `phase_pool`) also VAE-decodes each
    step's x0 into thumbnails of that many pixels (at least 8); `compile` (None: off) is a
    torch.compile mode for the transformer blocks and the VAE decoder
    (`flux_ir.models.compile.compile_pipeline`)."""

    cfg: SweepConfig
    batch_size: int = 8
    phase_pool: int | None = None
    phase_images: int | None = None
    compile: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "compile", check_compile_mode(self.compile))
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
    generated: int  # points this process generated (and wrote)
    skipped: int  # points already done when the sweep started (all processes)
    seconds: float
    timings: dict = field(
        default_factory=dict
    )  # this process: encode_s, write_blocked_s, write_busy_s

    def __repr__(self) -> str:
        return (
            f"SweepResult({self.store.root}: {self.generated} point(s) generated here, "
            f"{self.skipped} already done, {self.seconds:.1f} s)"
        )


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
    compile: str | None = None,
) -> SweepResult:
    """Generate every pending point of `cfg` into `out_dir`; resume if it holds the same sweep.

    Points are sharded over `dist`'s processes; each writes its images (atomically) and its part of the
    points table after every batch, so an interruption loses at most the batch in flight. Rank 0 merges
    `points.csv` and `metadata.json` once all processes are done. `phase_pool` (None: off) keeps the
    per-step x0 latents, average-pooled by that factor, in `phases/`; `phase_images` (None: off, needs
    `phase_pool`) also VAE-decodes every step's x0 and keeps it as a thumbnail of that many pixels.

    The directory records the weights' fingerprint (`weights_fingerprint`) and the phases asked for:
    a resume with other weights, or without the phases promised, is refused. A process claims each
    point before generating it, so independent runs on one directory share the points (one waits
    for the points another is generating); on Ctrl-C the finished batches are written, a line says
    so on stderr, and KeyboardInterrupt is raised again.

    `compile` ("default", "max-autotune-no-cudagraphs", "reduce-overhead"; None: eager) compiles the
    transformer blocks and the VAE decoder with torch.compile before the first batch (compilation
    happens in that batch; a pipeline compiled already is used as it is). Images then differ from
    eager ones by float rounding (within one pixel level almost everywhere: the compiled sweep
    benchmark reports the share).
    """
    compile = SweepRunOptions(cfg, batch_size, phase_pool, phase_images, compile).compile
    actual = str(pipe.transformer.dtype).removeprefix("torch.")
    if cfg.dtype is not None and cfg.dtype != actual:
        raise InvalidArgumentError(
            f"the sweep asks for dtype {cfg.dtype} but the pipeline runs in {actual}"
        )
    dist = dist or Distributed()
    store = SweepStore(out_dir)
    start = time.perf_counter()
    fingerprint = weights_fingerprint(pipe)
    extra = sweep_metadata(pipe, cfg, batch_size, phase_pool, phase_images, dist, extra_metadata)
    extra[FINGERPRINT] = fingerprint
    extra["compile"] = compile
    # every process: a different sweep, other weights or dropped phases stop them all before any write
    store.check(cfg, fingerprint)
    check_phases(store, phase_pool, phase_images)
    dist.barrier()
    if dist.is_main:
        store.claim(cfg, extra)
        promise = {FINGERPRINT: fingerprint, "phase_pool": phase_pool, "phase_images": phase_images}
        store.record_identity(**promise)  # a directory that records none yet: from now on
        vertices = sweep_vertices(pipe, cfg, store, progress=progress)  # inverts once, if need be
    dist.barrier()
    if not dist.is_main:
        vertices = sweep_vertices(pipe, cfg, store, progress=progress)  # reads rank 0's file
    outputs = promised_outputs(cfg, phase_pool, phase_images)
    todo = store.pending(cfg.grid.points(), **outputs)
    skipped = cfg.grid.n_points - len(todo)
    dist.barrier()  # all processes see the same pending list before any writes
    mine = dist.shard(todo)
    if phase_pool is not None:
        store.phases.mkdir(parents=True, exist_ok=True)
    if compile is not None and mine:
        compile_pipeline(pipe, compile)
    timings: dict = {}
    counts = {"written": 0}
    if mine:
        try:
            timings = _generate(
                pipe,
                cfg,
                vertices,
                store,
                mine,
                batch_size,
                phase_pool,
                phase_images,
                dist,
                progress,
                counts,
            )
        except KeyboardInterrupt:  # the writer has flushed the finished batches by now
            print(
                f"interrupted: {counts['written']} points written, re-run the same command to resume",
                file=sys.stderr,
                flush=True,
            )
            raise
    dist.barrier()
    if dist.is_main:
        store.finalise(cfg, grid_norms(cfg, vertices), extra)
    dist.barrier()
    return SweepResult(store, counts["written"], skipped, time.perf_counter() - start, timings)


def check_phases(store: SweepStore, phase_pool: int | None, phase_images: int | None) -> None:
    """Refuse a resume that drops or changes the per-step phases the directory promises (they would
    stay missing, or mix two poolings or thumbnail sizes); phases asked for anew are fine (the points
    lacking them are generated again)."""
    meta = store.read_metadata() or {}
    pool, size = meta.get("phase_pool"), meta.get("phase_images")
    if pool is not None and phase_pool is None:
        what = f"pooled by {pool}" + (f", with {size}-px step images" if size else "")
        flags = f"--phases --phase_pool {pool}" + (f" --phase_images {size}" if size else "")
        python = f"phase_pool={pool}" + (f", phase_images={size}" if size else "")
        raise InvalidArgumentError(
            f"{store.root} promises per-step phases ({what}); resume with them so that they are "
            f"completed: pass {flags} (from Python: {python}), or choose another output directory",
            "phase_pool",
        )
    if pool is not None and phase_pool != pool:
        raise InvalidArgumentError(
            f"{store.root} keeps phases pooled by {pool}; resume with {{param}} {pool}",
            "phase_pool",
        )
    if size is not None and phase_images != size:
        raise InvalidArgumentError(
            f"{store.root} keeps {size}-px step images of its phases; resume with {{param}} {size}",
            "phase_images",
        )


def promised_outputs(cfg: SweepConfig, phase_pool: int | None, phase_images: int | None) -> dict:
    """What a point needs to be done (keywords of `SweepStore.pending`)."""
    return {
        "phases": phase_pool is not None,
        "thumbnails": cfg.sampling.num_steps if phase_images is not None else 0,
    }


def _generate(
    pipe: FluxPipeline,
    cfg: SweepConfig,
    vertices: torch.Tensor,
    store: SweepStore,
    points: Sequence[GridPoint],
    batch_size: int,
    phase_pool: int | None,
    phase_images: int | None,
    dist: Distributed,
    progress: bool,
    counts: dict,
) -> dict:
    """Generate `points` batch by batch, each point once claimed (points another process holds are
    skipped, and retried until done when that process runs on this host); files are written on a
    background thread, `counts["written"]` counts the points written. Returns timings."""
    outputs = promised_outputs(cfg, phase_pool, phase_images)
    cond, encode_s = None, 0.0
    bar = tqdm(
        total=len(points),
        unit="pt",
        desc=f"sweep {dist.rank}/{dist.world}" if dist.world > 1 else "sweep",
        disable=not progress,
        position=dist.rank,
        dynamic_ncols=True,
    )
    encoders = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    claims = PointClaims(store, dist.rank)

    def done(point: GridPoint) -> bool:
        return store.has_outputs(point, **outputs)

    def write(batch, pixels: HostPixels, x0, thumbs, before, after) -> None:
        images = pixels.numpy()

        def save(k: int) -> None:
            for step, thumb in enumerate(thumbs[k] if thumbs is not None else []):
                store.save_phase_image(batch[k], step, thumb)
            if x0 is not None:
                store.save_phases(batch[k], x0[k].numpy())
            store.save_image(batch[k], images[k])  # last: an image marks the point done
            claims.release(batch[k])

        list(encoders.map(save, range(len(batch))))  # PNG compression runs without the GIL
        rows = [point_row(p, float(b), float(a)) for p, b, a in zip(batch, before, after)]
        store.append_points(rows, dist.rank)
        counts["written"] += len(batch)
        bar.update(len(batch))

    writer = BackgroundWriter(max_pending=2)
    queue, waiting, elsewhere = deque(points), [], {}
    told = False
    with (
        claims,
        bar,
        encoders,
        writer,
    ):  # leaving: the writer flushes, then claims left are released
        while queue or waiting:
            batch = []
            while queue and len(batch) < batch_size:
                point = queue.popleft()
                status = claims.acquire(point, done)
                if status == CLAIMED:
                    batch.append(point)
                elif status == BUSY:
                    waiting.append(point)
                elif status == ELSEWHERE:
                    elsewhere[point.index] = claims.holders.get(point.index, {})
                else:  # DONE by another process
                    bar.update(1)
            if not batch:  # what is left is being generated by other processes on this host
                if not told:
                    pids = sorted(
                        {claims.holders.get(p.index, {}).get("pid") for p in waiting}, key=str
                    )
                    print(
                        f"waiting for {len(waiting)} point(s) that another process on this host "
                        f"(pid {', '.join(map(str, pids))}) is generating into {store.root} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    told = True
                time.sleep(WAIT_S)
                queue.extend(waiting)
                waiting.clear()
                continue
            if cond is None:  # once per sweep, and only when there is a point to generate
                t0 = time.perf_counter()
                cond = encode_prompt(pipe, cfg.sampling)
                encode_s = time.perf_counter() - t0
            z, before, after = sweep_latents(vertices, cfg.grid, batch)
            keep = phase_pool if phase_images is None else 1  # decoding needs the full x0
            pixels, x0 = generate_batch(pipe, cfg, cond, z, keep)
            thumbs = None
            if phase_images is not None:
                thumbs = decode_steps(pipe, cfg, x0, phase_images)
                x0 = pool_steps(x0, phase_pool)
            writer.submit(write, batch, pixels, x0, thumbs, before, after)
    if elsewhere:
        hosts = sorted({str(owner.get("host", "?")) for owner in elsewhere.values()})
        print(
            f"{len(elsewhere)} point(s) were left to processes on other hosts that claim them "
            f"({', '.join(hosts)}); re-run when those finish, or delete their claims in "
            f"{store.claims} if they are gone",
            file=sys.stderr,
            flush=True,
        )
    return {
        "encode_s": encode_s,
        "write_blocked_s": writer.blocked_s,
        "write_busy_s": writer.busy_s,
    }


def point_row(point: GridPoint, norm_before: float, norm_after: float) -> dict:
    """One row of the points table (with a `repeat` column in a sweep with repeats)."""
    row = {
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
    if point.repeat is not None:
        row["repeat"] = point.repeat
    return row


def grid_norms(
    cfg: SweepConfig, vertices: torch.Tensor | None = None, chunk: int = 256
) -> dict[int, tuple[float, float]]:
    """Every point's latent norm before and after normalising, in chunks (from `vertices`
    [n, 16, h, w]; None: `cfg.vertex_latents()`, the seeds' or the vertices file's)."""
    vertices = cfg.vertex_latents() if vertices is None else vertices
    points = cfg.grid.points()
    norms: dict[int, tuple[float, float]] = {}
    for lo in range(0, len(points), chunk):
        part = points[lo : lo + chunk]
        _, before, after = sweep_latents(vertices, cfg.grid, part)
        norms.update({p.index: (float(b), float(a)) for p, b, a in zip(part, before, after)})
    return norms


def sweep_vertices(
    pipe: FluxPipeline, cfg: SweepConfig, store: SweepStore, *, progress: bool = True
) -> torch.Tensor:
    """The sweep's vertex latents [n, 16, H/8, W/8] float32 on the CPU: `cfg.vertex_latents()` for
    seeds and vertex files; image vertices (and direction prompts) are inverted with `pipe` under the
    sweep's sampling once, written to `<dir>/vertices.safetensors` (atomically, with the signature
    they belong to) and read from there by later runs and other processes."""
    if not cfg.needs_pipeline:
        return cfg.vertex_latents()
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = store.root / VERTICES
    key = json.dumps(cfg.signature(), sort_keys=True)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get("sweep")
            vertices = f.get_tensor("vertices")
        if recorded != key:
            raise InvalidArgumentError(
                f"{path} holds the vertices of another sweep; delete it (it is computed again) "
                "or choose another {param}",
                "output_dir",
            )
        return vertices
    s = cfg.sampling
    if cfg.vertex_images is None and cfg.images_given:
        raise InvalidArgumentError(
            f"{store.root} has no {VERTICES} yet: inverting its vertices needs the image files "
            "(vertex_images), not only their sha256",
            "vertex_images",
        )
    if cfg.direction_prompts is not None:
        start = (
            invert_to_vertices(
                pipe, s, list(cfg.vertex_images), refine=cfg.inversion_refine, progress=progress
            )
            if cfg.vertex_images is not None
            else vertex_latents(cfg.seeds, s.height, s.width)
        )
        renders = invert_renders(
            pipe, s, start[0], cfg.direction_prompts, refine=cfg.inversion_refine, progress=progress
        )
        vertices = torch.cat([start, renders])
    else:
        vertices = invert_to_vertices(
            pipe, s, list(cfg.vertex_images), refine=cfg.inversion_refine, progress=progress
        )
    vertices = vertices.float().contiguous()
    with atomic_path(path) as tmp:
        save_file({"vertices": vertices}, str(tmp), metadata={"sweep": key})
    return vertices


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
