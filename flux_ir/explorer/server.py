"""The explorer's web server: the page (shipped in the package), JSON endpoints and the served files.

    explorer = Explorer(sweep_dir.parent, device="cpu")
    server = make_server(explorer, port=0)           # 127.0.0.1, a free port
    url = f"http://127.0.0.1:{server.server_port}/"   # server.serve_forever() answers requests
    server.server_close(); explorer.close()

Endpoints (GET unless said otherwise; `path` is relative to the served directory):

- `/` and `/static/<file>`: the page, its script and style, from `flux_ir/explorer/static/`;
- `/api/entries`: the sweeps and capture runs; `/api/sweep?path=`, `/api/capture?path=`: one of them
  (a sweep with its Lipschitz and Fisher overlays and geodesics, `flux_ir.explorer.views`);
- `POST /api/zoom` {"sweep", "alpha": [lo, hi], "beta": [lo, hi], "n_alpha", "n_beta"}: starts a
  zoomed sub-sweep, answers {"job", "sweep"}; `/api/job?id=`: its state and the points done;
- `POST /api/analyze` {"sweep"}: the Lipschitz field of a sweep with the explorer's embedder;
- `/api/lens?path=&kind=&index=&step=&target=`: a block's lens decode (JPEG), decoded on first ask;
- `/api/metrics?path=`: a capture's per-block metrics (computed and saved as CSV on first ask);
- `/files/<path>`: images, movies, CSV and JSON files under the served directory.

It binds 127.0.0.1 unless told otherwise, answers only requests addressed to the host it serves
(a web page elsewhere cannot reach it through another name, DNS rebinding), takes POST bodies only as
`application/json` (which other sites cannot send without asking first), refuses paths outside the
served directory (`flux_ir.explorer.safety`) and sends the served files as data with
`X-Content-Type-Options: nosniff` under a Content-Security-Policy that lets the page run its own
script only. Nothing in the served directory is executed: sweeps and captures are read from JSON,
CSV, PNG, .npz and safetensors/weights-only files.
"""

from __future__ import annotations

import email.utils
import json
import math
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from flux_ir.errors import FluxIRError, InvalidArgumentError
from flux_ir.explorer.safety import Forbidden, inside, media_type, relative
from flux_ir.explorer.views import capture_view, list_entries, sweep_view
from flux_ir.explorer.work import ModelHost, ZoomJobs
from flux_ir.workflows.run_dirs import CaptureRun, run_kind

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}  # fmt: skip
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
MAX_BODY = 64 * 1024


class HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class Explorer:
    """The served directory and what the endpoints compute (one instance per server)."""

    def __init__(
        self,
        root: str | Path,
        *,
        model: str | None = None,
        device: str | None = None,
        batch_size: int = 4,
        embedder: str = "pixel",
        clip_model: str | None = None,
    ):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise InvalidArgumentError(f"{{param}} {root} is not a directory", "dir")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(
                f"{{param}} must be a positive integer, got {batch_size!r}", "batch_size"
            )
        self.models = ModelHost(device, model)
        self.jobs = ZoomJobs(
            self.root, self.models, batch_size=batch_size, embedder=embedder, clip_model=clip_model
        )
        self._captures: dict[Path, object] = {}
        self._capture_lock = threading.Lock()

    def close(self) -> None:
        self.jobs.close()

    # -- paths ------------------------------------------------------------------------------------
    def path(self, rel: str, kind: str | None = None) -> Path:
        folder = inside(self.root, rel)
        if kind is not None and run_kind(folder) != kind:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"{rel or '.'} is not a {kind} directory")
        return folder

    # -- endpoints --------------------------------------------------------------------------------
    def entries(self) -> dict:
        return {"root": self.root.name, "entries": list_entries(self.root)}

    def sweep(self, rel: str) -> dict:
        folder = self.path(rel, "sweep")
        view = sweep_view(self.root, folder)
        job = self.jobs.running_for(folder)
        view["job"] = None if job is None else self.job_view(job)
        return view

    def capture(self, rel: str) -> dict:
        return capture_view(self.root, self.path(rel, "capture"))

    def zoom(self, body: dict) -> dict:
        parent = self.path(str(body.get("sweep", "")), "sweep")
        if parent == self.root:
            raise InvalidArgumentError(
                "the served directory is the sweep itself; serve the folder that holds it so that "
                "zoomed sweeps can be written beside it",
                "sweep",
            )
        job = self.jobs.submit(
            parent,
            body.get("alpha"),
            body.get("beta"),
            body.get("n_alpha"),
            body.get("n_beta"),
        )
        return {"job": job.id, "sweep": relative(self.root, job.folder), **self.job_view(job)}

    def job(self, job_id: str) -> dict:
        job = self.jobs.jobs.get(job_id)
        if job is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no job {job_id!r}")
        return self.job_view(job)

    def job_view(self, job) -> dict:
        return {
            "id": job.id,
            "sweep": relative(self.root, job.folder),
            "parent": relative(self.root, job.parent),
            "state": job.state,
            "error": job.error,
            "done": job.done_points(),
            "total": job.total,
            "alpha": list(job.cfg.grid.alpha),
            "beta": list(job.cfg.grid.beta),
            "timings": {k: v for k, v in job.timings.items() if k.endswith("_s")},
        }

    def analyze(self, body: dict) -> dict:
        folder = self.path(str(body.get("sweep", "")), "sweep")
        with self.models.lock:
            result = self.jobs.analyse(folder)
        return {"sweep": relative(self.root, folder), "embedder": result.embedder}

    def load_capture(self, run: CaptureRun):
        from flux_ir.store import load_capture

        with self._capture_lock:
            if run.capture_path not in self._captures:
                if len(self._captures) >= 4:
                    self._captures.pop(next(iter(self._captures)))
                self._captures[run.capture_path] = load_capture(run.capture_path)
            return self._captures[run.capture_path]

    def lens(self, rel: str, kind: str, index: int, step: int, target: str) -> Path:
        """The lens decode's file, decoded now (with the capture's model) when missing."""
        from flux_ir.lens import TARGETS, BlockStep
        from flux_ir.workflows.metrics_run import decode_missing

        run = CaptureRun.open(self.path(rel, "capture"))
        if target not in TARGETS or kind not in ("double", "single"):
            raise InvalidArgumentError(f"no lens {kind} block, target {target}")
        if index not in run.block_indices[kind] or step not in run.captured_steps:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"{kind} block {index} step {step} not captured")
        item = BlockStep(kind, index, step)
        path = run.lens_file(item, target)
        if not path.is_file():
            pipe = self.models.get(run.metadata.get("model", ""), **self._weights(run))
            with self.models.lock:
                if not path.is_file():
                    decode_missing(run, pipe, [item], target, cap=self.load_capture(run))
        return path

    def _weights(self, run: CaptureRun) -> dict:
        return {"weights": "random" if run.metadata.get("weights") == "random" else "pretrained"}

    def scorer(self):
        """The CLIP scorer of the metrics' `clip_to_prompt`: with the clip embedders only."""
        from flux_ir.analysis.clip_score import ClipPromptScorer
        from flux_ir.analysis.embed import DEFAULT_CLIP

        if self.jobs.embedder == "clip-tiny":
            return ClipPromptScorer.tiny()
        if self.jobs.embedder == "clip":
            device = self.models.device or "cpu"
            return ClipPromptScorer.from_pretrained(self.jobs.clip_model or DEFAULT_CLIP, device)
        return None

    def metrics(self, rel: str, compute: bool = True) -> dict:
        """The capture's metrics table as {"columns", "rows", "last_block"} (None when not made and
        `compute` is off); computed with the capture's model for the missing lens decodes."""
        from flux_ir.analysis.block_metrics import CSV_NAME, read_metrics_csv
        from flux_ir.workflows.metrics_run import capture_metrics

        run = CaptureRun.open(self.path(rel, "capture"))
        csv = run.intermediates / CSV_NAME
        if not csv.is_file():
            if not compute:
                return {"columns": [], "rows": None}
            pipe = None
            if run.metadata.get("streams", "both") != "txt" and run.metadata.get("reduce") is None:
                try:
                    pipe = self.models.get(run.metadata.get("model", ""), **self._weights(run))
                except FluxIRError:
                    pipe = None  # the lens columns stay empty where no decode is on disk
            with self.models.lock:
                capture_metrics(run.root, pipe, scorer=self.scorer())
        df = read_metrics_csv(csv)
        rows = [
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in r.items()
            }
            for r in df.to_dict("records")
        ]
        return {"columns": list(df.columns), "rows": rows}


