"""Batched, resumable generation of a latent-grid sweep with a diffusers FluxPipeline.

    pipe, spec = load_pipeline("flux-tiny")
    cfg = SweepConfig(model="flux-tiny", width=64, height=64, num_steps=2, max_sequence_length=32,
                      grid=GridSpec(n_alpha=4, n_beta=4))
    result = run_sweep(pipe, cfg, "output/sweep", batch_size=8)

The prompt (and the negative prompt, for true CFG) is encoded once per sweep; each batch passes the
embeddings repeated to its size and the grid latents, packed with `FluxPipeline._pack_latents`, as
`latents=`. The sampler is deterministic (flow-matching Euler; no noise is drawn once latents are
given), so a point's image depends only on its latent, not on the batch or process that made it.
With `phases=True` the x0 estimate of every step is kept per point (see `X0Recorder`).

Per batch the main thread only launches work on the device: the pipeline returns latents, the VAE
decodes them and the pixels are converted to uint8 on the device, then copied to page-locked host
memory without waiting (`HostPixels`). PNG encoding (GIL-free, `flux_ir.store.png`), the phase files
and the points table are written by a `BackgroundWriter` while the device computes the next batch.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import FluxPipeline
from PIL import Image
from tqdm.auto import tqdm

import flux_ir
from flux_ir.errors import InvalidArgumentError
from flux_ir.lens.decode import decode_packed, decode_packed_uint8
from flux_ir.sweep.config import SweepConfig
from flux_ir.sweep.grid import GridPoint
from flux_ir.sweep.paths import sweep_latents
from flux_ir.sweep.shard import Distributed
from flux_ir.sweep.store import SweepStore
from flux_ir.sweep.writer import BackgroundWriter


@dataclass
class Conditioning:
    """Text conditioning encoded once: T5 sequence [1, S, D] and CLIP pooled [1, P] (and negatives)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    _repeated: dict = field(default_factory=dict, repr=False)

    def repeat(self, batch: int) -> dict[str, torch.Tensor | None]:
        """Pipeline keyword arguments for a batch of `batch` images (made once per batch size)."""

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat(batch, *[1] * (x.dim() - 1))

        if batch not in self._repeated:
            self._repeated[batch] = {
                "prompt_embeds": rep(self.prompt_embeds),
                "pooled_prompt_embeds": rep(self.pooled_prompt_embeds),
                "negative_prompt_embeds": rep(self.negative_prompt_embeds),
                "negative_pooled_prompt_embeds": rep(self.negative_pooled_prompt_embeds),
            }
        return dict(self._repeated[batch])


@torch.inference_mode()
def encode_conditioning(pipe: FluxPipeline, cfg: SweepConfig) -> Conditioning:
    """Run the text encoders once for the prompt (and the negative prompt when true CFG is on)."""
    embeds, pooled, _ = pipe.encode_prompt(
        prompt=cfg.prompt, prompt_2=None, max_sequence_length=cfg.max_sequence_length
    )
    cond = Conditioning(embeds, pooled)
    if cfg.true_cfg:
        neg, neg_pooled, _ = pipe.encode_prompt(
            prompt=cfg.negative_prompt, prompt_2=None, max_sequence_length=cfg.max_sequence_length
        )
        cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds = neg, neg_pooled
    return cond


def effective_guidance(pipe: FluxPipeline, guidance: float | None) -> float | None:
    """None for models without a guidance embedding (schnell); 3.5 when unset."""
    if not pipe.transformer.config.guidance_embeds:
        return None
    return 3.5 if guidance is None else float(guidance)


def pack(z: torch.Tensor) -> torch.Tensor:
    """Unpacked latents [B, 16, h, w] -> packed tokens [B, h/2 * w/2, 64] (diffusers' packing)."""
    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


class X0Recorder:
    """`callback_on_step_end` that keeps the x0 estimate of every step, from the latents alone.

    The Euler step is x_{k+1} = x_k + (s_{k+1} - s_k) v_k, so v_k = (x_{k+1} - x_k) / (s_{k+1} - s_k)
    and the model's clean-image estimate is x0_k = x_k - s_k v_k (exact up to the latents' dtype
    rounding; with true CFG v_k is the guided velocity). Each x0_k is average-pooled by `pool` over
    the unpacked latent plane and kept on the device (no host sync per step); `x0` moves them to the
    CPU: [B, steps, 16, h/pool, w/pool] float32.
    """

    def __init__(self, start: torch.Tensor, height: int, width: int, pool: int = 1):
        self.prev = start
        self.height, self.width, self.pool = height, width, pool
        self.steps: list[torch.Tensor] = []

    def __call__(self, pipe: FluxPipeline, i: int, t, kwargs: dict) -> dict:
        x_next = kwargs["latents"]
        sigmas = pipe.scheduler.sigmas.to(x_next.device, torch.float32)
        s, s_next = sigmas[i], sigmas[i + 1]  # 0-dim device tensors: no host sync
        x = self.prev.to(x_next.device, torch.float32)
        v = (x_next.float() - x) / (s_next - s)
        x0 = pipe._unpack_latents(x - s * v, self.height, self.width, pipe.vae_scale_factor)
        if self.pool > 1:
            x0 = F.avg_pool2d(x0, self.pool)
        self.steps.append(x0)
        self.prev = x_next
        return {}

    @property
    def x0(self) -> torch.Tensor:
        return torch.stack(self.steps, dim=1).cpu()


