"""Inversion: real images to the noise from which the sampler regenerates them.

    opts = SamplingOptions(prompt="", width=64, height=64, num_steps=4, max_sequence_length=32)
    images = generate(pipe, opts, seed=3, output_type="pt").images    # [1, 3, 64, 64] in [0, 1]
    noise = invert_images(pipe, opts, images, progress=False)          # packed noise [1, 16, 64], sigma 1
    again = generate(pipe, opts, latents=noise.to(pipe.transformer.dtype), output_type="pt").images
    psnr(again, images)                       # [1] dB (flux-toy's scenes: about 35, see the README)
    clean = encode_images(pipe, images)       # the VAE half alone: packed clean latents [1, 16, 64]

Images may also be PIL images or files of exactly the sampling size (`load_image`; other sizes are
refused, not resized). `encode_images` is the VAE encoder's mode with FLUX's shift and scale,
`(mode - shift) * scale`, packed as the transformer reads latents (`flux_ir.geometry.pack_latents`).
`invert_latents` runs the sampler backwards: FluxPipeline's Euler step is
x_{k+1} = x_k + (s_{k+1} - s_k) v(x_k, t_k) on the sigmas s_0 = 1 > ... > s_K = 0 the pipeline
computes (`flow_schedule`: the scheduler's shift, or its resolution-dependent shift mu), so inversion
solves x_k = x_{k+1} - (s_{k+1} - s_k) v(x_k, t_k) from the clean latent x_K to the noise x_0, with
the velocity the sampler uses: the same prompt embeddings (`opts.prompt`, one prompt per image with
`prompts=`, or the empty prompt), distilled guidance and true CFG. x_k is unknown inside v, so each
step evaluates v once at a guess, x_{k+1} moved back along the previous step's velocity (one
transformer pass per step, as sampling; two with true CFG). `refine` n adds n fixed-point passes
x_k <- x_{k+1} - (s_{k+1} - s_k) v(x_k, t_k) per step: they converge to the exact inverse of the
Euler step where the step is small against the velocity's Lipschitz constant (flux-tiny: ~10x
smaller error per pass) and diverge where it is not (flux-toy at 16 steps: worse; see the README).

The noise is float32 on the pipeline's device: `.to(pipe.transformer.dtype)` it for `generate`, or
unpack it (`flux_ir.geometry.unpack_latents`) for a sweep's vertex latents [B, 16, H/8, W/8].
`prompt_direction` renders two prompts from one noise and inverts both: their difference is a
direction in noise space (`flux_ir.sweep.paths.direction_at`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import pack_latents, unpack_latents
from flux_ir.sampling import (
    PromptEmbeddings,
    SamplingOptions,
    effective_guidance,
    encode_prompt,
    generate,
)

if TYPE_CHECKING:
    from diffusers import FluxPipeline
    from PIL import Image


# -- images in ------------------------------------------------------------------------------------
def load_image(path: str | Path, width: int, height: int, param: str = "image") -> torch.Tensor:
    """The image file at `path` as [3, H, W] float32 in [0, 1] (RGB; an alpha channel is dropped,
    grey is repeated). Its size must be `width` x `height`: it is refused otherwise, nothing is
    resized (a resized image would not be the image whose sha256 a sweep records)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidArgumentError(f"{{param}} {path} does not exist; give an image file", param)
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidArgumentError(
            f"{{param}} {path} is not a readable image: {err}", param
        ) from err
    if image.size != (width, height):
        w, h = image.size
        hint = (
            f"pass --width {w} --height {h}"
            if w % 16 == 0 and h % 16 == 0
            else "crop or resize it to a multiple of 16 pixels per side"
        )
        raise InvalidArgumentError(
            f"{{param}} {path} is {w}x{h} pixels but the sampling size is {width}x{height}; "
            f"resize it to {width}x{height} or {hint}",
            param,
        )
    return image_tensor(image)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> [3, H, W] float32 in [0, 1] (RGB)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def as_batch(images) -> torch.Tensor:
    """PIL images, a list of [3, H, W] tensors or one [B, 3, H, W] tensor -> [B, 3, H, W] float32."""
    if isinstance(images, torch.Tensor):
        batch = images[None] if images.dim() == 3 else images
    else:
        batch = torch.stack(
            [image_tensor(x) if not isinstance(x, torch.Tensor) else x for x in images]
        )
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise InvalidArgumentError(
            f"{{param}} must be RGB images [B, 3, H, W], got shape {tuple(batch.shape)}", "images"
        )
    return batch.float()