def make_server(
    explorer: Explorer, host: str = "127.0.0.1", port: int = 8765
) -> ThreadingHTTPServer:
    """A threaded HTTP server for `explorer` bound to (host, port); port 0 picks a free one."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.explorer = explorer
    bound = server.server_address[1]
    names = set(LOCAL_HOSTS) | {host}
    server.allowed_hosts = {f"{h}:{bound}" for h in names} | {f"[{h}]:{bound}" for h in names}
    server.any_host = host in ("0.0.0.0", "::", "")
    return server


class Handler(BaseHTTPRequestHandler):
    server_version = "flux-ir-explorer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # quiet: the command prints where it serves
        pass

    # -- answering --------------------------------------------------------------------------------
    def _headers(self, status: int, content_type: str, length: int, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _json(self, data, status: int = 200) -> None:
        body = json.dumps(data, allow_nan=False).encode()
        self._headers(status, "application/json", len(body), {"Cache-Control": "no-store"})
        self.wfile.write(body)

    def _file(self, path: Path, content_type: str, head: bool = False) -> None:
        stat = path.stat()
        modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        since = self.headers.get("If-Modified-Since")
        if since:
            try:
                if email.utils.parsedate_to_datetime(since).timestamp() >= int(stat.st_mtime):
                    self._headers(304, content_type, 0, {"Last-Modified": modified})
                    return
            except (TypeError, ValueError):
                pass
        data = path.read_bytes()
        extra = {"Last-Modified": modified, "Cache-Control": "no-cache"}
        self._headers(200, content_type, len(data), extra)
        if not head:
            self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json({"error": message}, int(status))

    # -- routing ----------------------------------------------------------------------------------
    def _host_ok(self) -> bool:
        host = self.headers.get("Host", "")
        return self.server.any_host or host in self.server.allowed_hosts

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_HEAD(self) -> None:
        def head(url, q):
            if url.path.startswith("/api/"):
                raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "the API answers GET and POST")
            self._get(url, q, head=True)

        self._dispatch(head)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _dispatch(self, handle) -> None:
        try:
            if not self._host_ok():
                raise HTTPError(HTTPStatus.FORBIDDEN, "unknown Host: open the address printed")
            url = urlsplit(self.path)
            handle(url, {k: v[-1] for k, v in parse_qs(url.query).items()})
        except Forbidden as err:
            self._error(HTTPStatus.FORBIDDEN, str(err))
        except HTTPError as err:
            self._error(err.status, str(err))
        except (FileNotFoundError, KeyError) as err:
            self._error(HTTPStatus.NOT_FOUND, str(err).strip("'\""))
        except (FluxIRError, ValueError) as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _get(self, url, q: dict, head: bool = False) -> None:
        ex: Explorer = self.server.explorer
        route = url.path
        if route in ("/", "/index.html"):
            return self._static("index.html", head)
        if route.startswith("/static/"):
            return self._static(route.removeprefix("/static/"), head)
        if route.startswith("/files/"):
            path = inside(ex.root, unquote(route.removeprefix("/files/")))
            content_type = media_type(path)
            if content_type is None:
                raise Forbidden(f"{path.name}: this type of file is not served")
            if not path.is_file():
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no file {relative(ex.root, path)}")
            return self._file(path, content_type, head)
        if route == "/api/entries":
            return self._json(ex.entries())
        if route == "/api/sweep":
            return self._json(ex.sweep(q.get("path", "")))
        if route == "/api/capture":
            return self._json(ex.capture(q.get("path", "")))
        if route == "/api/job":
            return self._json(ex.job(q.get("id", "")))
        if route == "/api/metrics":
            return self._json(ex.metrics(q.get("path", ""), q.get("compute", "1") != "0"))
        if route == "/api/lens":
            try:
                index, step = int(q.get("index", "")), int(q.get("step", ""))
            except ValueError as err:
                raise InvalidArgumentError("index and step must be integers") from err
            path = ex.lens(q.get("path", ""), q.get("kind", ""), index, step, q.get("target", "x0"))
            return self._file(path, "image/jpeg", head)
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no such page {route}")

    def _post(self, url, q: dict) -> None:
        ex: Explorer = self.server.explorer
        if self.headers.get_content_type() != "application/json":
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (application/json)")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            raise HTTPError(HTTPStatus.FORBIDDEN, "requests from other sites are refused")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as err:
            raise InvalidArgumentError(f"the request is not JSON: {err}") from err
        if not isinstance(body, dict):
            raise InvalidArgumentError("the request must be a JSON object")
        if url.path == "/api/zoom":
            return self._json(ex.zoom(body), 202)
        if url.path == "/api/analyze":
            return self._json(ex.analyze(body))
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint {url.path}")

    def _static(self, name: str, head: bool = False) -> None:
        folder = resources.files("flux_ir.explorer") / "static"
        names = {p.name for p in folder.iterdir()}
        suffix = Path(name).suffix
        if name not in names or suffix not in STATIC_TYPES:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no static file {name}")
        data = (folder / name).read_bytes()
        self._headers(200, STATIC_TYPES[suffix], len(data), {"Cache-Control": "no-cache"})
        if not head:
            self.wfile.write(data)
