"""flux-toy: a small FLUX-architecture model trained on shape scenes, shipped with the package.

    pipe = load_toy_pipeline()              # weights from the package (or $FLUX_IR_TOY_WEIGHTS)
    opts = SamplingOptions.from_spec(REGISTRY["flux-toy"], prompt="a red circle on a blue background")
    image = generate(pipe, opts, seed=0).images[0]          # 128x128, 16 steps, true CFG 2

Same classes as FLUX.1: `FluxTransformer2DModel` (double + single blocks), a 16-channel
`AutoencoderKL` with 8x downsampling whose scaling/shift factors come from its training data, CLIP
(pooled) and T5 (sequence) text encoders with in-code tokenizers, `FlowMatchEulerDiscreteScheduler`.
No guidance embedding (like FLUX.1-schnell). `build_toy_pipeline` builds the architecture with random
weights (training starts there); `load_toy_pipeline` fills it from safetensors files written by
`flux_ir.toy.train` (`train_toy.py`), so loading never runs pickled code and needs no network.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from safetensors.torch import load_model
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from flux_ir.errors import ModelUnavailableError
from flux_ir.models.tiny import assemble_pipeline, build_clip_tokenizer

WEIGHTS_ENV = "FLUX_IR_TOY_WEIGHTS"
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "toy_weights"
# each toy model: (environment variable naming another weights directory, the package's directory)
TOY_MODELS: dict[str, tuple[str, Path]] = {
    "flux-toy": (WEIGHTS_ENV, PACKAGE_WEIGHTS),
    "flux-toy-2": ("FLUX_IR_TOY2_WEIGHTS", Path(__file__).resolve().parent / "toy2_weights"),
}
CONFIG_FILE = "toy.json"
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")

# Words of the scene captions: the T5 tokenizer keeps each as one piece (others fall back to letters).
WORDS = (
    "a an the on of and in with background shape circle square triangle "
    "red green blue yellow purple white orange black gray pink"
).split()
# flux-toy-2's captions add these (its tokenizer lists them after the first model's words, so the
# first model's word embeddings carry over by piece)
WORDS_2 = (
    WORDS
    + (
        "star cross hexagon circles squares triangles stars crosses hexagons shapes "
        "small large plain striped dotted left above two three"
    ).split()
)

# Architecture (JSON-able; the shipped toy.json records the one its weights belong to).
ARCH: dict = {
    "sample_size": 128,
    "transformer": dict(
        patch_size=1,
        in_channels=64,
        num_layers=4,
        num_single_layers=8,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=[8, 12, 12],
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 64, 128, 128],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=16,
        sample_size=128,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    "clip": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=64,
    ),
    "t5": dict(
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=16,
        dense_act_fn="gelu_new",
        feed_forward_proj="gated-gelu",
        is_gated_act=True,
        dropout_rate=0.0,
    ),
    "scheduler": dict(num_train_timesteps=1000, shift=2.0, use_dynamic_shifting=False),
    "max_sequence_length": 16,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}

# flux-toy-2: the first model's width, 6 double and 12 single blocks (the first model's blocks and
# copies of them, grown function-preserving), captions up to 24 T5 tokens and 128 CLIP bytes.
ARCH_2: dict = {
    **ARCH,
    "vocabulary": 2,
    "transformer": {**ARCH["transformer"], "num_layers": 6, "num_single_layers": 12},
    "clip": {**ARCH["clip"], "max_position_embeddings": 128},
    "max_sequence_length": 24,
}

# A smaller architecture of the same shape, for CPU smoke runs and tests.
SMOKE_ARCH: dict = {
    **ARCH,
    "sample_size": 64,
    "transformer": {**ARCH["transformer"], "num_layers": 2, "num_single_layers": 2},
    "vae": {
        **ARCH["vae"],
        "block_out_channels": [16, 16, 32, 32],
        "norm_num_groups": 8,
        "sample_size": 64,
    },
}
SMOKE_ARCH_2: dict = {
    **SMOKE_ARCH,
    "vocabulary": 2,
    "transformer": {**SMOKE_ARCH["transformer"], "num_layers": 3, "num_single_layers": 3},
    "clip": ARCH_2["clip"],
    "max_sequence_length": ARCH_2["max_sequence_length"],
}


def build_t5_word_tokenizer(max_length: int = 16, words: list[str] | None = None) -> T5Tokenizer:
    """Unigram tokenizer with T5's special tokens: caption words (`words`, default flux-toy's) are
    single pieces, others spelled."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    pieces += [("\u2581" + w, -1.0) for w in (WORDS if words is None else words)]
    alphabet = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -6.0) for c in alphabet] + [("\u2581" + c, -5.0) for c in alphabet]
    first = {}  # one entry per piece: a caption word keeps its word score
    for piece, score in pieces:
        first.setdefault(piece, score)
    pieces = list(first.items())
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def build_toy_pipeline(arch: dict | None = None, seed: int = 0) -> FluxPipeline:
    """flux-toy's architecture (or `arch`, e.g. ARCH_2) on the CPU in float32 with random (seeded)
    weights, in eval mode."""
    arch = ARCH if arch is None else arch
    clip_tok = build_clip_tokenizer()
    # CLIP reads bytes: longer captions need more positions (FluxPipeline pads to this length)
    clip_tok.model_max_length = arch["clip"].get("max_position_embeddings", 77)
    words = WORDS_2 if arch.get("vocabulary", 1) == 2 else WORDS
    t5_tok = build_t5_word_tokenizer(arch["max_sequence_length"], words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**arch["transformer"])
        vae = AutoencoderKL(
            **arch["vae"],
            scaling_factor=float(arch["scaling_factor"]),
            shift_factor=float(arch["shift_factor"]),
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                **arch["clip"],
                vocab_size=len(clip_tok),
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                **arch["t5"],
                vocab_size=len(t5_tok),
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
                decoder_start_token_id=0,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(**arch["scheduler"])
    return assemble_pipeline(scheduler, vae, clip, clip_tok, t5, t5_tok, transformer)


def toy_weights_dir(weights_dir: str | Path | None = None, name: str = "flux-toy") -> Path:
    """The weights directory of toy model `name`: the argument, else its environment variable
    ($FLUX_IR_TOY_WEIGHTS, $FLUX_IR_TOY2_WEIGHTS), else the package's own."""
    if weights_dir is None:
        env, package = TOY_MODELS[name]
        weights_dir = os.environ.get(env) or package
    return Path(weights_dir).expanduser()


def has_toy_weights(weights_dir: str | Path | None = None, name: str = "flux-toy") -> bool:
    d = toy_weights_dir(weights_dir, name)
    return (d / CONFIG_FILE).is_file() and all(
        (d / f"{c}.safetensors").is_file() for c in COMPONENTS
    )


def read_toy_config(weights_dir: str | Path | None = None, name: str = "flux-toy") -> dict:
    """The `toy.json` beside the weights: architecture, VAE scaling/shift, training record."""
    return json.loads((toy_weights_dir(weights_dir, name) / CONFIG_FILE).read_text())


def load_toy_pipeline(
    weights_dir: str | Path | None = None, name: str = "flux-toy"
) -> FluxPipeline:
    """Toy model `name` (flux-toy or flux-toy-2) on the CPU in float32 from safetensors files (no
    pickle, no network); `weights_dir` overrides where they come from.

    Raises ModelUnavailableError naming the training script when the weights are absent.
    """
    if name not in TOY_MODELS:
        raise ModelUnavailableError(
            f"{name!r} is no toy model; toy models: {', '.join(TOY_MODELS)}"
        )
    d = toy_weights_dir(weights_dir, name)
    if not has_toy_weights(d):
        missing = [f"{c}.safetensors" for c in COMPONENTS] + [CONFIG_FILE]
        env = TOY_MODELS[name][0]
        how = (
            f"`python train_toy.py --out {d}` (one GPU, about 20 minutes)"
            if name == "flux-toy"
            else f"`python train_toy.py --world 2 --out {d}` (one GPU, about 15 minutes)"
        )
        raise ModelUnavailableError(
            f"{name} weights not found in {d} (needs {', '.join(missing)}). Train them with "
            f"{how}, or point ${env} at a directory holding them; meanwhile --model flux-tiny "
            "runs offline."
        )
    config = read_toy_config(d)
    pipe = build_toy_pipeline(config["arch"])
    modules = {
        "transformer": pipe.transformer,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    for name, module in modules.items():
        # tied tensors (T5's shared embedding) are stored once; float16 files load into float32
        load_model(module, str(d / f"{name}.safetensors"), strict=True)
    return pipe
