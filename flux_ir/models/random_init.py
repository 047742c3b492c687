"""Any registry model in its exact architecture with random weights: no downloads.

    pipe = build_random_pipeline(REGISTRY["flux-dev"], device="meta")   # the shapes alone, at once
    # build_random_pipeline(REGISTRY["flux-dev"], device="cuda", dtype=torch.bfloat16) to run it

Weights are created directly on `device` in `dtype` (12 B transformer parameters take ~0.5 s on an H100),
which is what memory and speed benchmarks need: random weights cost exactly what real ones cost. Their
pixels mean nothing, and in bfloat16 they may overflow to inf/NaN. Tokenizers are flux-tiny's in-code
ones (ids stay inside the real vocabularies).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

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
) -> FluxPipeline:
    """`spec`'s architecture with random weights, built on `device` in `dtype` (use "meta" to inspect).

    flux-tiny is returned as built in code (its weights are random already).
    """
    if spec.source == "builtin":
        return build_tiny_pipeline(seed).to(device=device, dtype=dtype)
    if spec.source == "package":  # flux-toy's architecture, untrained
        arch = ARCH_2 if spec.name == "flux-toy-2" else None
        return build_toy_pipeline(arch, seed=seed).to(device=device, dtype=dtype)
    guidance = spec.guidance is not None
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    old_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            transformer = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=guidance)
            vae = AutoencoderKL(**VAE)
            clip = CLIPTextModel(
                CLIPTextConfig(
                    **CLIP_L,
                    bos_token_id=clip_tok.bos_token_id,
                    eos_token_id=clip_tok.eos_token_id,
                    pad_token_id=clip_tok.pad_token_id,
                )
            )
            t5 = T5EncoderModel(
                T5Config(
                    **T5_XXL, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id
                )
            )
        finally:
            torch.set_default_dtype(old_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, **(SCHEDULER_DEV if guidance else SCHEDULER_SCHNELL)
    )
    return assemble_pipeline(scheduler, vae, clip, clip_tok, t5, t5_tok, transformer)
