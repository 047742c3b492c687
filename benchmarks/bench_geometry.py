"""Fisher geometry of a 100 x 100 sweep on one GPU: posterior, free energy, metric (target <= 5 min).

    PYTHONPATH=. python benchmarks/bench_geometry.py --out results/      # CUDA: 100 x 100, dim 768
    PYTHONPATH=. python benchmarks/bench_geometry.py --smoke             # CPU, seconds: the script only

What is measured: synthetic unit embeddings (dimension 768) of an n x n sweep with phases (a few
regions, each its own direction, plus a smooth drift and noise), then the whole chain through the
public API, as `fisher_geometry` runs it after the embeddings: `kernel_posteriors` (R = 128,
float64 similarities, float32 splat), `fit_free_energy` (the paper's network, 2 -> 512 x 4 -> 1,
2000 Adam steps of 128 posteriors, validation every 50 steps) and `metric_field` (128 x 128) plus
the metric at every sweep point; wall clock per stage, device synchronised. The chain runs twice in
one process: the first call (CUDA context, cuBLAS handles, allocator growth) and a later one. For
the posterior, the plain alternative is the reference code's per-sample loop (numpy, `np.add.at`
splat, on the CPU), timed on `--reference_samples` samples and scaled to n^2 samples.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from common import parser, sync, write_results

from flux_ir.analysis.fisher import (
    fit_free_energy,
    kernel_posteriors,
    metric_field,
    metric_tensor,
)

NOTE = __doc__.split("What is measured:")[1]
COLUMNS = ["call", "points", "posterior_s", "fit_s", "metric_s", "total_s", "steps_per_s"]


def synthetic_embeddings(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings [n*n, dim] and unit coordinates [n*n, 2] of an n x n grid with 4 phases."""
    rng = np.random.default_rng(seed)
    ax = np.linspace(0.0, 1.0, n)
    coords = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    centres = rng.random((4, 2))
    phase = np.argmin(((coords[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    directions = rng.normal(size=(4, dim))
    drift = rng.normal(size=(2, dim))
    e = directions[phase] * 3 + coords @ drift + 0.3 * rng.normal(size=(len(coords), dim))
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32), coords


def reference_posterior_seconds(e: np.ndarray, coords: np.ndarray, r: int, samples: int) -> float:
    """The reference code's loop (numpy: one sample at a time, np.add.at splat) on `samples`
    samples: seconds per sample."""
    x = coords[:, 0] * (r - 1)
    y = (1 - coords[:, 1]) * (r - 1)
    t0 = time.perf_counter()
    for idx in range(samples):
        w = np.exp(-10 * np.sqrt(2 * (1.00001 - e @ e[idx])))
        i, j = np.floor(x).astype(int), np.floor(y).astype(int)
        dx, dy = x - i, y - j
        i, j = np.clip(i, 0, r - 2), np.clip(j, 0, r - 2)
        grid = np.zeros((r, r))
        np.add.at(grid, (j, i), (1 - dx) * (1 - dy) * w)
        np.add.at(grid, (j, i + 1), dx * (1 - dy) * w)
        np.add.at(grid, (j + 1, i), (1 - dx) * dy * w)
        np.add.at(grid, (j + 1, i + 1), dx * dy * w)
        grid = np.clip(grid, 0, 1)
        grid /= grid.sum()
    return (time.perf_counter() - t0) / samples


def run_chain(e, coords, args, device) -> dict:
    sync()
    t0 = time.perf_counter()
    post = kernel_posteriors(
        torch.from_numpy(e), torch.from_numpy(coords), args.resolution, device=device
    )
    sync()
    t1 = time.perf_counter()
    fit = fit_free_energy(
        post,
        coords,
        width=args.width,
        depth=args.depth,
        steps=args.steps,
        device=device,
        progress=False,
    )
    sync()
    t2 = time.perf_counter()
    field = metric_field(fit.net, args.metric_resolution)
    g = metric_tensor(fit.net, coords).cpu()
    sync()
    t3 = time.perf_counter()
    assert math.isfinite(float(np.nanmedian(field.det))) and g.shape == (len(coords), 2, 2)
    return {
        "posterior_s": t1 - t0,
        "fit_s": t2 - t1,
        "metric_s": t3 - t2,
        "total_s": t3 - t0,
        "steps_per_s": args.steps / (t2 - t1),
        "best_val_loss": fit.best_val_loss,
        "n_samples": fit.n_samples,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=100, help="points per side of the sweep")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--metric_resolution", type=int, default=128)
    p.add_argument(
        "--calls", type=int, default=2, help="chain runs in this process (first + later)"
    )
    p.add_argument("--reference_samples", type=int, default=20)
    args = p.parse_args()
    if args.smoke:
        args.side, args.dim, args.resolution, args.width = 10, 32, 16, 16
        args.steps, args.metric_resolution, args.calls, args.reference_samples = 10, 16, 2, 5
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs CUDA (or pass --smoke)")
        device = "cuda"
    e, coords = synthetic_embeddings(args.side, args.dim)
    n = len(coords)
    result = {"settings": vars(args), "points": n, "calls": []}
    rows = []
    for call in range(args.calls):
        r = run_chain(e, coords, args, device)
        r.update(call="first" if call == 0 else f"later {call}", points=n)
        result["calls"].append(r)
        rows.append(r)
        print(r, flush=True)
    per_sample = reference_posterior_seconds(e, coords, args.resolution, args.reference_samples)
    reference_s = per_sample * n
    later = rows[-1]["posterior_s"]
    result["reference_posterior_s_scaled"] = reference_s
    result["posterior_speedup_vs_reference"] = reference_s / later
    result["target_s"] = 300.0
    result["within_target"] = all(r["total_s"] <= 300.0 for r in rows)
    rows.append(
        {"call": f"reference posterior loop (numpy, scaled from {args.reference_samples})",
         "points": n, "posterior_s": reference_s}
    )  # fmt: skip
    note = NOTE + (
        f"\nPosterior: {later:.3g} s here vs {reference_s:.3g} s for the reference loop "
        f"(x{reference_s / later:.0f}). Target: whole chain <= 300 s: "
        f"{'met' if result['within_target'] else 'NOT met'}.\n"
    )
    print(write_results(args.out, "geometry", result, rows, COLUMNS, note))


if __name__ == "__main__":
    main()
