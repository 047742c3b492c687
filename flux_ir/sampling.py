"""Sampling: what to generate (`SamplingOptions`) and the one call of the diffusers pipeline (`generate`).

    pipe, spec = load_pipeline("flux-toy")
    opts = SamplingOptions.from_spec(spec, prompt="a red circle on a blue background")
    images = generate(pipe, opts, seed=1).images                    # a list of PIL images
    emb = encode_prompt(pipe, opts)                                 # text encoders once, then
    packed = pack_latents(torch.randn(2, *opts.latent_shape))       # noise of your own, [2, N, 64]
    out = generate(pipe, opts, embeddings=emb, latents=packed, output_type="latent")  # many calls

Every part of flux-ir that samples (capture, sweeps, flux-toy's quality bars, the benchmarks) calls
`generate`, so a sampling option lives in three places: a field of `SamplingOptions` (validated in its
constructor), its keyword in `generate`, and its flag in the command lines that offer it.

Noise comes from CPU generators seeded per call (`seed=7`) or per image (`seed=[7, 8]`), so a seed gives
the same image on any device; packed `latents` [B, N, 64] replace the noise. Models without a guidance
embedding (schnell, flux-toy) ignore `guidance`; true classifier-free guidance (two transformer passes
per step, the conditional first) runs when `true_cfg_scale` > 1 and a negative prompt is set.
`scheduler` names the solver (`flux_ir.models.schedulers`); `generate` puts it in the pipeline, which
keeps it after the call, so `pipe.scheduler.sigmas` describe the last call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import check_size, latent_shape, token_grid

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline

    from flux_ir.models.registry import ModelSpec

DEFAULT_PROMPT = "a beautiful landscape"
DEFAULT_SIZE = 256  # pixels, for models without a native size (flux-toy's is 128)
MAX_T5_LENGTH = 512  # FluxPipeline refuses longer T5 sequences
DEFAULT_GUIDANCE = 3.5  # diffusers' default for models with a guidance embedding
OUTPUT_TYPES = ("pil", "pt", "np", "latent")


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample one image (or a batch of them) from a FLUX pipeline.

    prompt: the text prompt. width, height: pixels, multiples of 16. num_steps: denoising steps.
    guidance: distilled guidance scale (None: the model's default; ignored without a guidance
    embedding). negative_prompt, true_cfg_scale: true classifier-free guidance when scale > 1 and a
    negative prompt is set. max_sequence_length: T5 tokens (1 to 512). scheduler: how a step
    combines the model's outputs, on FLUX's noise levels: "euler" (FLUX's own), "dpm++2m",
    "dpm++3m" or "unipc" (`flux_ir.models.schedulers`).

    Build it from a model's spec to get that model's defaults, then override what differs:

    >>> from flux_ir.models import resolve_model
    >>> opts = SamplingOptions.from_spec(resolve_model("flux-toy"), prompt="a red circle")
    >>> opts.width, opts.num_steps, opts.true_cfg_scale, opts.negative_prompt, opts.true_cfg
    (128, 16, 2.0, '', True)
    >>> SamplingOptions.from_spec(resolve_model("flux-toy"), width=100)
    Traceback (most recent call last):
    ...
    flux_ir.errors.InvalidArgumentError: width must be a positive multiple of 16 (8x VAE downsampling and 2x2 patch packing), got 100; try 96 or 112.
    """

    prompt: str
    width: int
    height: int
    num_steps: int
    max_sequence_length: int
    guidance: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    scheduler: str = "euler"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidArgumentError(
                f"{{param}} must be text, got {type(self.prompt).__name__} {self.prompt!r}",
                "prompt",
            )
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InvalidArgumentError(
                f"{{param}} must be text or None, got {self.negative_prompt!r}", "negative_prompt"
            )
        check_size(self.width, "width")
        check_size(self.height, "height")
        _positive_int(self.num_steps, "num_steps", "denoising steps")
        _positive_int(self.max_sequence_length, "max_sequence_length", "T5 tokens")
        if self.max_sequence_length > MAX_T5_LENGTH:
            raise InvalidArgumentError(
                f"{{param}} must be at most {MAX_T5_LENGTH} T5 tokens, got {self.max_sequence_length}",
                "max_sequence_length",
            )
        if self.guidance is not None:
            object.__setattr__(self, "guidance", _number(self.guidance, "guidance"))
        scale = _number(self.true_cfg_scale, "true_cfg_scale")
        if scale < 1.0:
            raise InvalidArgumentError(
                f"{{param}} must be >= 1 (1 turns true CFG off), got {scale}", "true_cfg_scale"
            )
        object.__setattr__(self, "true_cfg_scale", scale)
        from flux_ir.models.schedulers import check_scheduler

        check_scheduler(self.scheduler)

    @classmethod
    def from_spec(cls, spec: ModelSpec, **overrides: Any) -> SamplingOptions:
        """The model's defaults (prompt, size, steps, guidance, T5 length, true CFG) with `overrides` on top;
        an override of None keeps the default. Unknown names are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidArgumentError(
                f"unknown sampling option(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}",
                unknown[0],
            )
        size = spec.size or DEFAULT_SIZE
        base = dict(
            prompt=spec.prompt or DEFAULT_PROMPT,
            width=size,
            height=size,
            num_steps=spec.num_steps,
            max_sequence_length=spec.max_sequence_length,
            guidance=spec.guidance,
            negative_prompt=spec.negative_prompt,
            true_cfg_scale=spec.true_cfg_scale,
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def true_cfg(self) -> bool:
        """Whether a second (unconditional) pass runs each step: scale > 1 and a negative prompt."""
        return self.true_cfg_scale > 1.0 and self.negative_prompt is not None

    @property
    def passes_per_step(self) -> int:
        return 2 if self.true_cfg else 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(16, H/8, W/8)."""
        return latent_shape(self.height, self.width)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(H/16, W/16) image tokens."""
        return token_grid(self.height, self.width)

    def to_dict(self) -> dict:
        return asdict(self)


def _positive_int(value, param: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(
            f"{{param}} must be a positive integer ({what}), got {value!r}", param
        )
    return value


def _number(value, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(f"{{param}} must be a finite number, got {value!r}", param)
    return float(value)


def effective_guidance(pipe: FluxPipeline, guidance: float | None) -> float | None:
    """The guidance the transformer sees: None without a guidance embedding (schnell, flux-toy),
    else `guidance` (3.5 when None)."""
    if not pipe.transformer.config.guidance_embeds:
        return None
    return DEFAULT_GUIDANCE if guidance is None else float(guidance)


@dataclass
class PromptEmbeddings:
    """Text conditioning encoded once: T5 sequence [1, L, D_t5] and CLIP pooled [1, P] (and the
    negative prompt's, for true CFG). `repeat(B)` gives `generate`'s keywords for a batch of B."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    _repeated: dict = field(default_factory=dict, repr=False)

    def repeat(self, batch: int) -> dict[str, torch.Tensor | None]:
        """Pipeline keyword arguments for a batch of `batch` images (made once per batch size)."""

        def rep(x):
            return None if x is None else x.repeat(batch, *[1] * (x.dim() - 1))

        if batch not in self._repeated:
            self._repeated[batch] = {
                "prompt_embeds": rep(self.prompt_embeds),
                "pooled_prompt_embeds": rep(self.pooled_prompt_embeds),
                "negative_prompt_embeds": rep(self.negative_prompt_embeds),
                "negative_pooled_prompt_embeds": rep(self.negative_pooled_prompt_embeds),
            }
        return dict(self._repeated[batch])


def encode_prompt(pipe: FluxPipeline, opts: SamplingOptions) -> PromptEmbeddings:
    """Run the text encoders once for `opts.prompt` (and its negative prompt when true CFG is on)."""
    import torch

    with torch.inference_mode():
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=opts.prompt, prompt_2=None, max_sequence_length=opts.max_sequence_length
        )
        emb = PromptEmbeddings(embeds, pooled)
        if opts.true_cfg:
            neg, neg_pooled, _ = pipe.encode_prompt(
                prompt=opts.negative_prompt,
                prompt_2=None,
                max_sequence_length=opts.max_sequence_length,
            )
            emb.negative_prompt_embeds, emb.negative_pooled_prompt_embeds = neg, neg_pooled
    return emb


