"""Sweep throughput: images/s against batch size, next to the transformer-only bound of the same run.

    PYTHONPATH=. python benchmarks/bench_sweep.py --out results/            # CUDA: full-size schnell
    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/bench_sweep.py --scaling --out results/
    uv run python benchmarks/bench_sweep.py --smoke --out /tmp/bench        # CPU, flux-tiny, seconds

For each batch size B it runs `run_sweep` (prompt encoded once, B grid points per pipeline call,
VAE decode, PNG writes, points table) over at least `--batches` batches and `--min_images` images,
after one warm-up batch, and reports images/s; "pipeline calls only" times the same batches through
`generate_batch` without writing files (text encoding excluded; VAE decode and post-processing
included). The bound is what the transformer alone allows at that batch size:
B / (steps x median transformer step time), the step timed with CUDA events on the pipeline's own
transformer inputs (captured from a real call) after warm-up. `ratio` = sweep / bound.

`--scaling` (launched with torchrun on N GPUs): rank 0 first runs a sweep alone, then all N ranks run
the same number of points sharded; the speed-up is the ratio of the two wall times.
Weights are random (the exact architecture; no download): pixels mean nothing, cost is the real one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from flux_ir.models import REGISTRY, build_random_pipeline, build_tiny_pipeline
from flux_ir.sweep import Distributed, GridSpec, SweepConfig, run_sweep
from flux_ir.sweep.generate import encode_conditioning, generate_batch
from flux_ir.sweep.grid import grid_latents, vertex_latents


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--smoke", action="store_true", help="flux-tiny on the CPU, tiny sizes")
    p.add_argument(
        "--model", default=None, help="registry name (flux-schnell; flux-tiny with --smoke)"
    )
    p.add_argument("--size", type=int, default=None, help="pixels (512; 64 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (4; 2 with --smoke)")
    p.add_argument(
        "--batch_sizes", default=None, help="comma-separated (1,2,4,8,16; 1,2,4 with --smoke)"
    )
    p.add_argument("--batches", type=int, default=None, help="timed batches per batch size (3)")
    p.add_argument("--min_images", type=int, default=None, help="timed images per batch size (16)")
    p.add_argument("--step_repeats", type=int, default=None, help="timed transformer calls (10)")
    p.add_argument(
        "--scaling", action="store_true", help="multi-GPU speed-up (launch with torchrun)"
    )
    p.add_argument(
        "--scaling_points", type=int, default=None, help="points in the scaling sweep (64)"
    )
    p.add_argument(
        "--scaling_batch", type=int, default=None, help="batch size of the scaling sweep (8)"
    )
    args = p.parse_args(argv)
    full = dict(model="flux-schnell", size=512, steps=4, batch_sizes="1,2,4,8,16", batches=3, min_images=16,
                step_repeats=10, scaling_points=64, scaling_batch=8)  # fmt: skip
    smoke = dict(model="flux-tiny", size=64, steps=2, batch_sizes="1,2,4", batches=2, min_images=4,
                 step_repeats=3, scaling_points=8, scaling_batch=2)  # fmt: skip
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    return args


def build(args, device: str):
    spec = REGISTRY[args.model]
    if spec.source == "builtin":
        pipe = build_tiny_pipeline()
    else:
        pipe = build_random_pipeline(spec, device=device, dtype=torch.bfloat16)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, spec


def config(args, spec, n_points: int) -> SweepConfig:
    return SweepConfig(
        model=spec.name,
        width=args.size,
        height=args.size,
        num_steps=args.steps,
        guidance=spec.guidance,
        max_sequence_length=spec.max_sequence_length,
        grid=GridSpec(n_alpha=1, n_beta=n_points),
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def n_batches(args, batch: int) -> int:
    """Timed batches: at least `--batches`, and at least `--min_images` images in all."""
    return max(args.batches, -(-args.min_images // batch))


def sweep_rate(pipe, args, spec, batch: int, device: str, root: Path) -> float:
    """Images/s of run_sweep over `args.batches` batches of `batch` points, after a warm-up batch."""
    warm = root / f"warm{batch}"
    run_sweep(pipe, config(args, spec, batch), warm, batch_size=batch, progress=False)
    n = batch * n_batches(args, batch)
    sync(device)
    t0 = time.perf_counter()
    run_sweep(pipe, config(args, spec, n), root / f"b{batch}", batch_size=batch, progress=False)
    sync(device)
    return n / (time.perf_counter() - t0)


def pipeline_rate(pipe, args, spec, batch: int, device: str) -> float:
    """Images/s of the pipeline calls alone (prompt encoded once, no files), after a warm-up call."""
    cfg = config(args, spec, batch)
    z, _, _ = grid_latents(
        vertex_latents(cfg.seeds, args.size, args.size), cfg.grid, cfg.grid.points()
    )
    cond = encode_conditioning(pipe, cfg)
    generate_batch(pipe, cfg, cond, z)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_batches(args, batch)):
        generate_batch(pipe, cfg, cond, z)
    sync(device)
    return batch * n_batches(args, batch) / (time.perf_counter() - t0)


def transformer_step_seconds(pipe, args, spec, batch: int, device: str) -> float:
    """Median time of one transformer call at `batch`, on the inputs the pipeline itself passes."""
    captured: dict = {}

    def grab(module, a, kwargs):
        captured.setdefault("kwargs", kwargs)

    cfg = config(args, spec, batch)
    z, _, _ = grid_latents(
        vertex_latents(cfg.seeds, args.size, args.size), cfg.grid, cfg.grid.points()
    )
    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        generate_batch(pipe, cfg, encode_conditioning(pipe, cfg), z)
    finally:
        handle.remove()
    kwargs = captured["kwargs"]
    times = []
    with torch.inference_mode():
        for k in range(args.step_repeats + 2):
            if device.startswith("cuda"):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                pipe.transformer(**kwargs)
                end.record()
                torch.cuda.synchronize(device)
                elapsed = start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                pipe.transformer(**kwargs)
                elapsed = time.perf_counter() - t0
            if k >= 2:  # warm-up calls
                times.append(elapsed)
    return statistics.median(times)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


def batch_sweep(args, device: str) -> dict:
    pipe, spec = build(args, device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.batch_sizes:
            rate = sweep_rate(pipe, args, spec, b, device, Path(tmp))
            calls = pipeline_rate(pipe, args, spec, b, device)
            step = transformer_step_seconds(pipe, args, spec, b, device)
            bound = b / (args.steps * step)
            rows.append(
                {"batch_size": b, "images_per_s": rate, "pipeline_images_per_s": calls,
                 "transformer_step_s": step, "bound_images_per_s": bound, "ratio": rate / bound}
            )  # fmt: skip
            print(
                f"batch {b:3d}: {rate:8.3f} img/s, bound {bound:8.3f} img/s, ratio {rate / bound:.3f}",
                flush=True,
            )
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"mode": "batch", "rows": rows}


def scaling(args, dist: Distributed, device: str) -> dict | None:
    pipe, spec = build(args, device)
    cfg = config(args, spec, args.scaling_points)
    root = Path(tempfile.mkdtemp(prefix="bench_scaling_")) if dist.is_main else None
    # warm-up on every rank, then rank 0 alone, then all ranks sharded
    run_sweep(
        pipe,
        config(args, spec, args.scaling_batch),
        Path(tempfile.mkdtemp()),
        batch_size=args.scaling_batch,
        progress=False,
    )
    dist.barrier()
    one = None
    if dist.is_main:
        t0 = time.perf_counter()
        run_sweep(pipe, cfg, root / "one", batch_size=args.scaling_batch, progress=False)
        one = time.perf_counter() - t0
    dist.barrier()
    shared = Path(os.environ.get("BENCH_SCALING_DIR", "/tmp/bench_scaling_shared"))
    if dist.is_main and shared.exists():
        shutil.rmtree(shared)
    dist.barrier()
    t0 = time.perf_counter()
    run_sweep(pipe, cfg, shared, batch_size=args.scaling_batch, dist=dist, progress=False)
    many = time.perf_counter() - t0
    if not dist.is_main:
        return None
    row = {
        "processes": dist.world, "points": args.scaling_points, "batch_size": args.scaling_batch,
        "one_process_s": one, "all_processes_s": many, "speedup": one / many,
        "images_per_s_one": args.scaling_points / one, "images_per_s_all": args.scaling_points / many,
    }  # fmt: skip
    print(
        f"{dist.world} processes: {row['speedup']:.2f}x one ({one:.1f} s -> {many:.1f} s)",
        flush=True,
    )
    return {"mode": "scaling", "rows": [row]}


def markdown(result: dict) -> str:
    head = f"{result['device']}, {result['model']} (random weights), {result['size']}², {result['steps']} steps, {result['date']}\n\n"
    if result["mode"] == "batch":
        lines = ["| batch | sweep img/s | pipeline calls only img/s | transformer step (ms) | bound img/s | sweep / bound |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        lines += [
            f"| {r['batch_size']} | {r['images_per_s']:.3f} | {r['pipeline_images_per_s']:.3f} | "
            f"{1000 * r['transformer_step_s']:.1f} | {r['bound_images_per_s']:.3f} | {r['ratio']:.3f} |"
            for r in result["rows"]
        ]
    else:
        lines = ["| GPUs | points | batch | one GPU (s) | all GPUs (s) | speed-up |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        lines += [
            f"| {r['processes']} | {r['points']} | {r['batch_size']} | {r['one_process_s']:.1f} | "
            f"{r['all_processes_s']:.1f} | {r['speedup']:.2f}x |"
            for r in result["rows"]
        ]
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    dist = Distributed.from_env()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on the CPU", file=sys.stderr)
        return 2
    device = dist.device(None if not args.smoke else "cpu")
    if args.scaling:
        if dist.world < 2:
            print(
                "--scaling needs several processes: torchrun --nproc_per_node N ...",
                file=sys.stderr,
            )
            return 2
        dist.init(device)
        try:
            result = scaling(args, dist, device)
        finally:
            dist.close()
        if result is None:
            return 0
    else:
        result = batch_sweep(args, device)
    result.update(
        device=device_name(device), model=args.model, size=args.size, steps=args.steps,
        date=dt.date.today().isoformat(), torch=torch.__version__, smoke=args.smoke,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_sweep_{result['mode']}{'_smoke' if args.smoke else ''}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
