"""Compiled sweeps: eager against torch.compile'd transformer blocks and VAE decoder, images/s beside
the eager denoising-only bound, compilation apart, and how much the images differ.

    PYTHONPATH=. python benchmarks/bench_sweep_compiled.py --out results/     # schnell 512², 4 steps, b8
    PYTHONPATH=. python benchmarks/bench_sweep_compiled.py --modes default,max-autotune-no-cudagraphs
    uv run python benchmarks/bench_sweep_compiled.py --smoke --out /tmp/bench   # CPU, flux-tiny

What is measured: the model as the command line loads `--weights random` (full-size schnell, bf16,
one GPU). Eager: the transformer step at the batch size, timed with CUDA events on the pipeline's own
inputs (`bench_sweep.transformer_step_seconds`, median after warm-up); the eager bound is
B / (steps x step), denoising only (no text encoding, no VAE, no files). Then a sweep of
`--points` points (`run_sweep`: prompt encoded once, B points per call, VAE decode, PNGs written)
after a one-batch warm-up sweep. Compiled, per `--modes` entry: `run_sweep(..., compile=mode)`
(`compile_pipeline`: every block's forward and the VAE decoder's, torch.compile in that mode;
`MODE+casts`: compiled first with `compile_pipeline(pipe, MODE, eager_casts=True)`, inductor rounding
to bfloat16 between fused operations where eager does; `MODE+eager_vae`: the transformer blocks
alone, the VAE decoder eager); its
one-batch warm-up sweep holds the compilation (`compile_s`: that sweep's time less an eager batch's),
then the timed sweep of the same points into another directory, and the compiled step time. `ratio`
is images/s over the eager bound (the target: at least 1.25); `hours_60k`: what 60,000 images take
at that rate. Image differences, compiled against eager, over every value of every PNG: the share
within one pixel level, the share equal, the largest difference; `eager_std` (the eager images'
pixel standard deviation) shows they are not flat (random weights make noise, and in bfloat16 may
overflow). `--reference_batch R` adds eager at batch R against eager at B (other GEMM kernels, the
same arithmetic otherwise): how far the images move under rounding alone, the floor for compiled
code's differences. `--model flux-toy` (its trained weights, 128²) shows the same on a trained model.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import device_info, write_results
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import bench_sweep  # noqa: E402

from flux_ir.models import load_pipeline  # noqa: E402
from flux_ir.models.compile import COMPILED, compile_pipeline  # noqa: E402
from flux_ir.sweep import run_sweep  # noqa: E402

NOTE = __doc__.split("What is measured:")[1]
COLUMNS = [
    "config", "images_per_s", "ratio", "step_ms", "step_speedup", "sweep_s", "compile_s",
    "hours_60k", "within_1_level", "equal", "max_diff",
]  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pngs(root: Path) -> np.ndarray:
    files = sorted((root / "images").glob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def image_diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {
        "within_1_level": float((d <= 1).mean()),
        "equal": float((d == 0).mean()),
        "max_diff": int(d.max()),
        "mean_abs_diff": float(d.mean()),
        "values": int(d.size),
    }


def uncompile(pipe) -> None:
    """The pipeline eager again (the compiled forwards dropped), dynamo's caches cleared."""
    t = pipe.transformer
    for module in [*t.transformer_blocks, *t.single_transformer_blocks, pipe.vae.decoder]:
        module.__dict__.pop("forward", None)
    for module in (t, pipe.vae.decoder):
        module.__dict__.pop(COMPILED, None)
    torch._dynamo.reset()


