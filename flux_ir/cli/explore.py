"""`flux-ir explore`: the explorer, a local web app over sweeps and capture runs."""

from __future__ import annotations

from flux_ir.cli import flags


@flags()
def explore(
    dir: str,
    port: int = 8765,
    host: str = "127.0.0.1",
    model: str | None = None,
    device: str | None = None,
    batch_size: int = 4,
    embedder: str = "pixel",
    clip_model: str = "openai/clip-vit-large-patch14",
    open_browser: bool = False,
) -> None:
    """Serve the explorer for the sweeps and capture runs in DIR, on http://HOST:PORT/, until Ctrl-C.

    Sweeps show as a grid of images on alpha/beta axes with their Lipschitz field, per-step phase
    maps and, after `flux-ir geometry`, the Fisher metric's det g and geodesics; dragging a
    rectangle generates a zoomed sub-sweep over that range with the model (stored beside the sweep
    and linked to it), with back and forward through the zoom levels. Capture runs show the block x
    step lens viewer and the per-block metrics. The model loads on first use.

    Args:
        dir: a folder of sweeps and capture runs, or one sweep or run (then the folder holding it is
            served, so that zoomed sweeps can be written beside it).
        port: the port to serve on (0: any free port).
        host: the address to bind: 127.0.0.1 (only this machine) unless you mean to share it; the
            explorer has no authentication.
        model: the model for zooms and lens decodes (default: the one each sweep or capture names).
        device: cuda, cuda:N or cpu for that model (default: cuda when available).
        batch_size: images per pipeline call of a zoom (smaller: images appear sooner).
        embedder: the embedder of a zoomed sweep's Lipschitz field: pixel (no weights), clip-tiny
            or clip (--clip_model); with clip, the capture metrics also score each lens decode's
            CLIP similarity to the prompt.
        clip_model: hub id or local directory of the CLIP model for --embedder clip.
        open_browser: open the page in the default web browser.
    """
    import threading
    import webbrowser
    from pathlib import Path

    from flux_ir.analysis.embed import check_embedder
    from flux_ir.errors import InvalidArgumentError
    from flux_ir.explorer import Explorer, make_server
    from flux_ir.workflows.run_dirs import run_kind

    folder = Path(dir).expanduser()
    if not folder.is_dir():
        raise InvalidArgumentError(f"{{param}} {dir} is not a directory", "dir")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"{{param}} must be a port number 0-65535, got {port!r}", "port")
    check_embedder(embedder)
    kind = run_kind(folder)
    root = folder.resolve().parent if kind is not None else folder
    explorer = Explorer(
        root,
        model=model,
        device=device,
        batch_size=batch_size,
        embedder=embedder,
        clip_model=clip_model,
    )
    try:
        server = make_server(explorer, host, port)
    except OSError as err:
        raise InvalidArgumentError(
            f"cannot serve on {host}:{port} ({err.strerror}); choose another {{param}}", "port"
        ) from err
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/"
    if kind is not None:
        url += f"#{kind}={folder.resolve().name}"
    print(f"serving {explorer.root} on {url}  (Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: bound to {host}: anyone who can reach it can read these files", flush=True)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, [url]).start()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        explorer.close()
