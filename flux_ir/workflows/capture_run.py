"""A capture run on disk: generate, save the capture, decode every block, draw the mosaic.

    run_dir = capture_to_dir(pipe, spec, opts, "output")
    # output/20260101_120000_flux-tiny/img_0.jpg
    # output/.../intermediates/capture_20260101_120000_flux-tiny.pt  (+ metadata_*.json)
    # output/.../intermediates/decoded/double_block_{i}_step_{k}.jpg, single_block_{i}_step_{k}.jpg
    # output/.../intermediates/mosaic_x0.jpg

Every file is written under a temporary name and renamed, so a file that looks complete is. Before
writing, temporaries that killed runs left in the output directory's run directories are removed; a
run whose capture cannot be saved (the disk is full...) leaves no run directory behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from diffusers import FluxPipeline

from flux_ir.capture import Capture, CaptureOptions, run_capture
from flux_ir.capture.copy import HostCopier
from flux_ir.capture.run import timestamp
from flux_ir.capture.select import Selection
from flux_ir.errors import InvalidArgumentError
from flux_ir.io.atomic import is_temporary, remove_stale_temporaries
from flux_ir.io.images import sampling_exif, save_image
from flux_ir.lens import LensOptions, decode_capture
from flux_ir.models import ModelSpec
from flux_ir.plots import lens_grid
from flux_ir.store import ShardWriter, load_capture, save_capture, save_metadata_json

FORMATS = ("pt", "shards")
X0_LENS = LensOptions()  # the default decoding: x0, batches of 8


def new_run_dir(output_dir: Path, model_name: str, stamp: str) -> Path:
    base = output_dir / f"{stamp}_{model_name}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    path.mkdir(parents=True)
    return path


def run_dir_tree(output_dir: Path) -> list[Path]:
    """Where capture runs write under `output_dir`: it, each run directory, their `intermediates/`
    and its `decoded*/` directories (hidden entries are not run directories)."""
    if not output_dir.is_dir():
        return []
    out = [output_dir]
    for run in [p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]:
        inter = run / "intermediates"
        out += [run, inter]
        if inter.is_dir():
            out += [p for p in inter.glob("decoded*") if p.is_dir()]
    return out


def remove_if_incomplete(run_dir: Path) -> None:
    """Delete a run directory that holds no complete file (only directories and temporaries)."""
    if not run_dir.is_dir():
        return
    for p in run_dir.rglob("*"):
        parts = p.relative_to(run_dir).parts
        if p.is_file() and not any(is_temporary(part) for part in parts):
            return
    shutil.rmtree(run_dir, ignore_errors=True)


@dataclass(frozen=True)
class CaptureRunOptions:
    """What a capture run writes besides the images: `selection` (what to record), `decode` (lens
    decodes and the mosaic; None: off; the lens needs every image token), `store_format` ("pt": one
    `capture_*.pt` at the end; "shards": a `capture_*/` directory of safetensors shards streamed while
    generating, host memory bounded by a few steps) and `add_sampling_metadata` (the prompt in EXIF)."""

    selection: Selection = field(default_factory=Selection)
    decode: LensOptions | None = field(default_factory=LensOptions)
    store_format: str = "pt"
    add_sampling_metadata: bool = True

    def __post_init__(self) -> None:
        if self.store_format not in FORMATS:
            raise InvalidArgumentError(
                f"{{param}} {self.store_format!r}: choose one of {', '.join(FORMATS)}",
                "store_format",
            )
        sel = self.selection
        if self.decode is not None and (sel.streams == "txt" or sel.reduce is not None):
            raise InvalidArgumentError(
                "the lens needs every image token: with streams txt or a reduction, turn {param} off.",
                "decode",
            )


def capture_to_dir(
    pipe: FluxPipeline,
    spec: ModelSpec,
    opts: CaptureOptions,
    output_dir: str | Path,
    run: CaptureRunOptions | None = None,
    *,
    copier: HostCopier | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Run one capture and write the run directory (layout in the module docstring); returns its path."""
    run = run or CaptureRunOptions()
    selection, store_format, decode = run.selection, run.store_format, run.decode
    stamp = timestamp()
    run_kw = dict(
        model_name=spec.name, extra_metadata=extra_metadata, selection=selection, copier=copier
    )
    output_dir = Path(output_dir)
    remove_stale_temporaries(*run_dir_tree(output_dir))  # leftovers of killed runs
    if store_format == "shards":
        run_dir = new_run_dir(output_dir, spec.name, stamp)
        inter = run_dir / "intermediates"
        try:
            writer = ShardWriter(inter / f"capture_{stamp}_{spec.name}")
            try:
                images, cap = run_capture(pipe, opts, sink=writer, **run_kw)
                cap.metadata["run_id"] = run_dir.name
                cap = load_capture(writer.finish(cap))
            except BaseException:
                writer.abort()
                raise
        except BaseException:
            remove_if_incomplete(run_dir)
            raise
    else:
        images, cap = run_capture(pipe, opts, **run_kw)
        run_dir = new_run_dir(output_dir, spec.name, stamp)
        cap.metadata["run_id"] = run_dir.name
        inter = run_dir / "intermediates"
        try:
            save_capture(cap, inter / f"capture_{stamp}_{spec.name}.pt")
        except BaseException:
            remove_if_incomplete(run_dir)
            raise
    exif = sampling_exif(spec.name, opts.sampling.prompt) if run.add_sampling_metadata else None
    for i, img in enumerate(images):
        save_image(img, run_dir / f"img_{i}.jpg", exif)
    save_metadata_json(cap.metadata, inter / f"metadata_{stamp}_{spec.name}.json")
    if decode is not None:
        decode_to_dir(pipe, cap, inter, decode)
    return run_dir


def decode_to_dir(
    pipe: FluxPipeline,
    cap: Capture,
    intermediates_dir: str | Path,
    lens: LensOptions = X0_LENS,
    progress: bool = True,
) -> Path:
    """Decode every captured (block, step) into `decoded/` (target x0) or `decoded_next/` and write
    `mosaic_{target}.jpg`; decodes of different targets never overwrite each other.

    File names: `{kind}_block_{i}_step_{k}.jpg` (first image of the batch; `_b{j}` for the others).
    Returns the mosaic's path.
    """
    inter = Path(intermediates_dir)
    target = lens.target
    # the folder is made by the first save: a refused model leaves nothing behind
    decoded = inter / ("decoded" if target == "x0" else f"decoded_{target}")
    thumbs = {}
    for item, images in decode_capture(pipe, cap, None, target, lens.batch_size, progress):
        for j, img in enumerate(images):
            suffix = "" if j == 0 else f"_b{j}"
            save_image(img, decoded / f"{item.name}{suffix}.jpg")
        thumbs[item] = images[0]
    return save_image(lens_grid(cap, thumbs, target), inter / f"mosaic_{target}.jpg")
