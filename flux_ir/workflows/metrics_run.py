"""A capture run's per-block metrics on disk: the table as CSV beside the capture, and heatmaps.

    run_dir = capture_to_dir(pipe, spec, opts, "output")          # decodes every block (x0)
    df = capture_metrics(run_dir)                                  # the lens decodes on disk
    # output/<run>/intermediates/block_metrics.csv, block_metrics/{metric}_{stream}.png

The lens decodes are read from the run's `decoded/` folder (JPEG, as `decode_to_dir` wrote them);
those missing are decoded with `pipe` when one is given (and saved there), else their lens columns
stay NaN. The final image is the run's `img_0.jpg` (the image `image`). With a `scorer`
(`flux_ir.analysis.clip_score.ClipPromptScorer`), the CLIP similarity of each decode to the prompt.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from diffusers import FluxPipeline
from PIL import Image

from flux_ir.analysis.block_metrics import CSV_NAME, Scorer, block_metrics, save_metrics_csv
from flux_ir.io.images import save_image
from flux_ir.lens import BlockStep, LensOptions, decode_capture
from flux_ir.plots.block_metrics import save_metric_heatmaps
from flux_ir.store import load_capture
from flux_ir.workflows.run_dirs import CaptureRun


def metrics_path(run_dir: str | Path) -> Path:
    """Where `capture_metrics` writes the table: `intermediates/block_metrics.csv`."""
    return CaptureRun.open(run_dir).intermediates / CSV_NAME


def capture_metrics(
    run_dir: str | Path,
    pipe: FluxPipeline | None = None,
    *,
    scorer: Scorer | None = None,
    image: int = 0,
    heatmaps: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """Compute the run's metrics table (`flux_ir.analysis.block_metrics`), write it as
    `intermediates/block_metrics.csv` and (with `heatmaps`) `intermediates/block_metrics/*.png`."""
    run = CaptureRun.open(run_dir)
    cap = load_capture(run.capture_path)
    lens = {}
    if cap.streams != "txt" and cap.reduction is None:
        lens = lens_images(run, cap, pipe, image=image, progress=progress)
    final = None
    if run.image_file(image).is_file():
        with Image.open(run.image_file(image)) as im:
            final = im.convert("RGB")
    df = block_metrics(cap, lens_images=lens, final_image=final, scorer=scorer, image=image)
    save_metrics_csv(df, run.intermediates / CSV_NAME)
    if heatmaps:
        save_metric_heatmaps(df, run.intermediates / "block_metrics")
    return df


def lens_images(
    run: CaptureRun,
    cap,
    pipe: FluxPipeline | None = None,
    target: str = "x0",
    image: int = 0,
    progress: bool = False,
) -> dict:
    """{BlockStep: PIL image} of every captured (block, step): from the decoded folder, the missing
    ones decoded with `pipe` (and saved there) when given."""
    suffix = "" if image == 0 else f"_b{image}"
    folder = run.decoded_dir(target)
    found, missing = {}, []
    for item in run.items():
        path = folder / f"{item.name}{suffix}.jpg"
        if path.is_file():
            with Image.open(path) as im:
                found[item] = im.convert("RGB")
        else:
            missing.append(item)
    if missing and pipe is not None:
        decoded = decode_missing(run, pipe, missing, target, cap=cap, progress=progress)
        found.update({item: images[image] for item, images in decoded.items()})
    return found


def decode_missing(
    run: CaptureRun,
    pipe: FluxPipeline,
    items: list[BlockStep],
    target: str = "x0",
    *,
    cap=None,
    progress: bool = False,
) -> dict[BlockStep, list]:
    """Lens-decode `items` of the run's capture with `pipe` and save them in its decoded folder
    (as `decode_to_dir` names them); returns {item: [PIL image per batch element]}."""
    cap = load_capture(run.capture_path) if cap is None else cap
    lens = LensOptions(target)
    folder = run.decoded_dir(target)
    out = {}
    for item, images in decode_capture(pipe, cap, items, lens.target, lens.batch_size, progress):
        for j, img in enumerate(images):
            save_image(img, folder / f"{item.name}{'' if j == 0 else f'_b{j}'}.jpg")
        out[item] = images
    return out