def timed_sweep(pipe, bargs, spec, n: int, root: Path, device: str, compile=None) -> float:
    cfg = bench_sweep.config(bargs, spec, n)
    sync(device)
    t0 = time.perf_counter()
    run_sweep(pipe, cfg, root, batch_size=bargs.batch, progress=False, compile=compile)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--smoke", action="store_true", help="flux-tiny on the CPU, tiny sizes")
    p.add_argument("--model", default=None, help="flux-schnell (flux-tiny with --smoke)")
    p.add_argument("--size", type=int, default=None, help="pixels (512; 64 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (4; 2 with --smoke)")
    p.add_argument("--batch", type=int, default=None, help="points per pipeline call (8; 2)")
    p.add_argument("--points", type=int, default=None, help="points per timed sweep (64; 4)")
    p.add_argument(
        "--modes",
        default="default",
        help="torch.compile modes, comma separated; MODE+casts: compile_pipeline(eager_casts=True); "
        "MODE+eager_vae: the transformer blocks alone",
    )
    p.add_argument("--step_repeats", type=int, default=None, help="timed transformer calls (10)")
    p.add_argument(
        "--weights", default=None, help="random or pretrained (random; flux-toy: its own)"
    )
    p.add_argument(
        "--reference_batch",
        type=int,
        default=None,
        help="also sweep eager at this batch size: how much eager itself differs (the floor)",
    )
    args = p.parse_args()
    smoke = args.smoke
    model = args.model or ("flux-tiny" if smoke else "flux-schnell")
    size, steps = args.size or (64 if smoke else 512), args.steps or (2 if smoke else 4)
    batch, points = args.batch or (2 if smoke else 8), args.points or (4 if smoke else 64)
    repeats = args.step_repeats or (3 if smoke else 10)
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs CUDA (or pass --smoke)")
    bargs = bench_sweep.parse_args(
        ["--model", model, "--size", str(size), "--steps", str(steps)]
        + ["--step_repeats", str(repeats)] + (["--smoke"] if smoke else [])
    )  # fmt: skip
    bargs.batch = batch
    t0 = time.perf_counter()
    weights = args.weights or ("pretrained" if smoke or model.startswith("flux-toy") else "random")
    pipe, spec = load_pipeline(model, device=device, weights=weights)
    load_s = time.perf_counter() - t0
    result = {
        "device": device_info(), "model": model, "weights": weights, "size": size, "steps": steps, "batch": batch,
        "points": points, "load_s": load_s, "runs": {},
    }  # fmt: skip
    rows: list[dict] = []
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        step = bench_sweep.transformer_step_seconds(pipe, bargs, spec, batch, device)
        bound = batch / (steps * step)
        warm = timed_sweep(pipe, bargs, spec, batch, tmp / "eager_warm", device)
        secs = timed_sweep(pipe, bargs, spec, points, tmp / "eager", device)
        eager = pngs(tmp / "eager")
        row = dict(
            config="eager", images_per_s=points / secs, step_ms=1000 * step, step_speedup=1.0,
            sweep_s=secs, warm_s=warm, bound_images_per_s=bound, eager_std=float(eager.std()),
        )  # fmt: skip
        rows.append(row)
        if args.reference_batch:  # eager against eager: another batch size, other GEMM kernels
            bargs.batch = args.reference_batch
            secs_r = timed_sweep(pipe, bargs, spec, points, tmp / "eager_ref", device)
            bargs.batch = batch
            rows.append(
                dict(
                    config=f"eager (batch {args.reference_batch})",
                    images_per_s=points / secs_r,
                    sweep_s=secs_r,
                    **image_diff(eager, pngs(tmp / "eager_ref")),
                )
            )
        batch_s = secs / (points / batch)
        for entry in [m for m in args.modes.split(",") if m]:
            uncompile(pipe)
            gc.collect()
            name = f"compiled ({entry})"
            mode, *extras = entry.split("+")
            casts, vae = "casts" in extras, "eager_vae" not in extras
            where = tmp / entry.replace("+", "_")
            swept = mode if vae else None  # run_sweep(compile=...) would compile the VAE as well
            try:
                if smoke:  # graph capture without code generation: seconds on a CPU
                    compile_pipeline(pipe, mode, backend="eager", vae=vae)
                elif casts or not vae:  # compiled here; run_sweep leaves compiled parts as they are
                    compile_pipeline(pipe, mode, eager_casts=casts, vae=vae)
                warm_c = timed_sweep(
                    pipe, bargs, spec, batch, where.with_name(where.name + "_warm"), device, swept
                )
                secs_c = timed_sweep(pipe, bargs, spec, points, where, device, swept)
                step_c = bench_sweep.transformer_step_seconds(pipe, bargs, spec, batch, device)
            except Exception as err:  # a mode that does not fit is reported, not fatal
                rows.append({"config": name, "error": f"{type(err).__name__}: {err}"[:500]})
                print(f"{name} failed: {err}", flush=True)
                continue
            row = dict(
                config=name, images_per_s=points / secs_c, step_ms=1000 * step_c,
                step_speedup=step / step_c, sweep_s=secs_c, warm_s=warm_c,
                compile_s=warm_c - batch_s, bound_images_per_s=batch / (steps * step_c),
                **image_diff(eager, pngs(where)),
            )  # fmt: skip
            rows.append(row)
        for r in rows:
            if "images_per_s" in r:
                r["ratio"] = r["images_per_s"] / bound
                r["hours_60k"] = 60_000 / r["images_per_s"] / 3600
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        result["runs"] = rows
        result["eager_bound_images_per_s"] = bound
        result["step_times_note"] = "median of CUDA-event-timed transformer calls"
    print(write_results(out, "sweep_compiled", result, rows, COLUMNS, NOTE))


if __name__ == "__main__":
    main()
