"""The explorer: a local web app over sweeps and capture runs (`flux-ir explore DIR`).

    explorer = Explorer(sweep_dir.parent, device="cpu")   # the folder that holds the sweeps
    server = make_server(explorer, port=0)                 # bound to 127.0.0.1, a free port
    server.server_port > 0                                  # serve_forever() answers the page
    server.server_close(); explorer.close()

Sweeps show as a grid of images on alpha/beta axes with Lipschitz, per-step phase and Fisher
(log10 det g) overlays and the Fisher metric's geodesics; dragging a rectangle generates a zoomed
sub-sweep live with the loaded model (`work`), with back and forward through the zoom levels;
capture runs show the block x step lens viewer and the per-block metrics. The page is plain HTML,
CSS and JavaScript shipped in `static/` (nothing is fetched from the internet); the server is the
standard library's (`server`), bound to localhost by default.
"""

from flux_ir.explorer.server import Explorer, make_server
from flux_ir.explorer.work import ModelHost, ZoomJob, ZoomJobs

__all__ = ["Explorer", "ModelHost", "ZoomJob", "ZoomJobs", "make_server"]
