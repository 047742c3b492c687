"""Any registry model in its exact architecture with random weights: no downloads.

    pipe = build_random_pipeline(REGISTRY["flux-dev"], device="meta")   # the shapes alone, at once
    # build_random_pipeline(REGISTRY["flux-dev"], device="cuda", dtype=torch.bfloat16) to run it
    # build_random_pipeline(spec, device="cpu", dtype=torch.bfloat16, init_device="cuda")  # offload
    # ... resident=("vae", "text_encoder"), host="pinned")   # for group offloading (see below)

The components are first made on the meta device (the shapes alone, no memory, no random numbers),
then every parameter is made and filled on `init_device` (default `device`) in `dtype`, one at a
time, and moved to `device`: on a GPU that is a few seconds of copying for the 16.9 B parameters of
FLUX.1 with its text encoders, where filling them on the CPU took minutes, and the GPU never holds
more than one parameter beyond what stays there (an offloaded pipeline is built this way on a
24 GB card). For group offloading, `resident` components are made on the device and stay there,
and `host="pinned"` carves the other components' parameters from page-locked memory
(`flux_ir.io.host_memory.HostArena`, page-locked by several threads while the filling runs): the
device copies each parameter straight into it, and diffusers, which keeps offloaded weights in
page-locked memory, finds them there instead of copying all of them again through its own
single-threaded page-locked allocations. Each parameter is drawn from its own generator, seeded from `seed`, the component and
the parameter's name: matrices and convolution kernels uniform in ±1/sqrt(fan_in) (torch's default
for linear layers), biases zero, norm weights one. The same seed gives the same weights in every
process and offload mode on one kind of device (`weights_fingerprint` shows it); CPU and CUDA
generators draw different numbers. Random weights cost exactly what real ones cost in memory and
time; their pixels mean nothing, and in bfloat16 they may overflow to inf/NaN. Tokenizers are
flux-tiny's in-code ones (ids stay inside the real vocabularies).
"""

from __future__ import annotations

import hashlib
import math

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from flux_ir.errors import InvalidArgumentError
from flux_ir.io.host_memory import HostArena, HostPool
from flux_ir.models.registry import ModelSpec
from flux_ir.models.tiny import (
    VAE_SCALING_FACTOR,
    VAE_SHIFT_FACTOR,
    assemble_pipeline,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_tiny_pipeline,
)
from flux_ir.models.toy import ARCH_2, build_toy_pipeline

# FLUX.1 [dev]/[schnell] transformer (flux/util.py configs), 11.9 B parameters.
TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=VAE_SCALING_FACTOR,
    shift_factor=VAE_SHIFT_FACTOR,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CLIP_L = dict(  # openai/clip-vit-large-patch14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
T5_XXL = dict(  # google/t5-v1_1-xxl encoder
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
    layer_norm_epsilon=1e-6,
)
HOSTS = ("pageable", "pinned")  # where offloaded parameters go (`build_random_pipeline(host=)`)
SCHEDULER_SCHNELL = dict(shift=1.0, use_dynamic_shifting=False)
SCHEDULER_DEV = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def build_random_pipeline(
    spec: ModelSpec,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    init_device: str | torch.device | None = None,
    sizes: dict[str, dict] | None = None,
    resident: tuple[str, ...] = (),
    host: str = "pageable",
) -> FluxPipeline:
    """`spec`'s architecture with random weights on `device` in `dtype` ("meta": the shapes alone),
    filled on `init_device` (default `device`; "cuda" for a pipeline that is then offloaded from
    the CPU). `sizes` overrides config entries per component ("transformer", "vae", "clip", "t5";
    small architectures for tests). `resident`: components ("vae", "text_encoder", ...) left on
    `init_device` instead. `host`: where the other components' parameters go when `device` is the
    CPU: "pageable" (ordinary tensors) or "pinned" (carved from page-locked memory made for them;
    ordinary memory where CUDA is absent).

    flux-tiny is returned as built in code (its weights are random already), flux-toy's
    architecture with its own initialisation.
    """
    if host not in HOSTS:
        raise InvalidArgumentError(f"{{param}} {host!r}: choose one of {', '.join(HOSTS)}", "host")
    if spec.source == "builtin":
        return build_tiny_pipeline(seed).to(device=device, dtype=dtype)
    if spec.source == "package":  # flux-toy's architecture, untrained
        arch = ARCH_2 if spec.name == "flux-toy-2" else None
        return build_toy_pipeline(arch, seed=seed).to(device=device, dtype=dtype)
    sizes = sizes or {}
    guidance = spec.guidance is not None
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights():  # parameters on the meta device, buffers real
            components = {
                "transformer": FluxTransformer2DModel(
                    **{**TRANSFORMER, **sizes.get("transformer", {})}, guidance_embeds=guidance
                ),
                "vae": AutoencoderKL(**{**VAE, **sizes.get("vae", {})}),
                "text_encoder": CLIPTextModel(
                    CLIPTextConfig(
                        **{**CLIP_L, **sizes.get("clip", {})},
                        bos_token_id=clip_tok.bos_token_id,
                        eos_token_id=clip_tok.eos_token_id,
                        pad_token_id=clip_tok.pad_token_id,
                    )
                ),
                "text_encoder_2": T5EncoderModel(
                    T5Config(
                        **{**T5_XXL, **sizes.get("t5", {})},
                        pad_token_id=t5_tok.pad_token_id,
                        eos_token_id=t5_tok.eos_token_id,
                    )
                ),
            }
    finally:
        torch.set_default_dtype(old_dtype)
    if torch.device(device).type != "meta":
        init = init_device or device
        offloaded = [m for name, m in components.items() if name not in resident]
        arena = None
        if host == "pinned" and torch.device(device).type == "cpu":
            arena = host_arena(offloaded)
        try:
            for name, module in components.items():
                if name in resident:
                    fill_random(module, name, seed, init)
                else:
                    fill_random(module, name, seed, device, init_device, arena=arena)
        finally:
            if arena is not None:
                arena.close()
        if torch.device(init).type == "cuda":
            torch.cuda.empty_cache()  # what filling cached goes back to the device
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, **(SCHEDULER_DEV if guidance else SCHEDULER_SCHNELL)
    )
    c = components
    return assemble_pipeline(
        scheduler,
        c["vae"],
        c["text_encoder"],
        clip_tok,
        c["text_encoder_2"],
        t5_tok,
        c["transformer"],
    )


