"""`flux-ir decode`: apply the block lens to a saved capture, without re-running generation."""

from __future__ import annotations

from pathlib import Path

from flux_ir.cli import flags


@flags()
def decode(
    capture_path: str,
    model: str | None = None,
    target: str = "x0",
    output_dir: str | None = None,
    device: str | None = None,
    offload: bool | str = False,
    batch_size: int = 8,
) -> None:
    """Decode every block of a capture file as the final prediction; write images and the mosaic.

    Args:
        capture_path: a `capture_*.pt` file or a `capture_*/` shard directory.
        model: the model that made it: a registry name or a local FluxPipeline directory (default:
            the one named in the capture's metadata).
        target: "x0" (the clean-image estimate, into decoded/) or "next" (one Euler step, the
            original tool's lens, into decoded_next/).
        output_dir: where the decoded images and the mosaic go (default: beside the capture).
        device: cuda, cuda:N or cpu (default: cuda when available).
        offload: False, True or "model" (diffusers model CPU offload), "sequential" or "group"
            (diffusers group offloading, one block at a time, prefetched on a CUDA stream).
        batch_size: latents per VAE decode call.
    """
    from flux_ir.io.dirs import check_output_dir
    from flux_ir.lens import LensOptions
    from flux_ir.models import LoadOptions, load_pipeline
    from flux_ir.store import load_capture
    from flux_ir.workflows import decode_to_dir

    lens = LensOptions(target, batch_size)
    cap = load_capture(capture_path)
    load = LoadOptions.create(model or cap.metadata["model"], device, offload)
    out = check_output_dir(output_dir if output_dir else Path(capture_path).parent)
    pipe, _ = load_pipeline(load)
    mosaic = decode_to_dir(pipe, cap, out, lens)
    print(
        f"decoded images: {mosaic.parent / ('decoded' if target == 'x0' else 'decoded_' + target)}"
    )
    print(f"mosaic: {mosaic}")
