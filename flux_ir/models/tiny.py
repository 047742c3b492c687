"""flux-tiny: a miniature FLUX.1 pipeline built in code, with FLUX's exact structure.

    pipe = build_tiny_pipeline()            # deterministic: same seed, same weights everywhere
    opts = SamplingOptions.from_spec(REGISTRY["flux-tiny"], prompt="a cat", width=64, height=64)
    image = generate(pipe, opts, seed=0).images[0]          # noise: the weights are random

Same classes as the real model: `FluxTransformer2DModel` (double + single blocks, 3-axis rotary ids),
a 16-channel `AutoencoderKL` with 8x downsampling (scaling 0.3611, shift 0.1159), CLIP pooled and T5
sequence conditioning from small text encoders whose tokenizers are built in code, and
`FlowMatchEulerDiscreteScheduler` with FLUX.1-dev's resolution-dependent shift. Weights are random.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

# FLUX.1's VAE latent statistics (ae.safetensors config).
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159

TEXT_DIM = 32  # T5 d_model = joint_attention_dim; CLIP hidden = pooled_projection_dim
T5_MAX_LENGTH = 32


def build_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE tokenizer with CLIP's pre-processing and no merges (one token per byte)."""
    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_t5_tokenizer() -> T5Tokenizer:
    """Unigram tokenizer with T5's special tokens over lowercase letters, digits and punctuation."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    alphabet = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -3.0) for c in alphabet] + [("\u2581" + c, -2.5) for c in alphabet]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def assemble_pipeline(scheduler, vae, clip, clip_tok, t5, t5_tok, transformer) -> FluxPipeline:
    """A `FluxPipeline` of these components, each in eval mode without gradients, progress bar off."""
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    for module in (transformer, vae, clip, t5):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_single_layers: int = 4,
    guidance_embeds: bool = True,
) -> FluxPipeline:
    """Build flux-tiny on the CPU in float32. Identical weights for the same arguments.

    Transformer: 2 heads x 16 dims, 64-dim packed tokens in and out, rotary axes (4, 6, 6).
    VAE: 16 latent channels, 8x downsampling. Text: CLIP (pooled, 32) and T5 (sequence, 32 x 32).
    """
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=256,
            scaling_factor=VAE_SCALING_FACTOR,
            shift_factor=VAE_SHIFT_FACTOR,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=TEXT_DIM,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=TEXT_DIM,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=TEXT_DIM,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                dense_act_fn="gelu_new",
                feed_forward_proj="gated-gelu",
                is_gated_act=True,
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
                decoder_start_token_id=0,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return assemble_pipeline(scheduler, vae, clip, clip_tok, t5, t5_tok, transformer)
