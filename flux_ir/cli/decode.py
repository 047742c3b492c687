"""`flux-ir decode`: apply the block lens to a saved capture, without re-running generation."""

from __future__ import annotations

from pathlib import Path

from flux_ir.cli.capture import check_device
from flux_ir.lens.decode import check_target
from flux_ir.models import load_pipeline, resolve_model
from flux_ir.models.loading import normalize_offload
from flux_ir.store import load_capture


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
        model: the model that made it (default: the one named in its metadata).
        target: "x0" or "next".
        output_dir: where `decoded/` and the mosaic go (default: beside the capture).
        device, offload, batch_size: as for capture.
    """
    from flux_ir.runs import decode_to_dir

    check_target(target)
    cap = load_capture(capture_path)
    spec = resolve_model(str(model or cap.metadata["model"]))
    device = check_device(device)
    pipe, _ = load_pipeline(spec, device=device, offload=normalize_offload(offload))
    out = Path(output_dir) if output_dir else Path(capture_path).parent
    mosaic = decode_to_dir(pipe, cap, out, target=target, batch_size=batch_size)
    print(f"decoded images: {out / 'decoded'}\nmosaic: {mosaic}")