@dataclass
class HostPixels:
    """Images [B, H, W, 3] uint8 on their way to the host; `numpy()` waits for the copy to finish."""

    tensor: torch.Tensor  # host memory (page-locked when copied from a GPU)
    event: torch.cuda.Event | None = None

    @classmethod
    def copy_from(cls, pixels: torch.Tensor) -> HostPixels:
        """Start copying device pixels to the host; the caller does not wait for the device."""
        if pixels.device.type != "cuda":
            return cls(pixels.cpu())
        host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(pixels.device))
        return cls(host, event)

    def numpy(self) -> np.ndarray:
        """[B, H, W, 3] uint8, once the copy is done (waiting releases the GIL)."""
        if self.event is not None:
            self.event.synchronize()
        return self.tensor.numpy()


@torch.inference_mode()
def generate_batch(
    pipe: FluxPipeline,
    cfg: SweepConfig,
    cond: Conditioning,
    z: torch.Tensor,
    phase_pool: int | None = None,
) -> tuple[HostPixels, torch.Tensor | None]:
    """Images [B, H, W, 3] uint8 for latents z [B, 16, h, w], the same values as the pipeline's PIL
    output, being copied to the host; with `phase_pool`, also x0 per step [B, steps, 16, h/p, w/p]."""
    packed = pack(z).to(pipe._execution_device, pipe.transformer.dtype)
    recorder = None if phase_pool is None else X0Recorder(packed, cfg.height, cfg.width, phase_pool)
    guidance = effective_guidance(pipe, cfg.guidance)
    out = pipe(
        **cond.repeat(z.shape[0]),
        true_cfg_scale=cfg.true_cfg_scale,
        latents=packed,
        width=cfg.width,
        height=cfg.height,
        num_inference_steps=cfg.num_steps,
        guidance_scale=0.0 if guidance is None else guidance,
        output_type="latent",
        callback_on_step_end=recorder,
    )
    pixels = decode_packed_uint8(pipe, out.images, cfg.height, cfg.width)
    return HostPixels.copy_from(pixels), None if recorder is None else recorder.x0


@dataclass
class SweepResult:
    store: SweepStore
    generated: int  # points this process generated
    skipped: int  # points already done when the sweep started (all processes)
    seconds: float
    timings: dict = field(
        default_factory=dict
    )  # this process: encode_s, write_blocked_s, write_busy_s


def check_run_args(batch_size: int, phase_pool: int | None, cfg: SweepConfig) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"--batch_size must be a positive integer, got {batch_size!r}")
    if phase_pool is not None:
        h, w = cfg.height // 8, cfg.width // 8
        if not isinstance(phase_pool, int) or phase_pool < 1 or h % phase_pool or w % phase_pool:
            raise InvalidArgumentError(
                f"--phase_pool must be a positive integer dividing the latent size {h}x{w}, got {phase_pool!r}"
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
) -> SweepResult:
    """Generate every pending point of `cfg` into `out_dir`; resume if it holds the same sweep.

    Points are sharded over `dist`'s processes; each writes its images (atomically) and its part of the
    points table after every batch, so an interruption loses at most the batch in flight. Rank 0 merges
    `points.csv` and `metadata.json` once all processes are done. `phase_pool` (None: off) keeps the
    per-step x0 latents, average-pooled by that factor, in `phases/`; `phase_images` (None: off, needs
    `phase_pool`) also VAE-decodes every step's x0 and keeps it as a thumbnail of that many pixels.
    """
    check_run_args(batch_size, phase_pool, cfg)
    if phase_images is not None and (
        phase_pool is None or not isinstance(phase_images, int) or phase_images < 8
    ):
        raise InvalidArgumentError(
            f"--phase_images must be a thumbnail size >= 8 and needs --phases, got {phase_images!r}"
        )
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
            f"{store.root} keeps phases pooled by {previous_pool}; resume with --phase_pool {previous_pool}"
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
    cond = encode_conditioning(pipe, cfg)
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


def pool_steps(x0: torch.Tensor, pool: int) -> torch.Tensor:
    """[B, steps, C, h, w] -> [B, steps, C, h/pool, w/pool] by average pooling."""
    if pool == 1:
        return x0
    b, k = x0.shape[:2]
    pooled = F.avg_pool2d(x0.flatten(0, 1), pool)
    return pooled.view(b, k, *pooled.shape[1:])


@torch.inference_mode()
def decode_steps(
    pipe: FluxPipeline, cfg: SweepConfig, x0: torch.Tensor, size: int
) -> list[list[Image.Image]]:
    """VAE-decode x0 [B, steps, 16, h, w] step by step; thumbnails of `size` px, [point][step]."""
    thumbs: list[list[Image.Image]] = [[] for _ in range(x0.shape[0])]
    for step in range(x0.shape[1]):
        packed = pack(x0[:, step]).to(pipe._execution_device, pipe.transformer.dtype)
        for k, image in enumerate(decode_packed(pipe, packed, cfg.height, cfg.width)):
            thumbs[k].append(image.resize((size, size), Image.Resampling.BILINEAR))
    return thumbs


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
        "guidance_effective": effective_guidance(pipe, cfg.guidance),
        "true_cfg": cfg.true_cfg,
        "latent_shape": [16, cfg.height // 8, cfg.width // 8],
        "batch_size": batch_size,
        "processes": dist.world,
        "phase_pool": phase_pool,
        "phase_images": phase_images,
        "device": str(pipe._execution_device),
        "pipeline_dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "versions": {
            "flux_ir": flux_ir.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        **(extra or {}),
    }
