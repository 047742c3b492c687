"""One batch of a sweep: grid latents in, uint8 images (and per-step x0 latents) out.

    cfg = SweepConfig.from_spec(spec, width=64, height=64, grid=GridSpec(n_alpha=2, n_beta=2))
    z, _, _ = grid_latents(cfg.vertex_latents(), cfg.grid, cfg.grid.points())   # [4, 16, 8, 8]
    emb = encode_prompt(pipe, cfg.sampling)                 # once per sweep
    pixels, x0 = generate_batch(pipe, cfg, emb, z, phase_pool=2)
    pixels.numpy().shape, x0.shape                          # (4, 64, 64, 3) uint8, [4, 4, 16, 4, 4]

Each batch passes the prompt embeddings repeated to its size and the grid latents, packed, as
`latents=` to `flux_ir.sampling.generate`. The sampler is deterministic (flow-matching Euler; no noise
is drawn once latents are given), so a point's image depends only on its latent, not on the batch or
process that made it. With `phase_pool` the x0 estimate of every step is kept per point (`X0Recorder`).

The main thread only launches work on the device: the pipeline returns latents, the VAE decodes them
and the pixels are converted to uint8 on the device, then copied to page-locked host memory without
waiting (`HostPixels`). `flux_ir.sweep.run` orchestrates the batches, files and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from PIL import Image

from flux_ir.geometry import pack_latents, unpack_latents
from flux_ir.lens.decode import decode_packed, decode_packed_uint8
from flux_ir.sampling import PromptEmbeddings, generate
from flux_ir.sweep.config import SweepConfig


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
        x0 = unpack_latents(x - s * v, self.height, self.width)
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


def generate_batch(
    pipe: FluxPipeline,
    cfg: SweepConfig,
    embeddings: PromptEmbeddings,
    z: torch.Tensor,
    phase_pool: int | None = None,
) -> tuple[HostPixels, torch.Tensor | None]:
    """Images [B, H, W, 3] uint8 for latents z [B, 16, h, w], the same values as the pipeline's PIL
    output, being copied to the host; with `phase_pool`, also x0 per step [B, steps, 16, h/p, w/p]."""
    s = cfg.sampling
    packed = pack_latents(z).to(pipe._execution_device, pipe.transformer.dtype)
    recorder = None if phase_pool is None else X0Recorder(packed, s.height, s.width, phase_pool)
    out = generate(
        pipe, s, latents=packed, embeddings=embeddings, callback=recorder, output_type="latent"
    )
    pixels = decode_packed_uint8(pipe, out.images, s.height, s.width)
    return HostPixels.copy_from(pixels), None if recorder is None else recorder.x0


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
    s = cfg.sampling
    thumbs: list[list[Image.Image]] = [[] for _ in range(x0.shape[0])]
    for step in range(x0.shape[1]):
        packed = pack_latents(x0[:, step]).to(pipe._execution_device, pipe.transformer.dtype)
        for k, image in enumerate(decode_packed(pipe, packed, s.height, s.width)):
            thumbs[k].append(image.resize((size, size), Image.Resampling.BILINEAR))
    return thumbs
