"""Sweep throughput: images/s against batch size, next to the transformer-only bound of the same run.

    PYTHONPATH=. python benchmarks/bench_sweep.py --out results/            # CUDA: full-size schnell
    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/bench_sweep.py --scaling --out results/
    uv run python benchmarks/bench_sweep.py --smoke --out /tmp/bench        # CPU, flux-tiny, seconds

For each batch size B it runs `run_sweep` (prompt encoded once, B grid points per pipeline call,
VAE decode, PNG writes, points table) over at least `--batches` batches and `--min_images` images,
after one warm-up batch (the last batch's PNG writing overlaps nothing and is timed: eight batches
keep that end effect near what a sweep of hundreds of points sees), and reports images/s; "pipeline calls only" times the same batches through
`generate_batch` without writing files (text encoding excluded; VAE decode and the uint8 copy to the
host included). The bound is what the transformer alone allows at that batch size:
B / (steps x median transformer step time), the step timed with CUDA events on the pipeline's own
transformer inputs (captured from a real call) after warm-up. `ratio` = sweep / bound.

The breakdown splits the sweep's wall time: transformer steps (batches x steps x step time), VAE
decode (batches x the median time of `decode_packed_uint8` plus the copy to the host, timed alone),
text encoding (once per sweep, measured inside the sweep), writing (the time the generation waited
for the background writer: a full queue and the final flush; the writer's own busy time is reported
apart, it overlaps the generation) and the rest (pipeline set-up per call, scheduler, latents, sweep
bookkeeping). `bound with VAE` = B / (steps x step + decode): the best a sweep that decodes can do.
The decode is also timed with the VAE in channels_last memory format, a candidate speed-up that the
sweep does not use (it would change pixels by float rounding).

`--scaling` (launched with torchrun on N GPUs, one per rank by LOCAL_RANK): every rank warms up,
rank 0 runs a sweep alone, then all N ranks run the same points sharded; the speed-up is the ratio of
the two wall times, both measured in this run. `benchmarks/run_sweep_scaling.sh` launches it.
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

from flux_ir.geometry import pack_latents
from flux_ir.lens.decode import decode_packed_uint8
from flux_ir.models import REGISTRY, build_random_pipeline, build_tiny_pipeline
from flux_ir.sampling import encode_prompt
from flux_ir.sweep import Distributed, GridSpec, SweepConfig, run_sweep
from flux_ir.sweep.generate import generate_batch
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
    p.add_argument("--batches", type=int, default=None, help="timed batches per batch size (8)")
    p.add_argument("--min_images", type=int, default=None, help="timed images per batch size (64)")
    p.add_argument("--step_repeats", type=int, default=None, help="timed transformer calls (10)")
    p.add_argument(
        "--scaling", action="store_true", help="multi-GPU speed-up (launch with torchrun)"
    )
    p.add_argument(
        "--scaling_points", type=int, default=None, help="points in the scaling sweep (128)"
    )
    p.add_argument(
        "--scaling_batch", type=int, default=None, help="batch size of the scaling sweep (8)"
    )
    args = p.parse_args(argv)
    full = dict(model="flux-schnell", size=512, steps=4, batch_sizes="1,2,4,8,16", batches=8, min_images=64,
                step_repeats=10, scaling_points=128, scaling_batch=8)  # fmt: skip
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
    return SweepConfig.from_spec(
        spec,
        grid=GridSpec(n_alpha=1, n_beta=n_points),
        width=args.size,
        height=args.size,
        num_steps=args.steps,
        guidance=spec.guidance,
        max_sequence_length=spec.max_sequence_length,
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def n_batches(args, batch: int) -> int:
    """Timed batches: at least `--batches`, and at least `--min_images` images in all."""
    return max(args.batches, -(-args.min_images // batch))


def sweep_rate(pipe, args, spec, batch: int, device: str, root: Path) -> tuple[float, float, dict]:
    """(images/s, seconds, timings) of run_sweep over `n_batches` batches of `batch` points, after a
    warm-up batch; timings: text encoding and the waits on the writer, from the sweep itself."""
    warm = root / f"warm{batch}"
    run_sweep(pipe, config(args, spec, batch), warm, batch_size=batch, progress=False)
    n = batch * n_batches(args, batch)
    sync(device)
    t0 = time.perf_counter()
    result = run_sweep(
        pipe, config(args, spec, n), root / f"b{batch}", batch_size=batch, progress=False
    )
    sync(device)
    seconds = time.perf_counter() - t0
    return n / seconds, seconds, result.timings


def batch_latents(args, spec, batch: int):
    cfg = config(args, spec, batch)
    vertices = vertex_latents(cfg.seeds, args.size, args.size)
    return cfg, grid_latents(vertices, cfg.grid, cfg.grid.points())[0]


def pipeline_rate(pipe, args, spec, batch: int, device: str) -> float:
    """Images/s of the pipeline calls alone (prompt encoded once, no files), after a warm-up call;
    each call's pixels are waited for on the host."""
    cfg, z = batch_latents(args, spec, batch)
    cond = encode_prompt(pipe, cfg.sampling)
    generate_batch(pipe, cfg, cond, z)[0].numpy()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_batches(args, batch)):
        generate_batch(pipe, cfg, cond, z)[0].numpy()
    sync(device)
    return batch * n_batches(args, batch) / (time.perf_counter() - t0)


