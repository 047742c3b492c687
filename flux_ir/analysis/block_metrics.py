"""Per-block metrics of a capture, one row per (block, step, stream), as a pandas DataFrame.

    df = block_metrics(cap)                      # from the capture alone: norms and cosines
    df[(df.stream == "img") & (df.step == 1)][["name", "norm", "cosine_to_last"]]
    images = {item: ims[0] for item, ims in decode_capture(pipe, cap, progress=False)}
    last = BlockStep("single", cap.block_indices["single"][-1], cap.captured_steps[-1])
    df = block_metrics(cap, lens_images=images, final_image=images[last])   # + lens_distance

Columns: `kind` ("double" or "single"), `block` (its index), `name` ("single 3"), `depth` (0 for the
first captured double block, rising through the single blocks), `step` (denoising step), `stream`
("img" or "txt"), and

- `norm`: the mean over tokens of each token's L2 norm of the block's output;
- `cosine_to_last`: the mean over tokens of the cosine between the block's output and the last
  captured block's (the deepest: the model's last single block when captured) at the same step and
  stream, so the last block's own rows are 1;
- `lens_distance`: root mean square difference, pixel values in [0, 1], between the block's lens decode
  and the final image (image-token rows only; NaN where no decode was given);
- `clip_to_prompt`: the cosine between CLIP's embeddings of the lens decode and of the prompt, when a
  scorer (`flux_ir.analysis.clip_score.ClipPromptScorer`) is given (NaN otherwise).

Everything is computed for one image of the batch (`image`, default 0), from the conditional pass (a
true-CFG capture's unconditional pass is left out), in float32 on the CPU. Captures without every
image token (`--streams txt`, `--reduce`) give rows for the streams they hold; the lens columns
then stay NaN. `df.attrs` records the last block, the prompt and the scorer's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from flux_ir.capture.schema import KINDS, Capture
from flux_ir.io.atomic import write_text
from flux_ir.lens.blocks import BlockStep

COLUMNS = (
    "kind", "block", "name", "depth", "step", "stream",
    "norm", "cosine_to_last", "lens_distance", "clip_to_prompt",
)  # fmt: skip
METRICS = ("norm", "cosine_to_last", "lens_distance", "clip_to_prompt")
STREAMS = ("img", "txt")
CSV_NAME = "block_metrics.csv"

ImageLike = Image.Image | np.ndarray
Scorer = Callable[[Sequence[ImageLike], str], np.ndarray]


def block_metrics(
    cap: Capture,
    *,
    lens_images: Mapping[BlockStep, ImageLike] | None = None,
    final_image: ImageLike | None = None,
    scorer: Scorer | None = None,
    image: int = 0,
) -> pd.DataFrame:
    """The metrics table of `cap` (columns in the module docstring), rows in depth order, then
    step, then stream. `lens_images` maps (block, step) to its lens decode (PIL, or [H, W, 3] uint8
    or float in [0, 1]); `final_image` is the run's image; `scorer(images, prompt)` gives CLIP
    similarities [len(images)]."""
    items = [(kind, i) for kind in KINDS for i in cap.block_indices[kind]]
    if not items:
        raise ValueError("the capture holds no blocks")
    streams = [s for s in STREAMS if cap.streams in ("both", s)]
    last_kind, last_index = items[-1]
    lens_images = lens_images or {}
    final = None if final_image is None else _pixels(final_image)
    prompt = str(cap.metadata.get("prompt", ""))
    clip: dict[BlockStep, float] = {}
    if scorer is not None and lens_images:
        keys = list(lens_images)
        for lo in range(0, len(keys), 32):
            chunk = keys[lo : lo + 32]
            scores = scorer([lens_images[k] for k in chunk], prompt)
            clip.update({k: float(s) for k, s in zip(chunk, np.asarray(scores))})
    rows = []
    for step in cap.captured_steps:
        last = {s: _tokens(cap, last_kind, last_index, step, s, image) for s in streams}
        for depth, (kind, index) in enumerate(items):
            for stream in streams:
                h = _tokens(cap, kind, index, step, stream, image)  # [tokens, D]
                item = BlockStep(kind, index, step)
                distance = np.nan
                if stream == "img" and final is not None and item in lens_images:
                    distance = lens_distance(_pixels(lens_images[item]), final)
                rows.append(
                    {
                        "kind": kind,
                        "block": index,
                        "name": f"{kind} {index}",
                        "depth": depth,
                        "step": step,
                        "stream": stream,
                        "norm": float(h.norm(dim=-1).mean()),
                        "cosine_to_last": token_cosine(h, last[stream]),
                        "lens_distance": distance,
                        "clip_to_prompt": clip.get(item, np.nan) if stream == "img" else np.nan,
                    }
                )
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = df.sort_values(["depth", "step", "stream"], kind="stable").reset_index(drop=True)
    df.attrs.update(
        last_block=f"{last_kind} {last_index}",
        prompt=prompt,
        scorer=getattr(scorer, "name", None) if scorer is not None else None,
        image=image,
    )
    return df


def _tokens(cap: Capture, kind: str, index: int, step: int, stream: str, image: int):
    get = cap.image_tokens if stream == "img" else cap.text_tokens
    return get(kind, index, step)[image].to(torch.float32)


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of the cosine between rows of a and b [tokens, D] (0 for a zero row)."""
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    cos = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    return float(cos.mean())


def lens_distance(lens: np.ndarray, final: np.ndarray) -> float:
    """Root mean square difference of two images [H, W, 3] in [0, 1] (the final image is resized
    to the lens image's size when they differ)."""
    if lens.shape != final.shape:
        size = (lens.shape[1], lens.shape[0])
        pil = Image.fromarray((final * 255).round().astype(np.uint8))
        final = _pixels(pil.resize(size, Image.Resampling.BILINEAR))
    return float(np.sqrt(np.mean((lens - final) ** 2)))


def _pixels(image: ImageLike) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1] from a PIL image or a uint8 / float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def metric_grid(df: pd.DataFrame, metric: str, stream: str = "img") -> pd.DataFrame:
    """One metric as a table: blocks (in depth order, labelled by name) down, steps across."""
    part = df[df["stream"] == stream]
    table = part.pivot(index="depth", columns="step", values=metric)
    names = part.drop_duplicates("depth").set_index("depth")["name"]
    return table.rename(index=names.to_dict()).rename_axis("block")


def save_metrics_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the table as CSV (atomically); `read_metrics_csv` reads it back."""
    return write_text(path, df.to_csv(index=False, lineterminator="\n"))


def read_metrics_csv(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path)
