"""The explorer's computing side: the models it loads, zoomed sub-sweeps generated in the background,
and lens decodes or metrics made on demand.

    root = sweep_dir.parent               # the folder that holds the sweeps
    models = ModelHost(device="cpu")
    jobs = ZoomJobs(root, models, batch_size=4)
    job = jobs.submit(root / "sweep", alpha=(0.25, 0.5), beta=(0.0, 0.5), n_alpha=2, n_beta=2)
    job.wait().state                      # "done"; root / "sweep-zoom1" is a sweep directory

A zoom is `flux_ir.sweep.run_sweep` with the parent sweep's settings and a sub-range `GridSpec` (any
range: inside [0, 1] to zoom in, beyond it to look further), run by one worker thread, one zoom at a
time, into a new folder beside the parent (`<parent>-zoomK`) that `zoom.json` links to it; the same
range asked for again reopens that folder (and finishes it, if it was cut short). Its images appear
one by one on disk as the sweep writes them; when it is complete, its Lipschitz field (and phase
maps) are computed with the explorer's embedder.

Models load once, on first use, by the name a sweep or capture records (or the one the explorer was
started with), and run one computation at a time (`ModelHost.lock`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
import traceback
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from flux_ir.errors import FluxIRError, InvalidArgumentError
from flux_ir.explorer.views import ZOOM_LINK, read_link
from flux_ir.io.atomic import write_text
from flux_ir.sweep.config import SweepConfig
from flux_ir.sweep.grid import GridSpec
from flux_ir.sweep.store import SweepStore

RANDOM_SUFFIX = " (random weights)"
MAX_ZOOM_POINTS = 64 * 64


class ModelHost:
    """Pipelines by (name, weights, dtype), loaded on first use; `override` replaces every name."""

    def __init__(self, device: str | None = None, override: str | None = None):
        self.device = device
        self.override = override
        self.lock = threading.RLock()  # one computation on the models at a time
        self._pipes: dict[tuple, object] = {}
        self.load_s: dict[str, float] = {}

    def get(self, name: str, weights: str = "pretrained", dtype: str | None = None):
        """The pipeline for a recorded model name ("flux-toy", "flux-tiny (random weights)")."""
        import torch

        from flux_ir.models import LoadOptions, load_pipeline

        if name.endswith(RANDOM_SUFFIX):
            name, weights = name.removesuffix(RANDOM_SUFFIX), "random"
        name = self.override or name
        key = (name, weights, dtype)
        with self.lock:
            if key not in self._pipes:
                t0 = time.perf_counter()
                torch_dtype = getattr(torch, dtype) if dtype else None
                load = LoadOptions.create(name, self.device, None, weights, torch_dtype)
                self._pipes[key], _ = load_pipeline(load)
                self.load_s[name] = time.perf_counter() - t0
            return self._pipes[key]

    def put(self, pipe, name: str, weights: str = "pretrained", dtype: str | None = None) -> None:
        """Use an already loaded pipeline for `name` (a notebook's, a test's): nothing is loaded."""
        with self.lock:
            self._pipes[(name, weights, dtype)] = pipe

    def loaded(self) -> list[str]:
        return [f"{n} ({w})" for n, w, _ in self._pipes]


@dataclasses.dataclass
class ZoomJob:
    """One zoom: `state` runs "queued", "loading model", "generating", "analysing", then "done" or
    "error" (`error` says why); `timings` holds load_s, generate_s, analyse_s and total_s."""

    id: str
    parent: Path
    folder: Path
    cfg: SweepConfig
    state: str = "queued"
    error: str | None = None
    created: float = dataclasses.field(default_factory=time.time)
    timings: dict = dataclasses.field(default_factory=dict)
    future: Future | None = None

    @property
    def total(self) -> int:
        return self.cfg.grid.n_alpha * self.cfg.grid.n_beta

    def done_points(self) -> int:
        store = SweepStore(self.folder)
        return sum(store.is_done(p) for p in self.cfg.grid.points())

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error")

    def wait(self, timeout: float | None = None) -> ZoomJob:
        if self.future is not None:
            self.future.result(timeout)
        return self


class ZoomJobs:
    """Zooms of the sweeps under `root`, run one after another on a worker thread."""

    def __init__(
        self,
        root: Path,
        models: ModelHost,
        *,
        batch_size: int = 4,
        embedder: str = "pixel",
        clip_model: str | None = None,
    ):
        from flux_ir.analysis.embed import check_embedder

        self.root = root
        self.models = models
        self.batch_size = batch_size
        self.embedder = check_embedder(embedder)
        self.clip_model = clip_model
        self.jobs: dict[str, ZoomJob] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoom")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def running_for(self, folder: Path) -> ZoomJob | None:
        """The unfinished job generating into `folder`, if any."""
        for job in self.jobs.values():
            if job.folder == folder and not job.finished:
                return job
        return None

    def submit(self, parent: Path, alpha, beta, n_alpha: int, n_beta: int) -> ZoomJob:
        """Start (or reopen) the zoom of sweep `parent` over `alpha` x `beta` with that many points.
        InvalidArgumentError for a range or size that no sweep can have."""
        cfg = zoom_config(parent, alpha, beta, n_alpha, n_beta)
        with self._lock:
            folder = zoom_folder(parent, cfg.grid)
            running = self.running_for(folder)
            if running is not None:
                return running
            if not folder.exists():
                folder.mkdir()
            link = {
                "parent": f"../{parent.name}",
                "alpha": list(cfg.grid.alpha),
                "beta": list(cfg.grid.beta),
                "n_alpha": cfg.grid.n_alpha,
                "n_beta": cfg.grid.n_beta,
                "created": dt.datetime.now().isoformat(timespec="seconds"),
            }
            if read_link(folder) is None:
                write_text(folder / ZOOM_LINK, json.dumps(link, indent=1))
            # the directory is a (pending) sweep from now on: the page can show it at once
            meta = SweepStore(parent).read_metadata() or {}
            SweepStore(folder).claim(cfg, {**self.phases(meta), "zoomed_from": link["parent"]})
            job = ZoomJob(uuid.uuid4().hex[:12], parent, folder, cfg)
            self.jobs[job.id] = job
            job.future = self._pool.submit(self._run, job)
            return job

    @staticmethod
    def phases(meta: dict) -> dict:
        """The per-step phases a parent sweep kept: its zooms keep them too."""
        return {"phase_pool": meta.get("phase_pool"), "phase_images": meta.get("phase_images")}

    def _run(self, job: ZoomJob) -> None:
        from flux_ir.sweep.run import run_sweep

        start = time.perf_counter()
        meta = SweepStore(job.parent).read_metadata() or {}
        try:
            job.state = "loading model"
            t0 = time.perf_counter()
            weights = "random" if meta.get("weights") == "random" else "pretrained"
            pipe = self.models.get(job.cfg.model, weights, job.cfg.dtype)
            job.timings["load_s"] = time.perf_counter() - t0
            job.state = "generating"
            t0 = time.perf_counter()
            with self.models.lock:
                run_sweep(
                    pipe,
                    job.cfg,
                    job.folder,
                    batch_size=self.batch_size,
                    **self.phases(meta),
                    progress=False,
                    extra_metadata={"zoomed_from": f"../{job.parent.name}", "weights": weights},
                )
            job.timings["generate_s"] = time.perf_counter() - t0
            job.state = "analysing"
            t0 = time.perf_counter()
            self.analyse(job.folder)
            job.timings["analyse_s"] = time.perf_counter() - t0
            job.state = "done"
        except Exception as err:  # reported to the page; the explorer keeps serving
            job.error = str(err) if isinstance(err, FluxIRError) else repr(err)
            job.timings["traceback"] = traceback.format_exc(limit=8)
            job.state = "error"
        finally:
            job.timings["total_s"] = time.perf_counter() - start

    def analyse(self, folder: Path):
        """The Lipschitz field (and phase maps) of a sweep with the explorer's embedder."""
        from flux_ir.analysis.embed import DEFAULT_CLIP, make_embedder
        from flux_ir.analysis.sweep import analyze_sweep

        device = self.models.device or "cpu"
        embedder = make_embedder(
            self.embedder, clip_model=self.clip_model or DEFAULT_CLIP, device=device
        )
        return analyze_sweep(folder, embedder, phases=True)


