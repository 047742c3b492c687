"""A capture run on disk: generate, save the capture, decode every block, draw the mosaic.

run_dir = capture_to_dir(pipe, spec, opts, "output")
# output/20260101_120000_flux-dev/img_0.jpg
# output/.../intermediates/capture_20260101_120000_flux-dev.pt  (+ metadata_*.json)
# output/.../intermediates/decoded/double_block_{i}_step_{k}.jpg, single_block_{i}_step_{k}.jpg
# output/.../intermediates/mosaic_x0.jpg
"""

from __future__ import annotations

from pathlib import Path

from diffusers import FluxPipeline
from PIL import ExifTags, Image

from flux_ir.capture import Capture, GenerationOptions, run_capture
from flux_ir.capture.copy import HostCopier
from flux_ir.capture.run import timestamp
from flux_ir.capture.select import Selection
from flux_ir.lens import BlockStep, block_steps, decode_capture
from flux_ir.models import ModelSpec
from flux_ir.plots import labelled_grid
from flux_ir.store import (
    ShardWriter,
    atomic_path,
    load_capture,
    save_capture,
    save_metadata_json,
)


def save_image(image: Image.Image, path: Path, exif: Image.Exif | None = None) -> Path:
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        kwargs = {"quality": 95} if fmt == "JPEG" else {}
        image.save(tmp, format=fmt, exif=exif if exif is not None else Image.Exif(), **kwargs)
    return path


def sampling_exif(model: str, prompt: str) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Software] = "flux-ir"
    exif[ExifTags.Base.Make] = "Black Forest Labs"
    exif[ExifTags.Base.Model] = model
    exif[ExifTags.Base.ImageDescription] = prompt
    return exif


def new_run_dir(output_dir: Path, model_name: str, stamp: str) -> Path:
    base = output_dir / f"{stamp}_{model_name}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    path.mkdir(parents=True)
    return path


def capture_to_dir(
    pipe: FluxPipeline,
    spec: ModelSpec,
    opts: GenerationOptions,
    output_dir: str | Path,
    *,
    decode: bool = True,
    decode_target: str = "x0",
    decode_batch_size: int = 8,
    add_sampling_metadata: bool = True,
    extra_metadata: dict | None = None,
    selection: Selection | None = None,
    copier: HostCopier | None = None,
    store_format: str = "pt",
) -> Path:
    """Run one capture and write the run directory; returns its path.

    `store_format` "pt" writes one `capture_*.pt` at the end; "shards" streams a `capture_*/`
    directory of safetensors shards while generating (host memory bounded by a few steps).
    """
    stamp = timestamp()
    run_kw = dict(
        model_name=spec.name, extra_metadata=extra_metadata, selection=selection, copier=copier
    )
    if store_format == "shards":
        run_dir = new_run_dir(Path(output_dir), spec.name, stamp)
        inter = run_dir / "intermediates"
        writer = ShardWriter(inter / f"capture_{stamp}_{spec.name}")
        try:
            images, cap = run_capture(pipe, opts, sink=writer, **run_kw)
            cap.metadata["run_id"] = run_dir.name
            cap = load_capture(writer.finish(cap))
        except BaseException:
            writer.abort()
            raise
    else:
        images, cap = run_capture(pipe, opts, **run_kw)
        run_dir = new_run_dir(Path(output_dir), spec.name, stamp)
        cap.metadata["run_id"] = run_dir.name
        inter = run_dir / "intermediates"
        save_capture(cap, inter / f"capture_{stamp}_{spec.name}.pt")
    exif = sampling_exif(spec.name, opts.prompt) if add_sampling_metadata else None
    for i, img in enumerate(images):
        save_image(img, run_dir / f"img_{i}.jpg", exif)
    save_metadata_json(cap.metadata, inter / f"metadata_{stamp}_{spec.name}.json")
    if decode:
        decode_to_dir(pipe, cap, inter, target=decode_target, batch_size=decode_batch_size)
    return run_dir


def decode_to_dir(
    pipe: FluxPipeline,
    cap: Capture,
    intermediates_dir: str | Path,
    target: str = "x0",
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Decode every captured (block, step) into `decoded/` and write `mosaic_{target}.jpg`.

    File names: `{kind}_block_{i}_step_{k}.jpg` (first image of the batch; `_b{j}` for the others).
    Returns the mosaic's path.
    """
    inter = Path(intermediates_dir)
    decoded = inter / "decoded"
    decoded.mkdir(parents=True, exist_ok=True)
    items = block_steps(cap)
    thumbs = {}
    for item, images in decode_capture(pipe, cap, items, target, batch_size, progress):
        for j, img in enumerate(images):
            suffix = "" if j == 0 else f"_b{j}"
            save_image(img, decoded / f"{item.name}{suffix}.jpg")
        thumbs[item] = images[0].resize((96, 96))
    rows = [(kind, i) for kind, idx in cap.block_indices.items() for i in idx]
    steps = cap.captured_steps
    grid = labelled_grid(
        [[thumbs.get(BlockStep(kind, i, s)) for s in steps] for kind, i in rows],
        row_labels=[f"{kind} {i}" for kind, i in rows],
        col_labels=[f"step {s}" for s in steps],
        title=f"{cap.metadata['model']} | {cap.metadata['prompt'][:60]} | lens target {target}",
    )
    return save_image(grid, inter / f"mosaic_{target}.jpg")