@torch.inference_mode()
def encode_images(pipe: FluxPipeline, images, batch_size: int = 8) -> torch.Tensor:
    """Images ([B, 3, H, W] in [0, 1], or PIL images) -> packed clean latents [B, (H/16)(W/16), 64]
    float32 on the pipeline's device: the VAE posterior's mode, shifted and scaled as FluxPipeline
    expects its latents (`(mode - shift_factor) * scaling_factor`, the inverse of its decode)."""
    x = as_batch(images)
    h, w = x.shape[-2:]
    if h % 16 or w % 16:
        raise InvalidArgumentError(
            f"{{param}} must be a multiple of 16 pixels per side, got {w}x{h}", "images"
        )
    vae = pipe.vae
    device = pipe._execution_device
    cfg = vae.config
    out = []
    for lo in range(0, x.shape[0], batch_size):
        part = (x[lo : lo + batch_size] * 2 - 1).to(device, vae.dtype)
        mode = vae.encode(part).latent_dist.mode()
        out.append((mode.float() - cfg.shift_factor) * cfg.scaling_factor)
    return pack_latents(torch.cat(out))


# -- the sampler's schedule and velocity ----------------------------------------------------------
def flow_schedule(
    pipe: FluxPipeline, num_steps: int, image_seq_len: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [K + 1] float32 from 1 to 0, timesteps [K]) exactly as FluxPipeline sets them for
    `num_steps` steps and `image_seq_len` image tokens: linspace(1, 1/K, K) through a copy of the
    pipeline's scheduler (its shift, or its dynamic shift mu from the sequence length)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    config = pipe.scheduler.config
    scheduler = type(pipe.scheduler).from_config(config)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if getattr(config, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    device = pipe._execution_device if device is None else device
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.to(device, torch.float32), timesteps


def batch_embeddings(
    pipe: FluxPipeline, opts: SamplingOptions, prompts: Sequence[str]
) -> PromptEmbeddings:
    """One prompt per image: embeddings [len(prompts), ...] (the negative prompt's too, with true CFG)."""
    from dataclasses import replace

    parts = [encode_prompt(pipe, replace(opts, prompt=p)) for p in prompts]

    def cat(name):
        tensors = [getattr(e, name) for e in parts]
        return None if tensors[0] is None else torch.cat(tensors)

    return PromptEmbeddings(
        cat("prompt_embeds"),
        cat("pooled_prompt_embeds"),
        cat("negative_prompt_embeds"),
        cat("negative_pooled_prompt_embeds"),
    )


class Velocity:
    """The velocity v(x, t) the sampler steps with: the transformer on packed latents x [B, N, 64]
    at scheduler timestep t (0-dim, sigma * 1000), conditioned as `generate` conditions it (the
    embeddings, distilled guidance, true CFG `neg + scale (cond - neg)`). Returns [B, N, 64] float32.
    `emb` holds one prompt (repeated to the batch) or one per image."""

    def __init__(
        self, pipe: FluxPipeline, opts: SamplingOptions, emb: PromptEmbeddings, batch: int
    ):
        device, dtype = pipe._execution_device, pipe.transformer.dtype
        self.pipe, self.dtype, self.batch = pipe, dtype, batch
        n = emb.prompt_embeds.shape[0]
        if n not in (1, batch):
            raise InvalidArgumentError(
                f"{{param}} hold {n} prompts for {batch} images; give one, or one per image",
                "embeddings",
            )
        rep = emb.repeat(batch // n)
        self.cond = (
            rep["prompt_embeds"].to(device, dtype),
            rep["pooled_prompt_embeds"].to(device, dtype),
        )
        self.neg = None
        if opts.true_cfg:
            self.neg = (
                rep["negative_prompt_embeds"].to(device, dtype),
                rep["negative_pooled_prompt_embeds"].to(device, dtype),
            )
        self.scale = opts.true_cfg_scale
        self.txt_ids = torch.zeros(emb.prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        rows, cols = opts.token_grid
        self.img_ids = pipe._prepare_latent_image_ids(batch, rows, cols, device, dtype)
        g = effective_guidance(pipe, opts.guidance)
        self.guidance = (
            None if g is None else torch.full([batch], g, device=device, dtype=torch.float32)
        )
        self.passes = 0  # transformer passes so far

    def _pass(self, x: torch.Tensor, timestep: torch.Tensor, embeds) -> torch.Tensor:
        self.passes += 1
        return self.pipe.transformer(
            hidden_states=x,
            timestep=timestep / 1000,
            guidance=self.guidance,
            pooled_projections=embeds[1],
            encoder_hidden_states=embeds[0],
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            joint_attention_kwargs=getattr(self.pipe, "joint_attention_kwargs", None),
            return_dict=False,
        )[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        timestep = t.expand(x.shape[0]).to(self.dtype)  # as FluxPipeline rounds it
        v = self._pass(x, timestep, self.cond)
        if self.neg is not None:
            neg = self._pass(x, timestep, self.neg)
            v = neg + self.scale * (v - neg)
        return v.float()


# -- inversion ------------------------------------------------------------------------------------
@torch.inference_mode()
def invert_latents(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    clean: torch.Tensor,
    *,
    embeddings: PromptEmbeddings | None = None,
    prompts: Sequence[str] | None = None,
    refine: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Packed clean latents [B, N, 64] (sigma 0) -> the packed noise [B, N, 64] float32 (sigma 1)
    from which `generate(pipe, opts, latents=...)` samples them again (see the module docstring).

    Args:
        opts: the sampling to invert: size, steps, prompt (use prompt="" for the empty prompt),
            guidance and true CFG, as `generate` will sample.
        embeddings: `encode_prompt(pipe, opts)`, when the caller has it already (one prompt, or
            one per image).
        prompts: one prompt per image instead of `opts.prompt` (sample with
            `generate(..., prompts=prompts)`).
        refine: fixed-point passes per step on top of the first (0: one velocity per step, the
            cost of sampling; each pass adds one, two with true CFG).
        progress: a progress bar over the steps (tqdm.auto).
    """
    from tqdm.auto import tqdm

    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise InvalidArgumentError(
            f"{{param}} must be a non-negative integer (fixed-point passes per step), got {refine!r}",
            "refine",
        )
    rows, cols = opts.token_grid
    if clean.dim() != 3 or clean.shape[1:] != (rows * cols, 64):
        raise InvalidArgumentError(
            f"{{param}} must be packed latents [B, {rows * cols}, 64] of a {opts.width}x"
            f"{opts.height} image, got shape {tuple(clean.shape)}",
            "clean",
        )
    if embeddings is not None:
        emb = embeddings
    elif prompts is not None:
        if len(prompts) != clean.shape[0]:
            raise InvalidArgumentError(
                f"{{param}} must hold one prompt per image ({clean.shape[0]}), got {len(prompts)}",
                "prompts",
            )
        emb = batch_embeddings(pipe, opts, prompts)
    else:
        emb = encode_prompt(pipe, opts)
    device = pipe._execution_device
    sigmas, timesteps = flow_schedule(pipe, opts.num_steps, rows * cols, device)
    velocity = Velocity(pipe, opts, emb, clean.shape[0])
    x = clean.to(device, torch.float32)
    previous = None  # the last step's velocity: the guess of the next one
    steps = range(opts.num_steps - 1, -1, -1)
    for k in tqdm(steps, desc="inverting", leave=False, disable=not progress):
        ds = sigmas[k + 1] - sigmas[k]  # negative: sampling moves from sigma 1 to 0
        guess = x if previous is None else x - ds * previous
        for _ in range(refine + 1):
            v = velocity(guess, timesteps[k])
            guess = x - ds * v
        x, previous = guess, v
    return x


def invert_images(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    images,
    *,
    embeddings: PromptEmbeddings | None = None,
    prompts: Sequence[str] | None = None,
    refine: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Images ([B, 3, H, W] in [0, 1], PIL images, or image files of opts' size) -> packed noise
    [B, N, 64] float32: `encode_images` then `invert_latents`."""
    if isinstance(images, str | Path) or (
        isinstance(images, Sequence) and images and isinstance(images[0], str | Path)
    ):
        paths = [images] if isinstance(images, str | Path) else list(images)
        images = torch.stack([load_image(p, opts.width, opts.height) for p in paths])
    batch = as_batch(images)
    if tuple(batch.shape[-2:]) != (opts.height, opts.width):
        raise InvalidArgumentError(
            f"{{param}} are {batch.shape[-1]}x{batch.shape[-2]} pixels but the sampling size is "
            f"{opts.width}x{opts.height}",
            "images",
        )
    clean = encode_images(pipe, batch)
    return invert_latents(
        pipe, opts, clean, embeddings=embeddings, prompts=prompts, refine=refine, progress=progress
    )


def invert_to_vertices(
    pipe: FluxPipeline, opts: SamplingOptions, images, *, refine: int = 0, progress: bool = True
) -> torch.Tensor:
    """Images (files, PIL images or [B, 3, H, W]) -> vertex latents [B, 16, H/8, W/8] float32 on the
    CPU, the noise a sweep interpolates between (`flux_ir.sweep.SweepConfig(vertex_images=...)`)."""
    noise = invert_images(pipe, opts, images, refine=refine, progress=progress)
    return unpack_latents(noise, opts.height, opts.width).cpu()


def invert_renders(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    start: torch.Tensor,
    prompts: tuple[str, str],
    *,
    refine: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """The images two prompts render from the noise `start` [16, H/8, W/8] (opts' other settings),
    each inverted under `opts` (its own prompt): [2, 16, H/8, W/8] float32 on the CPU."""
    prompts = tuple(prompts) if not isinstance(prompts, str) else (prompts,)
    if len(prompts) != 2 or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgumentError(
            f"{{param}} must be two prompts (from, to), got {prompts!r}", "prompts"
        )
    noise = pack_latents(start[None].float().repeat(2, 1, 1, 1))
    noise = noise.to(pipe._execution_device, pipe.transformer.dtype)
    renders = generate(pipe, opts, latents=noise, prompts=list(prompts), output_type="latent")
    inverted = invert_latents(pipe, opts, renders.images.float(), refine=refine, progress=progress)
    return unpack_latents(inverted, opts.height, opts.width).cpu()


def prompt_direction(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    start: torch.Tensor,
    prompts: tuple[str, str],
    *,
    refine: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """A direction [16, H/8, W/8] float32 in noise space from two prompts: `invert_renders`, the
    second inverted render minus the first (`flux_ir.sweep.paths.direction_at` walks along it)."""
    z = invert_renders(pipe, opts, start, prompts, refine=refine, progress=progress)
    return z[1] - z[0]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images [B, 3, H, W] in [0, 1] against each other: [B]."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1 / mse)


__all__ = [
    "Velocity",
    "batch_embeddings",
    "encode_images",
    "flow_schedule",
    "invert_images",
    "invert_latents",
    "invert_renders",
    "invert_to_vertices",
    "load_image",
    "prompt_direction",
    "psnr",
]
