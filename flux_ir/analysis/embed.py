"""Image embeddings for the Lipschitz field: CLIP vision (transformers) or raw pixels; cached.

    emb = ClipEmbedder.tiny()                 # miniature CLIP vision model built in code (tests)
    emb = PixelEmbedder(size=32)              # no weights: the image resized to 32x32, flattened
    vectors = embed_files(emb, paths, cache=sweep_dir / "embeddings" / f"{emb.name}.npz")   # [n, D]

Embedders map a list of PIL images to float32 [B, D] on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from flux_ir.errors import InvalidArgumentError
from flux_ir.io.atomic import atomic_path

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
EMBEDDERS = ("clip", "clip-tiny", "pixel")


class Embedder(Protocol):
    name: str

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


class PixelEmbedder:
    """The RGB image resized (bilinear) to `size` x `size`, scaled to [0, 1], flattened: [B, 3 size^2]."""

    def __init__(self, size: int = 32):
        self.size = size
        self.name = f"pixel{size}"

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = [
            np.asarray(im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR))
            for im in images
        ]
        return torch.from_numpy(
            np.stack(arrays).reshape(len(arrays), -1).astype(np.float32) / 255.0
        )


class ClipEmbedder:
    """CLIP image embeddings (`CLIPVisionModelWithProjection.image_embeds`), L2-normalised: [B, P].

    Pre-processing is CLIP's own (resize shortest edge, centre crop, OpenAI mean/std) through
    `CLIPImageProcessorPil`, which needs no torchvision.
    """

    def __init__(self, model, processor, name: str, device: str = "cpu", normalize: bool = True):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.name = name
        self.device = device
        self.normalize = normalize

    @classmethod
    def from_pretrained(cls, repo: str = DEFAULT_CLIP, device: str = "cpu") -> ClipEmbedder:
        from transformers import CLIPVisionModelWithProjection

        from flux_ir.errors import ModelUnavailableError

        def load(local_only: bool):
            model = CLIPVisionModelWithProjection.from_pretrained(repo, local_files_only=local_only)
            processor = _processor_class().from_pretrained(repo, local_files_only=local_only)
            return model, processor

        try:  # a local directory or the hub's cache first: no network look-up at all
            model, processor = load(local_only=True)
        except Exception as cached_err:  # hub/network errors come in many classes
            err = cached_err
            if not os.environ.get("HF_HUB_OFFLINE"):
                try:
                    model, processor = load(local_only=False)
                    err = None
                except Exception as online_err:
                    err = online_err
            if err is not None:
                raise ModelUnavailableError(
                    f"could not load CLIP {repo!r}: {type(err).__name__}. Download it with network "
                    "access, pass a local directory with --clip_model, or use --embedder pixel (no "
                    "weights)."
                ) from err
        base = repo.rstrip("/").split("/")[-1]
        return cls(model, processor, base if base.startswith("clip") else f"clip-{base}", device)

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32) -> ClipEmbedder:
        """A miniature CLIP vision model with random weights (2 layers, 32 wide), deterministic."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
            projection_dim=16,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPVisionModelWithProjection(config)
        processor = _processor_class()(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
        return cls(model, processor, "clip-tiny")

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixels["pixel_values"].to(self.device, dtype)).image_embeds
        out = out.float()
        if self.normalize:
            out = out / out.norm(dim=-1, keepdim=True)
        return out.cpu()


def _processor_class():
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:  # older transformers: the PIL processor is the default one
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil


def make_embedder(
    kind: str, clip_model: str = DEFAULT_CLIP, device: str = "cpu", pixel_size: int = 32
) -> Embedder:
    check_embedder(kind)
    if kind == "pixel":
        return PixelEmbedder(pixel_size)
    if kind == "clip-tiny":
        return ClipEmbedder.tiny()
    return ClipEmbedder.from_pretrained(clip_model, device)


def check_embedder(kind: str) -> str:
    if kind not in EMBEDDERS:
        raise InvalidArgumentError(
            f"{{param}} {kind!r} is unknown; choose one of {', '.join(EMBEDDERS)}.", "embedder"
        )
    return kind


def embed_files(
    embedder: Embedder,
    paths: Sequence[str | Path],
    cache: str | Path | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Embeddings [len(paths), D] float32 of the image files; rows found in `cache` are not recomputed.

    The cache is an .npz of `files` (names) and `embeddings`, rewritten atomically with the union.
    """
    names = [Path(p).name for p in paths]
    known: dict[str, np.ndarray] = {}
    if cache is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as data:
            known = dict(zip(data["files"].tolist(), data["embeddings"]))
    todo = [i for i, n in enumerate(names) if n not in known]
    for lo in range(0, len(todo), batch_size):
        idx = todo[lo : lo + batch_size]
        images = []
        for i in idx:
            with Image.open(paths[i]) as im:
                images.append(im.convert("RGB"))
        vectors = embedder(images).numpy().astype(np.float32)
        known.update({names[i]: v for i, v in zip(idx, vectors)})
    if cache is not None and todo:
        files = sorted(known)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, files=np.array(files), embeddings=np.stack([known[n] for n in files]))
    return np.stack([known[n] for n in names]) if names else np.zeros((0, 0), np.float32)