def generate(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    *,
    seed: int | Sequence[int] | None = None,
    latents: torch.Tensor | None = None,
    embeddings: PromptEmbeddings | None = None,
    prompts: Sequence[str] | None = None,
    num_images: int = 1,
    callback: Callable | None = None,
    output_type: str = "pil",
    progress: bool | None = None,
):
    """Sample with `pipe` as `opts` says: the one place flux-ir calls a diffusers pipeline.

    Args:
        seed: one CPU generator for the batch (int) or one per image (a list); not needed with `latents`.
        latents: packed initial latents [B, N, 64] (the noise), on the pipeline's device and dtype.
        embeddings: prompt embeddings from `encode_prompt` (the text encoders are skipped); the batch
            is `latents`' (or `num_images`).
        prompts: a batch of prompts, one image each, instead of `opts.prompt` (same other settings).
        num_images: images per prompt (with `latents` and one prompt: the latents' batch).
        callback: diffusers' `callback_on_step_end(pipe, step, timestep, kwargs) -> dict`.
        output_type: "pil" (list of images), "pt" ([B, 3, H, W] in [0, 1]), "np" or "latent"
            (packed latents [B, N, 64]).
        progress: show a denoising progress bar (tqdm.auto, so it renders in notebooks too) for
            this call; None keeps the pipeline's own setting.

    Returns diffusers' `FluxPipelineOutput` (`.images`).
    """
    import torch

    from flux_ir.models.schedulers import use_scheduler

    if output_type not in OUTPUT_TYPES:
        raise InvalidArgumentError(
            f"{{param}} must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}",
            "output_type",
        )
    if latents is not None and embeddings is None:
        per_prompt = 1 if prompts is None else len(prompts)
        if prompts is None and num_images == 1:
            num_images = latents.shape[0]  # one image per latent
        if latents.shape[0] != per_prompt * num_images:
            raise InvalidArgumentError(
                f"{{param}} hold {latents.shape[0]} images but {per_prompt} prompt(s) x "
                f"{num_images} image(s) were asked for",
                "latents",
            )
    guidance = effective_guidance(pipe, opts.guidance)
    kwargs: dict[str, Any] = dict(
        width=opts.width,
        height=opts.height,
        num_inference_steps=opts.num_steps,
        guidance_scale=0.0 if guidance is None else guidance,
        true_cfg_scale=opts.true_cfg_scale if opts.true_cfg else 1.0,
        max_sequence_length=opts.max_sequence_length,
        latents=latents,
        callback_on_step_end=callback,
        output_type=output_type,
    )
    if embeddings is not None:
        kwargs.update(embeddings.repeat(num_images if latents is None else latents.shape[0]))
    elif prompts is not None:
        prompts = list(prompts)
        kwargs["prompt"] = prompts
        if opts.true_cfg:
            kwargs["negative_prompt"] = [opts.negative_prompt] * len(prompts)
        kwargs["num_images_per_prompt"] = num_images
    else:
        kwargs["prompt"] = opts.prompt
        if opts.true_cfg:
            kwargs["negative_prompt"] = opts.negative_prompt
        kwargs["num_images_per_prompt"] = num_images
    if embeddings is None:
        for text in dict.fromkeys([opts.prompt] if prompts is None else prompts):
            note_truncation(pipe, text, opts.max_sequence_length)
    use_scheduler(pipe, opts.scheduler)  # the pipeline keeps it: its sigmas describe this call
    if isinstance(seed, int):
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    elif seed is not None:
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(int(s)) for s in seed]
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    if progress is not None:
        pipe.set_progress_bar_config(disable=not progress, desc="denoising", leave=False)
    try:
        with torch.inference_mode():
            return pipe(**kwargs)
    finally:
        pipe.set_progress_bar_config(**saved)


_NOTED: set[tuple[int, str, int]] = set()


def note_truncation(pipe: FluxPipeline, prompt: str, max_sequence_length: int) -> None:
    """Say once, in words, when the T5 encoder will read only the start of `prompt` (diffusers'
    own message lists the cut-off token pieces, which a small vocabulary spells letter by letter)."""
    tokenizer = getattr(pipe, "tokenizer_2", None)
    key = (id(tokenizer), prompt, max_sequence_length)
    if tokenizer is None or key in _NOTED:
        return
    _NOTED.add(key)
    ids = tokenizer(prompt, truncation=True, max_length=max_sequence_length + 1).input_ids
    if len(ids) <= max_sequence_length:
        return
    kept = tokenizer.decode(ids[: max_sequence_length - 1], skip_special_tokens=True)
    warnings.warn(
        f"the prompt is longer than the {max_sequence_length} T5 tokens the model reads: it sees "
        f"{kept!r} (words outside the tokenizer's vocabulary take one token per letter)",
        stacklevel=3,
    )