def zoom_config(parent: Path, alpha, beta, n_alpha: int, n_beta: int) -> SweepConfig:
    """The parent sweep's settings over a new grid (its normalisation; a path stays a path)."""
    meta = SweepStore(parent).read_metadata()
    if meta is None:
        raise InvalidArgumentError(f"{{param}} {parent.name} is not a sweep directory", "sweep")
    cfg = SweepConfig.from_signature(meta["sweep"])
    if cfg.vertices_sha256 is not None:
        raise InvalidArgumentError(
            f"{{param}} {parent.name} takes its vertex latents from a file, which its directory does "
            "not keep; zoom with `flux-ir sweep --vertices FILE --alpha ... --beta ...`",
            "sweep",
        )
    for name, n in (("n_alpha", n_alpha), ("n_beta", n_beta)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise InvalidArgumentError(f"{{param}} must be an integer in [1, 64], got {n!r}", name)
    if cfg.grid.path is not None:
        n_beta, beta = 1, cfg.grid.beta
        if n_alpha < 2:
            raise InvalidArgumentError("{param} of a path must be at least 2", "n_alpha")
    grid = GridSpec(
        alpha=alpha,
        beta=beta,
        n_alpha=n_alpha,
        n_beta=n_beta,
        normalisation=cfg.grid.normalisation,
        path=cfg.grid.path,
    )
    return dataclasses.replace(cfg, grid=grid)


def zoom_folder(parent: Path, grid: GridSpec) -> Path:
    """The folder of a zoom: the existing one of the same grid, else `<parent>-zoomK` for the first
    free K."""
    k = 1
    while True:
        folder = parent.parent / f"{parent.name}-zoom{k}"
        if not folder.exists():
            return folder
        link = read_link(folder)
        if (
            link is not None
            and (folder / str(link.get("parent", ""))).resolve() == parent.resolve()
            and link.get("alpha") == list(grid.alpha)
            and link.get("beta") == list(grid.beta)
            and link.get("n_alpha") == grid.n_alpha
            and link.get("n_beta") == grid.n_beta
        ):
            return folder
        k += 1
