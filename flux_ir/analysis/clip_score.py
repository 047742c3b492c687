"""CLIP similarity of images to a prompt: the cosine between CLIP's image and text embeddings.

    scorer = ClipPromptScorer.tiny()          # miniature CLIP (text + vision) built in code (tests)
    red = Image.new("RGB", (64, 64), "red")
    scores = scorer([red, red], "a red circle")   # float32 [2], cosines in [-1, 1]

`ClipPromptScorer.from_pretrained(repo)` loads a real CLIP (`openai/clip-vit-large-patch14` by
default) from a local directory or the hub's cache, as `flux_ir.analysis.embed.ClipEmbedder` does;
its scores are the usual CLIP score divided by 100 (no logit scale, no clipping at 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from flux_ir.analysis.embed import DEFAULT_CLIP, _processor_class
from flux_ir.errors import ModelUnavailableError


class ClipPromptScorer:
    """Cosine similarity between CLIP image embeddings and one prompt's text embedding."""

    def __init__(self, model, tokenizer, processor, name: str, device: str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.device = device
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, repo: str = DEFAULT_CLIP, device: str = "cpu") -> ClipPromptScorer:
        """A CLIP model (text and vision towers) from a local directory or the hub's cache; the
        hub itself only when HF_HUB_OFFLINE is unset. ModelUnavailableError says the ways out."""
        from transformers import AutoTokenizer, CLIPModel

        def load(local_only: bool):
            model = CLIPModel.from_pretrained(repo, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(repo, local_files_only=local_only)
            processor = _processor_class().from_pretrained(repo, local_files_only=local_only)
            return model, tokenizer, processor

        try:
            parts = load(local_only=True)
        except Exception as cached_err:  # hub/network errors come in many classes
            err = cached_err
            if not os.environ.get("HF_HUB_OFFLINE"):
                try:
                    parts, err = load(local_only=False), None
                except Exception as online_err:
                    err = online_err
            if err is not None:
                raise ModelUnavailableError(
                    f"could not load CLIP {repo!r}: {type(err).__name__}. Download it with network "
                    "access or pass a local directory of a CLIP model."
                ) from err
        base = repo.rstrip("/").split("/")[-1]
        return cls(*parts, base if base.startswith("clip") else f"clip-{base}", device)

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32) -> ClipPromptScorer:
        """A miniature CLIP with random weights (2 layers, 32 wide per tower) and flux-tiny's
        byte-level CLIP tokenizer, deterministic: for tests, its scores mean nothing."""
        from transformers import CLIPConfig, CLIPModel

        from flux_ir.models.tiny import build_clip_tokenizer

        tokenizer = build_clip_tokenizer()
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
        config = CLIPConfig(
            text_config=dict(
                **small,
                num_attention_heads=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(**small, num_attention_heads=2, image_size=image_size, patch_size=8),
            projection_dim=16,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
        processor = _processor_class()(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
        return cls(model, tokenizer, processor, "clip-tiny")

    @torch.inference_mode()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """The prompt's L2-normalised text embedding [P] (cached per prompt)."""
        if prompt not in self._text:
            ids = self.tokenizer(
                [prompt], padding="max_length", truncation=True, max_length=77, return_tensors="pt"
            )
            out = self.model.get_text_features(
                input_ids=ids["input_ids"].to(self.device),
                attention_mask=ids["attention_mask"].to(self.device),
            )
            out = _features(out).float()[0]
            self._text[prompt] = (out / out.norm()).cpu()
        return self._text[prompt]

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image | np.ndarray], prompt: str) -> np.ndarray:
        """Cosines [len(images)] float32 between each image's embedding and the prompt's."""
        pil = [_pil(im) for im in images]
        pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        dtype = next(self.model.parameters()).dtype
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, dtype))
        out = _features(out).float().cpu()
        out = out / out.norm(dim=-1, keepdim=True)
        return (out @ self.text_embedding(prompt)).numpy().astype(np.float32)


def _features(out) -> torch.Tensor:
    """`get_*_features` return a tensor, or (newer transformers) an output with `pooler_output`."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _pil(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image from a PIL image, uint8 [H, W, 3] or float [H, W, 3] in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")
