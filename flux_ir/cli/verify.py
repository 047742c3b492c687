"""`flux-ir verify`: check a saved capture against the checksums recorded when it was written."""

from __future__ import annotations

from flux_ir.cli import flags


@flags()
def verify(path: str) -> None:
    """Read every byte of a capture and compare it with the digests recorded when it was written.

    Prints `ok: PATH (N files, M bytes)`. A damaged capture, or one written without checksums (by
    flux-ir 0.1), prints `error: ...` naming the file (and, in a shard directory, the tensor whose
    bytes differ) and exits with status 2.

    Args:
        path: a `capture_*.pt` file (its digest is `capture_*.pt.sha256` beside it) or a `capture_*/`
            shard directory (digests in its manifest.json).
    """
    from flux_ir.store import load_capture, verify_capture

    path = str(path)
    checked = verify_capture(path)
    load_capture(path)  # the bytes are those written: they must still read as a capture
    print(f"ok: {path} ({checked.files} files, {checked.nbytes} bytes)")
