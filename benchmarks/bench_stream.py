"""Streaming store: a full capture written as safetensors shards while generating, bounded host RSS.

    PYTHONPATH=. python benchmarks/bench_stream.py --out results/      # CUDA: flux-dev 1024², 28 steps
    PYTHONPATH=. python benchmarks/bench_stream.py --smoke

What is measured: flux-dev architecture (random bf16 weights) at 1024², every block, both streams,
every step, streamed to `--scratch` (deleted at the end) with the command line's `--copy` copier
(`pageable`, its default: side-stream copies drained into ordinary host tensors; `pinned` keeps
page-locked chunks that torch's host allocator caches, so the process holds up to its budget) and
the shard writer.
Host RSS is read from /proc/self/status (VmRSS sampled every 50 ms and VmHWM after a `clear_refs`
reset); "RSS above model" is the peak minus the RSS right after the model was built. Write
throughput is shard bytes over the capture's wall time; "disk seq write" is a separate 4 GB write with
fsync to the same directory; "plain" is the same generation without capture.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    RssSampler,
    parser,
    pipeline,
    proc_status,
    reset_peak_rss,
    sampling_options,
    sync,
    write_results,
)

from flux_ir.capture import CaptureOptions, run_capture
from flux_ir.capture.copy import COPIERS, make_copier
from flux_ir.sampling import generate
from flux_ir.store import ShardWriter, load_capture

NOTE = __doc__.split("What is measured:")[1]


def disk_write_speed(directory: Path, nbytes: int) -> float:
    """Sequential write speed (bytes/s) of `nbytes` in 64 MB chunks, fsync included."""
    chunk = os.urandom(1 << 20) * 64
    path = directory / "disk_speed.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(chunk))):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    path.unlink()
    return size / dt


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument(
        "--copy",
        default="pageable",
        choices=COPIERS,
        help="the command line's --copy (default pageable)",
    )
    p.add_argument("--scratch", default=None, help="directory for the shards (default: a temp dir)")
    p.add_argument(
        "--time_budget",
        type=float,
        default=110.0,
        help="fewer steps (reported) when the disk would need longer than this for all of them",
    )
    args = p.parse_args()
    size, steps = (64, 4) if args.smoke else (args.size, args.steps)
    scratch = Path(tempfile.mkdtemp(prefix="flux_ir_stream_", dir=args.scratch))
    previous = signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # `finally` deletes shards
    try:
        pipe, spec = pipeline(args.model, args.smoke)
        base_rss = proc_status("VmRSS")  # the model's (conservative: taken before any capture)
        opts = CaptureOptions(sampling_options(size, steps, 32 if args.smoke else 512), seed=0)

        def with_steps(n: int) -> CaptureOptions:
            return dataclasses.replace(
                opts, sampling=dataclasses.replace(opts.sampling, num_steps=n)
            )

        # per-step bytes from one captured step, to check the disk has room for the full run
        _, probe = run_capture(pipe, with_steps(1))
        per_step = sum(
            t.numel() * t.element_size()
            for store in (probe.double_blocks, probe.single_blocks)
            for steps_ in store.values()
            for v in steps_
            for t in (v if isinstance(v, tuple) else (v,))
        )
        del probe
        disk_Bps = disk_write_speed(scratch, (64 << 20) if args.smoke else (4 << 30))
        free = shutil.disk_usage(scratch).free
        fit = max(1, min(steps, int((free - (4 << 30)) / per_step) if per_step else steps))
        by_time = max(1, int(args.time_budget * disk_Bps / per_step)) if per_step else steps
        if min(fit, by_time) < steps:
            print(
                f"{free / 1e9:.0f} GB free, disk {disk_Bps / 1e9:.2f} GB/s: capturing "
                f"{min(fit, by_time)} of {steps} steps",
                flush=True,
            )
        fit = min(fit, by_time)
        partial = dict(
            status="started",
            model=spec.name,
            size=size,
            steps=fit,
            steps_requested=steps,
            GB_per_step=per_step / 1e9,
            disk_seq_write_GBps=disk_Bps / 1e9,
            free_disk_GB=free / 1e9,
        )
        write_results(args.out, "stream_store", partial, [partial], COLUMNS[:1], NOTE)
        opts = with_steps(fit)
        with torch.inference_mode():  # (the 1-step probe above was the warm-up)
            sync()
            t0 = time.perf_counter()
            generate(pipe, opts.sampling, seed=0, output_type="latent")
            sync()
            plain_s = time.perf_counter() - t0
        hwm_reset = reset_peak_rss()
        copier = make_copier(args.copy)
        writer = ShardWriter(scratch / "capture")
        with RssSampler() as rss:
            sync()
            t0 = time.perf_counter()
            _, cap = run_capture(pipe, opts, copier=copier, sink=writer)
            writer.finish(cap)
            capture_s = time.perf_counter() - t0
        getattr(copier, "close", copier.synchronize)()
        peak = max(rss.peak, proc_status("VmHWM") if hwm_reset else 0)
        written = writer.bytes_written
        lazy = load_capture(scratch / "capture")
        t1 = time.perf_counter()
        one = lazy["single", 37 if not args.smoke else 1, fit - 1]
        read_one_s = time.perf_counter() - t1
        result = dict(
            status="done",
            copy=args.copy,
            free_disk_GB=free / 1e9,
            model=spec.name,
            size=size,
            steps=fit,
            steps_requested=steps,
            captured_GB=written / 1e9,
            GB_per_step=per_step / 1e9,
            plain_s=plain_s,
            capture_s=capture_s,
            ratio=capture_s / plain_s,
            base_rss_GB=base_rss / 1e9,
            peak_rss_GB=peak / 1e9,
            rss_above_model_GB=(peak - base_rss) / 1e9,
            hwm_reset=hwm_reset,
            write_GBps=written / capture_s / 1e9,
            disk_seq_write_GBps=disk_Bps / 1e9,
            read_one_block_step_s=read_one_s,
            read_one_shape=list(one.shape),
            shards=len(writer.shards),
        )
        row = {k: result[k] for k in COLUMNS}
        print(write_results(args.out, "stream_store", result, [row], COLUMNS, NOTE))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


COLUMNS = [
    "steps",
    "captured_GB",
    "ratio",
    "rss_above_model_GB",
    "write_GBps",
    "disk_seq_write_GBps",
    "read_one_block_step_s",
]

if __name__ == "__main__":
    main()
