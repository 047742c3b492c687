"""The block lens: decode a block's output as if it were the transformer's final prediction.

    head = LensHead.from_pipeline(pipe)
    ctx, k = cap.denoising_context, 0                       # a capture's context at step k
    v = head.velocity(cap.image_tokens("single", 3, k), ctx["temb"][k])   # [B, N, 64]
    t_curr, t_prev = ctx["timestep_pairs"][k]
    z = lens_latents(v, ctx["img_state"][k], t_curr, t_prev, "x0")       # packed latents [B, N, 64]
    images = decode_packed(pipe, z, cap.metadata["height"], cap.metadata["width"])  # PIL images

For image tokens `h` of any block, the transformer's own `norm_out(h, temb)` and `proj_out` give a
velocity `v`. Target "x0" is the model's clean-image estimate `img_state - t_curr * v`; target "next" is
the Euler step the scheduler takes, `img_state + (t_prev - t_curr) * v` (the original tool's lens). On
the last block, "next" reproduces the pipeline's own next latent.

"x0" holds for every scheduler flux-ir offers (each computes the same estimate from the velocity);
"next" only for FLUX's Euler, whose step needs one model output: captures sampled with a multistep
solver (metadata "scheduler") are refused it (`check_lens_target`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from PIL import Image
from torch import nn

from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import unpack_latents
from flux_ir.models.schedulers import check_lens_target

TARGETS = ("x0", "next")
# (double blocks, single blocks, width) of the architectures flux-ir knows, to name a pipeline
KNOWN_ARCHITECTURES = {(2, 4, 32): "flux-tiny", (4, 8, 128): "flux-toy", (19, 38, 3072): "FLUX.1"}


@dataclass(frozen=True)
class LensOptions:
    """How to decode blocks: `target` "x0" (the clean-image estimate) or "next" (one Euler step, the
    original tool's lens), and `batch_size` latents per VAE decode call.

    >>> LensOptions("next").target
    'next'
    >>> LensOptions("x1")
    Traceback (most recent call last):
    ...
    flux_ir.errors.InvalidArgumentError: target 'x1' is unknown; choose one of x0, next.
    """

    target: str = "x0"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InvalidArgumentError(
                f"{{param}} {self.target!r} is unknown; choose one of {', '.join(TARGETS)}.",
                "target",
            )
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InvalidArgumentError(
                f"{{param}} must be a positive integer, got {b!r}", "batch_size"
            )


def pipeline_architecture(pipe: FluxPipeline) -> tuple[int, int, int]:
    """(double blocks, single blocks, hidden width) of a pipeline's transformer (no weights read)."""
    t = pipe.transformer
    width = t.config.num_attention_heads * t.config.attention_head_dim
    return len(t.transformer_blocks), len(t.single_transformer_blocks), width


def check_capture_model(pipe: FluxPipeline, metadata: dict, width: int | None = None) -> None:
    """Raise InvalidArgumentError (param "model") naming both models unless the capture described by
    `metadata` (and its tensors' hidden `width`, when known) was made by `pipe`'s architecture and
    VAE scaling. Fields that older captures lack are not compared; nothing heavy is read."""
    ours = pipeline_architecture(pipe)
    theirs = (metadata.get("num_double_blocks"), metadata.get("num_single_blocks"), width)
    shape_differs = any(a is not None and a != b for a, b in zip(theirs, ours, strict=True))
    scale, our_scale = metadata.get("vae_scaling_factor"), float(pipe.vae.config.scaling_factor)
    vae_differs = isinstance(scale, int | float) and not math.isclose(
        scale, our_scale, rel_tol=1e-6
    )
    if not (shape_differs or vae_differs):
        return

    def describe(arch: tuple, vae_scale) -> str:
        d, s, w = (("?" if v is None else v) for v in arch)
        vae = f", VAE scaling {vae_scale:.4g}" if vae_differs else ""
        return f"{d} double, {s} single blocks, width {w}{vae}"

    made_by = metadata.get("model")
    name = pipe.name_or_path or KNOWN_ARCHITECTURES.get(ours, "another model")
    fix = f"pass {{param}} {made_by}" if made_by else "load the model that made it"
    raise InvalidArgumentError(
        f"this capture was made by {made_by or 'another model'} ({describe(theirs, scale)}); the "
        f"pipeline is {name} ({describe(ours, our_scale)}); {fix}",
        "model",
    )


@dataclass
class LensHead:
    """The transformer's output head (`norm_out`, `proj_out`) on the device where the lens runs.

    With model CPU offload or group offload the transformer's weights rest on the CPU between calls;
    the head is copied to the execution device so decoding never silently runs on CPU weights.
    """

    norm_out: nn.Module
    proj_out: nn.Module
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_pipeline(cls, pipe: FluxPipeline) -> LensHead:
        t = pipe.transformer
        device = torch.device(pipe._execution_device)
        params = list(t.norm_out.parameters()) + list(t.proj_out.parameters())
        on_meta = any(p.device.type == "meta" for p in params)
        if on_meta:  # sequential offload: accelerate's per-module hooks move weights in on call
            return cls(t.norm_out, t.proj_out, device, t.dtype)
        if getattr(t, "_diffusers_hook", None) is not None:  # group offload: weights rest on CPU
            return cls._rebuilt(t, device)
        norm_out = copy.deepcopy(t.norm_out).to(device)
        proj_out = copy.deepcopy(t.proj_out).to(device)
        return cls(norm_out, proj_out, device, proj_out.weight.dtype)

    @classmethod
    def _rebuilt(cls, t: nn.Module, device: torch.device) -> LensHead:
        """Fresh hook-free copies of the head (FluxTransformer2DModel's construction) on `device`."""
        from diffusers.models.normalization import AdaLayerNormContinuous

        dtype = t.proj_out.weight.dtype
        norm_out = AdaLayerNormContinuous(
            t.inner_dim, t.inner_dim, elementwise_affine=False, eps=1e-6
        )
        proj_out = nn.Linear(t.inner_dim, t.proj_out.out_features, bias=t.proj_out.bias is not None)
        norm_out.load_state_dict(t.norm_out.state_dict())
        proj_out.load_state_dict(t.proj_out.state_dict())
        return cls(norm_out.to(device, dtype), proj_out.to(device, dtype), device, dtype)

    @torch.inference_mode()
    def velocity(self, h_img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, N, D] and conditioning [B, D] -> velocity [B, N, 64] (model dtype)."""
        h = h_img.to(self.device, self.dtype)
        return self.proj_out(self.norm_out(h, temb.to(self.device, self.dtype)))


def lens_latents(
    v: torch.Tensor,
    img_state: torch.Tensor,
    t_curr: float,
    t_prev: float,
    target: str = "x0",
    scheduler: str | None = None,
) -> torch.Tensor:
    """Packed latents [B, N, 64] from a velocity, computed in float32 like the scheduler's step.

    Returns `img_state`'s dtype on `v`'s device. `target` is "x0" or "next" (see `LensOptions`);
    `scheduler` (a capture's metadata "scheduler"; None: euler) refuses "next" for multistep solvers.
    """
    check_lens_target(target, scheduler)
    x = img_state.to(v.device, torch.float32)
    # 0-dim float32 sigmas on the velocity's device, as FlowMatchEulerDiscreteScheduler.step uses them
    # (its sigmas live on the pipeline's device): a Python float, or a CPU scalar next to a CUDA tensor,
    # takes another rounding path in bfloat16 and misses the pipeline's next latent by one ulp
    sigma = torch.tensor(t_curr, device=v.device)
    sigma_next = torch.tensor(t_prev, device=v.device)
    if target == "x0":
        out = x - sigma * v
    elif target == "next":
        out = x + (sigma_next - sigma) * v
    else:  # LensOptions checks user input; this guards direct calls
        raise KeyError(f"lens target {target!r} is neither x0 nor next")
    return out.to(v.dtype)


@torch.inference_mode()
def decode_packed(
    pipe: FluxPipeline, packed: torch.Tensor, height: int, width: int, output_type: str = "pil"
) -> list[Image.Image] | torch.Tensor:
    """Packed latents [B, N, 64] -> images: unpack, undo scaling/shift, VAE-decode, post-process."""
    latents = unpack_latents(packed, height, width)
    cfg = pipe.vae.config
    latents = latents / cfg.scaling_factor + cfg.shift_factor
    vae_device = _module_device(pipe, pipe.vae)
    image = pipe.vae.decode(latents.to(vae_device, pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


@torch.inference_mode()
def decode_packed_uint8(
    pipe: FluxPipeline, packed: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Packed latents [B, N, 64] -> images [B, H, W, 3] uint8 (contiguous) on the VAE's device.

    The same values as the pipeline's PIL output (diffusers denormalises in the VAE's dtype, then
    scales by 255 in float32 and rounds), computed where the VAE ran, so only a quarter of the
    bytes of a float32 image cross to the host and the host does no per-pixel work.
    """
    image = decode_packed(pipe, packed, height, width, output_type="pt")  # [B, 3, H, W] in [0, 1]
    return image.permute(0, 2, 3, 1).float().mul(255).round().to(torch.uint8).contiguous()


def _module_device(pipe: FluxPipeline, module: nn.Module) -> torch.device:
    """Where `module` computes: its parameters' device, or the pipeline's execution device when offloaded."""
    p = next(module.parameters())
    if p.device.type in ("meta", "cpu") and torch.device(pipe._execution_device).type != "cpu":
        return torch.device(pipe._execution_device)
    return p.device