def decode_seconds(pipe, args, spec, batch: int, device: str, repeats: int = 3) -> float:
    """Median time to VAE-decode a batch to uint8 pixels and copy them to the host."""
    _, z = batch_latents(args, spec, batch)
    packed = pack_latents(z).to(pipe._execution_device, pipe.transformer.dtype)
    times = []
    for k in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        decode_packed_uint8(pipe, packed, args.size, args.size).cpu()
        sync(device)
        if k > 0:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
        generate_batch(pipe, cfg, encode_prompt(pipe, cfg.sampling), z)
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
            rate, seconds, timings = sweep_rate(pipe, args, spec, b, device, Path(tmp))
            calls = pipeline_rate(pipe, args, spec, b, device)
            step = transformer_step_seconds(pipe, args, spec, b, device)
            decode = decode_seconds(pipe, args, spec, b, device)
            pipe.vae.to(memory_format=torch.channels_last)  # a candidate speed-up, timed apart
            decode_cl = decode_seconds(pipe, args, spec, b, device)
            pipe.vae.to(memory_format=torch.contiguous_format)
            bound = b / (args.steps * step)
            row = {
                "batch_size": b, "images_per_s": rate, "pipeline_images_per_s": calls,
                "transformer_step_s": step, "bound_images_per_s": bound, "ratio": rate / bound,
                "pipeline_ratio": calls / bound, "vae_decode_s": decode,
                "vae_decode_channels_last_s": decode_cl,
                "bound_with_vae_images_per_s": b / (args.steps * step + decode),
                "sweep_s": seconds, "batches": n_batches(args, b),
                "writer_busy_s": timings.get("write_busy_s", 0.0),
            }  # fmt: skip
            row["breakdown"] = breakdown(row, args.steps, timings)
            rows.append(row)
            share = ", ".join(f"{k} {v:.0%}" for k, v in row["breakdown"].items())
            print(
                f"batch {b:3d}: {rate:8.3f} img/s, pipeline {calls:8.3f}, bound {bound:8.3f} img/s, "
                f"ratio {rate / bound:.3f} ({share})",
                flush=True,
            )
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"mode": "batch", "rows": rows}


def breakdown(row: dict, steps: int, timings: dict) -> dict:
    """Shares of the sweep's wall time: transformer, VAE decode, text encoding, writing, the rest."""
    total, batches = row["sweep_s"], row["batches"]
    parts = {
        "transformer": batches * steps * row["transformer_step_s"] / total,
        "vae_decode": batches * row["vae_decode_s"] / total,
        "text_encoding": timings.get("encode_s", 0.0) / total,
        "writing": timings.get("write_blocked_s", 0.0) / total,
    }
    parts["other"] = 1.0 - sum(parts.values())
    return parts


