"""The Fisher metric of flux-toy's neutral-prompt grid against the checker's classes (CPU).

    uv run flux-ir sweep --model flux-toy --prompt "" --true_cfg_scale 1 --n_alpha 20 \
        --alpha=-0.5,1.5 --beta=-0.5,1.5 --seeds 0,1,2 --output_dir output/toy-neutral-20
    uv run python benchmarks/toy_fisher.py output/toy-neutral-20 --threads 2 \
        --out benchmarks/results/cpu-2026-12-03 --picture docs/flux-toy-fisher.png
    uv run python benchmarks/toy_fisher.py --smoke --out /tmp/toy-fisher     # flux-tiny, seconds

What is measured: `fisher_geometry` on a finished neutral-prompt grid (posteriors from the
embedder's unit vectors, the free-energy network, the metric; written to `<sweep>/analysis/`), the
checker's reading of every grid image (`flux_ir.toy.bars.read_images`: shape, colour, background;
"scene": all three together), and `boundary_contrast` of det g at the grid points: the mean on
cells with a 4-neighbour of another class over the mean on the others, per class map. `det g+` is
the determinant of the metric's positive part (negative eigenvalues set to 0, as the geodesics use
it), so concave spots of the fitted log Z count as 0 rather than as a positive product of two
negative eigenvalues. Geodesics: `line_pairs` on the scene map picks pairs of interior cells whose
straight line stays inside one class ("same class") and pairs whose endpoints lie in different
classes ("crossing"), chords of `--min_cells`..`--max_cells` cells; all are optimised together
(`FisherGeometry.add_geodesics`) and each reports its largest and mean Euclidean distance from the
straight segment in units of the box's side (`deviation`, `mean_deviation`), the largest over the
chord (`relative_deviation`) and its metric length over the straight line's. Wall times are this
machine's (threads `--threads`), not a speed benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import markdown_table, write_results  # noqa: E402

from flux_ir.analysis import boundary_contrast, fisher_geometry, make_embedder, open_sweep  # noqa: E402
from flux_ir.analysis.fisher_sweep import geodesic_images, line_pairs  # noqa: E402
from flux_ir.plots.fisher import class_geodesics_figure, geodesic_strip  # noqa: E402
from flux_ir.plots.sweep import mosaic_array, save_figure  # noqa: E402
from flux_ir.toy.bars import ATTRIBUTES, read_images  # noqa: E402

NOTE = __doc__.split("What is measured:")[1]
MAPS = ("scene", *ATTRIBUTES)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", nargs="?", help="a finished neutral-prompt grid (written into)")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--smoke", action="store_true", help="a 6 x 6 flux-tiny grid, seconds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--embedder", default="pixel", help="pixel, clip or clip-tiny")
    p.add_argument("--clip_model", default="openai/clip-vit-large-patch14")
    p.add_argument("--width", type=int, default=64, help="free-energy network width")
    p.add_argument("--depth", type=int, default=4, help="free-energy network depth")
    p.add_argument("--steps", type=int, default=2000, help="Adam steps of the fit")
    p.add_argument("--resolution", type=int, default=None, help="posterior grid (default: sweep)")
    p.add_argument("--n_samples", type=float, default=None, help="N (default: from posteriors)")
    p.add_argument("--fit_seed", type=int, default=0)
    p.add_argument("--metric_resolution", type=int, default=64)
    p.add_argument("--pairs", type=int, default=4, help="geodesic pairs of each kind (0: none)")
    p.add_argument("--min_cells", type=float, default=5.0, help="shortest chord, cells")
    p.add_argument("--max_cells", type=float, default=9.0, help="longest chord, cells")
    p.add_argument("--curve_points", type=int, default=40, help="points of each geodesic polyline")
    p.add_argument("--iterations", type=int, default=1000, help="Adam iterations of the geodesics")
    p.add_argument("--picture", default=None, help="write the det g / geodesics figure here")
    p.add_argument("--strip", default=None, help="images along the first crossing geodesic (PNG)")
    p.add_argument("--name", default="toy_fisher", help="name of the result files")
    args = p.parse_args(argv)
    if not args.smoke and not args.sweep_dir:
        p.error("sweep_dir is required (or --smoke)")
    return args


def read_classes(sweep_dir) -> dict[str, np.ndarray]:
    """The checker's classes of every grid image: {"scene", "background", "colour", "shape"} ->
    int [n_alpha, n_beta] ("scene" = shape * 100 + colour * 10 + background; -1 = no shape)."""
    store, cfg, rows = open_sweep(sweep_dir)
    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(store.root / r["file"]).convert("RGB")))
            for r in rows
        ]
    )
    found = read_images(images.permute(0, 3, 1, 2).float() / 255)
    shape = (cfg.grid.n_alpha, cfg.grid.n_beta)
    maps = {k: np.zeros(shape, dtype=np.int64) for k in ATTRIBUTES}
    for i, r in enumerate(rows):
        for k in ATTRIBUTES:
            maps[k][r["row"], r["col"]] = int(found[k][i])
    maps["scene"] = maps["shape"] * 100 + maps["colour"] * 10 + maps["background"]
    return {k: maps[k] for k in MAPS}


def smoke_sweep(out: Path) -> Path:
    from flux_ir.cli import main as cli

    args = ["sweep", "--model", "flux-tiny", "--width", "32", "--height", "32", "--num_steps", "2"]
    args += ["--n_alpha", "6", "--output_dir", str(out), "--progress=False", "--device", "cpu"]
    if cli(args) != 0:
        raise SystemExit("the smoke sweep failed")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory() if args.smoke else None
    sweep_dir = smoke_sweep(Path(scratch.name) / "s") if args.smoke else Path(args.sweep_dir)
    small = dict(width=8, depth=2, steps=5, metric_resolution=8) if args.smoke else {}
    fit = dict(width=args.width, depth=args.depth, steps=args.steps)
    fit = {**fit, "metric_resolution": args.metric_resolution, **small}
    embedder = make_embedder(args.embedder, clip_model=args.clip_model, device="cpu")
    t0 = time.perf_counter()
    classes = read_classes(sweep_dir)
    t_classes = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = fisher_geometry(
        sweep_dir, embedder, resolution=args.resolution, n_samples=args.n_samples,
        seed=args.fit_seed, device="cpu", progress=False, **fit,
    )  # fmt: skip
    t_fit = time.perf_counter() - t0
    det = result.point_det
    det_plus = np.linalg.eigvalsh(result.point_metric).clip(min=0.0).prod(-1)
    rows = []
    for name in MAPS:
        for value, values in (("det g", det), ("det g+", det_plus)):
            c = boundary_contrast(values, classes[name])
            rows.append(
                dict(classes=name, value=value, boundary_mean=c.boundary_mean,
                     inside_mean=c.interior_mean,
                     ratio=c.ratio, boundary_cells=c.boundary_cells, inside_cells=c.interior_cells)
            )  # fmt: skip
    lengths = (1.0, 4.0) if args.smoke else (args.min_cells, args.max_cells)
    pairs = line_pairs(classes["scene"], args.pairs, min_cells=lengths[0], max_cells=lengths[1])
    alphas, betas = result.alphas, result.betas
    kinds = ["same class"] * len(pairs.same) + ["crossing"] * len(pairs.crossing)
    cells = pairs.same + pairs.crossing
    ends = [((alphas[a], betas[b]), (alphas[c], betas[d])) for (a, b), (c, d) in cells]
    iterations = 5 if args.smoke else args.iterations
    t0 = time.perf_counter()
    geos = result.add_geodesics(
        ends, n_points=args.curve_points, iterations=iterations, n_out=10, progress=False
    )
    t_geo = time.perf_counter() - t0
    result.save()  # the geodesics into analysis/fisher_<embedder>.{npz,json} (the explorer draws them)
    geo_rows = []
    for kind, cell, geo in zip(kinds, cells, geos, strict=True):
        s = geo.summary()
        geo_rows.append(
            dict(kind=kind, start_cell=list(cell[0]), end_cell=list(cell[1]),
                 classes=[int(classes["scene"][cell[0]]), int(classes["scene"][cell[1]])],
                 chord_cells=pairs.chord(cell), **s, length_ratio=s["length"] / s["line_length"])
        )  # fmt: skip
    by_kind = {}
    for kind in ("same class", "crossing"):
        sel = [r for r in geo_rows if r["kind"] == kind]
        by_kind[kind] = {
            k: float(np.mean([r[k] for r in sel])) if sel else float("nan")
            for k in ("deviation", "mean_deviation", "relative_deviation", "length_ratio")
        }
        by_kind[kind]["pairs"] = len(sel)
    summary = {
        "sweep_dir": str(sweep_dir),
        "embedder": embedder.name,
        "settings": {**vars(args), **fit, "iterations": iterations},
        "n_samples": result.n_samples,
        "resolution": result.resolution,
        "best_val_loss": min(result.losses["val_loss"]),
        "best_step": result.losses["best_step"],
        "nonpositive_det_share": float(np.mean(det <= 0)),
        "contrast": rows,
        "geodesics": geo_rows,
        "geodesics_by_kind": by_kind,
        "classes": {k: v.tolist() for k, v in classes.items()},
        "seconds": {"classes": t_classes, "fit": t_fit, "geodesics": t_geo},
    }
    if args.picture or args.smoke:
        _, _, sweep_rows = open_sweep(sweep_dir)
        mosaic = mosaic_array(sweep_dir, sweep_rows, len(alphas), len(betas), 32)
        same = [g for k, g in zip(kinds, geos, strict=True) if k == "same class"]
        crossing = [g for k, g in zip(kinds, geos, strict=True) if k == "crossing"]
        fig = class_geodesics_figure(
            result, classes["scene"], {"same class": same, "crossing": crossing}, mosaic,
            title=f"det g ({embedder.name}, N = {result.n_samples:.3g}) and the checker's classes",
        )  # fmt: skip
        picture = Path(args.picture or Path(args.out) / f"{args.name}.png")
        picture.parent.mkdir(parents=True, exist_ok=True)
        summary["picture"] = str(save_figure(fig, picture))
    if args.strip and any(k == "crossing" for k in kinds):
        from flux_ir.models import load_pipeline

        t0 = time.perf_counter()
        pipe, _ = load_pipeline("flux-tiny" if args.smoke else "flux-toy", device="cpu")
        geo = geos[kinds.index("crossing")]
        ims = geodesic_images(pipe, sweep_dir, geo)
        title = (
            f"geodesic (top) and straight line (bottom) across a class boundary: "
            f"{_ab(geo.start)} -> {_ab(geo.end)}"
        )
        summary["strip"] = str(save_figure(geodesic_strip(ims, title), Path(args.strip)))
        summary["seconds"]["strip"] = time.perf_counter() - t0
    table = markdown_table(rows, list(rows[0]))
    geo_cols = ["kind", "start", "end", "chord_cells", "deviation", "mean_deviation",
                "relative_deviation", "length_ratio"]  # fmt: skip
    geo_table = markdown_table(
        [{**r, "start": _ab(r["start"]), "end": _ab(r["end"])} for r in geo_rows], geo_cols
    )
    kind_table = markdown_table([{"kind": k, **v} for k, v in by_kind.items()], ["kind", "pairs",
        "deviation", "mean_deviation", "relative_deviation", "length_ratio"])  # fmt: skip
    fitted = (
        f"Embedder {embedder.name}; N = {result.n_samples:.4g}; posterior grid {result.resolution}; "
        f"best validation loss {summary['best_val_loss']:.4f} at step {summary['best_step']}; "
        f"det g <= 0 at {summary['nonpositive_det_share']:.1%} of the points. Seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items())
    )
    note = f"{NOTE.strip()}\n\n{fitted}\n\nGeodesics:\n\n{geo_table}\n\n{kind_table}\n\ndet g:"
    write_results(args.out, args.name, summary, rows, list(rows[0]), note)
    print(fitted)
    print(table)
    print(kind_table)
    if scratch is not None:
        scratch.cleanup()
    return summary


def _ab(p) -> str:
    return f"({p[0]:.2f}, {p[1]:.2f})"


if __name__ == "__main__":
    main()
