"""Analyse a finished (or partial) sweep directory: embeddings, Lipschitz field, per-step phase maps.

    result = analyze_sweep(sweep_dir, PixelEmbedder())   # a directory written by run_sweep
    result.field            # [n_alpha, n_beta] Lipschitz field of the final images
    result.phase_fields     # [steps, n_alpha, n_beta] of the per-step x0 latents, or None

Writes `<dir>/analysis/lipschitz_<embedder>.npz` (field, edges, alphas, betas, phase fields) and
`<dir>/analysis/lipschitz_<embedder>.csv` (one row per point); embeddings are cached in
`<dir>/embeddings/<embedder>.npz`.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flux_ir.analysis.embed import Embedder, embed_files
from flux_ir.analysis.lipschitz import Edges, embedding_grid, lipschitz_edges, lipschitz_field
from flux_ir.errors import InvalidArgumentError
from flux_ir.io.atomic import atomic_path, write_text
from flux_ir.sweep.config import SweepConfig
from flux_ir.sweep.store import SweepStore, phase_image_file


@dataclass
class SweepAnalysis:
    embedder: str
    alphas: np.ndarray  # [n_alpha]
    betas: np.ndarray  # [n_beta]
    field: np.ndarray  # [n_alpha, n_beta]
    edges: Edges
    phase_fields: np.ndarray | None  # [steps, n_alpha, n_beta]
    out_dir: Path
    phase_space: str | None = None  # "image": decoded x0 thumbnails embedded; "latent": pooled x0


def open_sweep(sweep_dir: str | Path) -> tuple[SweepStore, SweepConfig, list[dict]]:
    """The store, its settings and a row per grid point (`done`: its image exists, so an unfinished
    sweep can be analysed too); a clear error if the directory holds no sweep."""
    store = SweepStore(sweep_dir)
    meta = store.read_metadata()
    if meta is None or "sweep" not in meta:
        raise InvalidArgumentError(
            f"{store.root} is not a sweep directory (no metadata.json); run `flux-ir sweep` first"
        )
    cfg = SweepConfig.from_signature(meta["sweep"])
    rows = [
        {"index": p.index, "row": p.row, "col": p.col, "alpha": p.alpha, "beta": p.beta,
         "file": f"images/{p.file}", "done": store.is_done(p)}
        for p in cfg.grid.points()
    ]  # fmt: skip
    return store, cfg, rows


def analyze_sweep(sweep_dir: str | Path, embedder: Embedder, phases: bool = True) -> SweepAnalysis:
    store, cfg, rows = open_sweep(sweep_dir)
    done = [r for r in rows if r["done"]]
    if not done:
        raise InvalidArgumentError(
            f"{store.root} has no finished points yet; resume the sweep first"
        )
    grid = cfg.grid
    d_alpha, d_beta = grid.spacing
    paths = [store.root / r["file"] for r in done]
    vectors = embed_files(embedder, paths, cache=store.root / "embeddings" / f"{embedder.name}.npz")
    rows_idx = [r["row"] for r in done]
    cols_idx = [r["col"] for r in done]
    emb = embedding_grid(vectors, rows_idx, cols_idx, grid.n_alpha, grid.n_beta)
    edges = lipschitz_edges(emb, d_alpha, d_beta)
    field = lipschitz_field(edges)
    phase, phase_space = None, None
    if phases:
        phase, phase_space = phase_image_fields(store, cfg, embedder), "image"
        if phase is None:
            phase, phase_space = phase_fields(store, cfg), "latent"
        if phase is not None:  # partial phases leave blank cells: say so rather than show them
            need = {"phases": phase_space == "latent"}
            need["thumbnails"] = cfg.sampling.num_steps if phase_space == "image" else 0
            missing = store.pending(cfg.grid.points(), **need)
            lacking = sum(store.is_done(p) for p in missing)
            if lacking:
                print(
                    f"warning: {lacking} of {len(done)} finished points lack per-step phases, so the "
                    "phase maps are blank there; resume the sweep with its --phases flags to "
                    "complete them",
                    file=sys.stderr,
                )
    out = store.root / "analysis"
    out.mkdir(exist_ok=True)
    arrays = {
        "field": field,
        "edges_alpha": edges.alpha,
        "edges_beta": edges.beta,
        "alphas": grid.alphas(),
        "betas": grid.betas(),
    }
    if phase is not None:
        arrays["phase_fields"] = phase
        arrays["phase_space"] = np.array(phase_space)
    with atomic_path(out / f"lipschitz_{embedder.name}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_text(out / f"lipschitz_{embedder.name}.csv", _field_csv(rows, field))
    return SweepAnalysis(
        embedder.name, grid.alphas(), grid.betas(), field, edges, phase, out, phase_space
    )


def phase_fields(store: SweepStore, cfg: SweepConfig) -> np.ndarray | None:
    """Lipschitz field of the (pooled) x0 latents at every step: [steps, n_alpha, n_beta], or None.

    The embedding of a point at step k is its pooled x0 latent flattened (latent space, no decoding).
    """
    points = [
        p for p in cfg.grid.points() if (store.phases / p.file.replace(".png", ".npy")).is_file()
    ]
    if not points:
        return None
    x0 = np.stack([store.load_phases(p).astype(np.float32) for p in points])  # [n, steps, C, h, w]
    steps = x0.shape[1]
    d_alpha, d_beta = cfg.grid.spacing
    fields = []
    for k in range(steps):
        emb = embedding_grid(
            x0[:, k].reshape(len(points), -1),
            [p.row for p in points],
            [p.col for p in points],
            cfg.grid.n_alpha,
            cfg.grid.n_beta,
        )
        fields.append(lipschitz_field(lipschitz_edges(emb, d_alpha, d_beta)))
    return np.stack(fields)


def phase_image_fields(
    store: SweepStore, cfg: SweepConfig, embedder: Embedder
) -> np.ndarray | None:
    """Lipschitz field of the decoded x0 thumbnails at every step, embedded with `embedder`:
    [steps, n_alpha, n_beta], or None when the sweep kept no step images (`--phase_images`)."""
    steps = cfg.sampling.num_steps
    points = [
        p for p in cfg.grid.points()
        if all((store.phases / phase_image_file(p, k)).is_file() for k in range(steps))
    ]  # fmt: skip
    if not points:
        return None
    files = [store.phases / phase_image_file(p, k) for k in range(steps) for p in points]
    cache = store.root / "embeddings" / f"{embedder.name}_phases.npz"
    vectors = embed_files(embedder, files, cache=cache).reshape(steps, len(points), -1)
    d_alpha, d_beta = cfg.grid.spacing
    rows, cols = [p.row for p in points], [p.col for p in points]
    return np.stack(
        [
            lipschitz_field(
                lipschitz_edges(
                    embedding_grid(vectors[k], rows, cols, cfg.grid.n_alpha, cfg.grid.n_beta),
                    d_alpha,
                    d_beta,
                )
            )
            for k in range(steps)
        ]
    )


def _field_csv(rows: list[dict], field: np.ndarray) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "row", "col", "alpha", "beta", "file", "lipschitz"])
    for r in rows:
        writer.writerow(
            [
                r["index"],
                r["row"],
                r["col"],
                r["alpha"],
                r["beta"],
                r["file"],
                field[r["row"], r["col"]],
            ]
        )
    return buf.getvalue()