def host_arena(modules: list[nn.Module]) -> HostArena:
    """Page-locked memory for every parameter of `modules` (ordinary memory without CUDA), asked
    for at once: a pool of its own, in regions of 1 GiB (at most a few percent left unused at
    their ends, and a budget with room for that; what does not fit is ordinary memory)."""
    sizes = [p.numel() * p.element_size() for m in modules for p in m.parameters()]
    nbytes, largest = sum(sizes), max(sizes, default=0)
    budget = nbytes + nbytes // 8 + 2 * largest
    return HostArena(HostPool(budget=budget, region_bytes=1 << 30, keep=0), nbytes, largest)


def param_seed(seed: int, component: str, name: str) -> int:
    """The generator seed of one parameter: from the pipeline's seed, the component and the name."""
    digest = hashlib.sha256(f"flux-ir random weights/{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_values(
    name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device, seed: int
) -> torch.Tensor:
    """A parameter's values: uniform in ±1/sqrt(fan_in) for matrices and kernels (fan_in: the
    product of every dimension but the first), zeros for biases, ones for other vectors (norms)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if len(shape) >= 2:
        bound = math.prod(shape[1:]) ** -0.5
        generator = torch.Generator(device=device).manual_seed(seed)
        return out.uniform_(-bound, bound, generator=generator)
    return out.zero_() if name.rsplit(".", 1)[-1] == "bias" else out.fill_(1.0)


@torch.no_grad()
def fill_random(
    module: nn.Module,
    component: str,
    seed: int,
    device: str | torch.device,
    init_device: str | torch.device | None = None,
    arena: HostArena | None = None,
) -> nn.Module:
    """Give every meta parameter of `module` its random values (`random_values`), made on
    `init_device` (default `device`) one parameter at a time and moved to `device` (into a tensor
    carved from `arena` when given: host memory); tied parameters stay tied. Buffers move to
    `device`. Returns `module`."""
    device = torch.device(device)
    init = torch.device(init_device) if init_device is not None else device
    made: dict[int, nn.Parameter] = {}
    for prefix, sub in module.named_modules():
        for local, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                name = f"{prefix}.{local}" if prefix else local
                seed_i = param_seed(seed, component, name)
                values = random_values(name, param.shape, param.dtype, init, seed_i)
                if arena is not None:
                    moved = arena.empty(param.shape, param.dtype).copy_(values)
                else:
                    moved = values.to(device)
                made[id(param)] = nn.Parameter(moved, requires_grad=False)
                del values
            sub._parameters[local] = made[id(param)]
    return module.to(device)  # buffers (the parameters are there already)