def scaling_dir() -> Path:
    """A directory shared by the ranks of this launch (same host), unique to the launch."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    port = os.environ.get("MASTER_PORT", "0")
    return Path(tempfile.gettempdir()) / f"flux_ir_bench_scaling_{run}_{port}"


def scaling(args, dist: Distributed, device: str) -> dict | None:
    pipe, spec = build(args, device)
    cfg = config(args, spec, args.scaling_points)
    root = Path(tempfile.mkdtemp(prefix="bench_scaling_")) if dist.is_main else None
    # warm-up on every rank, then rank 0 alone, then all ranks sharded
    with tempfile.TemporaryDirectory() as warm:
        warm_cfg = config(args, spec, args.scaling_batch)
        run_sweep(pipe, warm_cfg, warm, batch_size=args.scaling_batch, progress=False)
    sync(device)
    dist.barrier()
    one = None
    if dist.is_main:
        t0 = time.perf_counter()
        run_sweep(pipe, cfg, root / "one", batch_size=args.scaling_batch, progress=False)
        sync(device)
        one = time.perf_counter() - t0
    dist.barrier()
    shared = scaling_dir()
    if dist.is_main and shared.exists():
        shutil.rmtree(shared)
    dist.barrier()
    t0 = time.perf_counter()
    result = run_sweep(pipe, cfg, shared, batch_size=args.scaling_batch, dist=dist, progress=False)
    sync(device)
    many = time.perf_counter() - t0
    devices = [None] * dist.world
    gather_object(devices, f"{device} ({device_name(device)}): {result.generated} points", dist)
    if not dist.is_main:
        return None
    complete = json.loads((shared / "metadata.json").read_text())["complete"]
    shutil.rmtree(shared, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    row = {
        "processes": dist.world, "points": args.scaling_points, "batch_size": args.scaling_batch,
        "one_process_s": one, "all_processes_s": many, "speedup": one / many,
        "images_per_s_one": args.scaling_points / one, "images_per_s_all": args.scaling_points / many,
        "ranks": devices, "complete": complete,
    }  # fmt: skip
    print(
        f"{dist.world} processes: {row['speedup']:.2f}x one ({one:.1f} s -> {many:.1f} s)",
        flush=True,
    )
    return {"mode": "scaling", "rows": [row]}


def gather_object(out: list, obj, dist: Distributed) -> None:
    """All ranks' `obj` into `out` (rank order); one process: just this one."""
    import torch.distributed as torch_dist

    if dist.world > 1 and torch_dist.is_initialized():
        torch_dist.all_gather_object(out, obj)
    else:
        out[:] = [obj]


def markdown(result: dict) -> str:
    head = f"{result['device']}, {result['model']} (random weights), {result['size']}², {result['steps']} steps, {result['date']}\n\n"
    if result["mode"] == "batch":
        lines = ["| batch | sweep img/s | pipeline calls only img/s | transformer step (ms) | bound img/s | sweep / bound | pipeline / bound | VAE decode (ms) | bound with VAE img/s | sweep / bound with VAE |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        lines += [
            f"| {r['batch_size']} | {r['images_per_s']:.3f} | {r['pipeline_images_per_s']:.3f} | "
            f"{1000 * r['transformer_step_s']:.1f} | {r['bound_images_per_s']:.3f} | {r['ratio']:.3f} | "
            f"{r['pipeline_ratio']:.3f} | {1000 * r['vae_decode_s']:.1f} | "
            f"{r['bound_with_vae_images_per_s']:.3f} | "
            f"{r['images_per_s'] / r['bound_with_vae_images_per_s']:.3f} |"
            for r in result["rows"]
        ]
        lines += ["", "Share of the sweep's wall time (writer busy: its own time, overlapping the generation):", "",
                  "| batch | transformer | VAE decode | text encoding | writing (waited) | other | writer busy |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in result["rows"]:
            b = r["breakdown"]
            lines.append(
                f"| {r['batch_size']} | {b['transformer']:.1%} | {b['vae_decode']:.1%} | "
                f"{b['text_encoding']:.1%} | {b['writing']:.1%} | {b['other']:.1%} | "
                f"{r['writer_busy_s'] / r['sweep_s']:.1%} |"
            )
        cl = ", ".join(
            f"batch {r['batch_size']}: {1000 * r['vae_decode_channels_last_s']:.1f} ms "
            f"({r['vae_decode_channels_last_s'] / r['vae_decode_s']:.2f}x)"
            for r in result["rows"]
        )
        lines += ["", f"VAE decode with the VAE in channels_last (not used by the sweep): {cl}"]
    else:
        lines = ["| GPUs | points | batch | one GPU (s) | all GPUs (s) | one GPU img/s | all GPUs img/s | speed-up |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        lines += [
            f"| {r['processes']} | {r['points']} | {r['batch_size']} | {r['one_process_s']:.1f} | "
            f"{r['all_processes_s']:.1f} | {r['images_per_s_one']:.3f} | {r['images_per_s_all']:.3f} | "
            f"{r['speedup']:.2f}x |"
            for r in result["rows"]
        ]
        lines += ["", *[f"- rank {k}: {d}" for k, d in enumerate(result["rows"][0]["ranks"])]]
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
