"""Capture overhead as users meet it: whole pipeline calls through the public API and the command line.

    PYTHONPATH=. python benchmarks/bench_capture_api.py --out results/       # CUDA: flux-dev, random bf16
    PYTHONPATH=. python benchmarks/bench_capture_api.py --smoke --out /tmp/b  # CPU, flux-tiny, seconds

What is measured. Public API, in one process, per size (batch 1, `--steps` steps, every block, both
streams, every step): a whole pipeline call as a user makes it, text encoding, denoising and VAE
decode to PIL images: `generate(pipe, opts)` (plain) against `run_capture(pipe, opts,
copier=make_copier(kind))` with a new copier for every capture, as the command line makes one,
timed until run_capture returned (the copier synchronised: every tensor is in host memory). Each
size starts with an empty page-locked pool (`reset_host_pool()`) and one plain call (the shapes'
kernels warm up there); then `first`: the first capture at that size (the first of the process at
the first size), with the `--first` copier; then `prepared`: the pool emptied again,
`prepare_capture(pipe, opts)` called before one plain call (the work beside which page-locking runs,
as loading the model is on the command line), and a capture with a new `--first` copier; then
`--rounds` rounds of plain and each copier in turn, the previous capture dropped before the next
(medians; `min`: the fastest round of each, against plain's fastest, as the host's noise makes some
rounds far slower). `first × plain` divides by plain's median.
For the first capture: bytes the copier carved from the pool and staged (no region ready yet), and
the pool's regions made meanwhile. Pool diagnostics (first size): the pool's growth rate (GB/s,
from empty, its default threads; per thread, split into touching the pages and registering them;
whether huge pages stayed advised), the same with ordinary pages only, `torch.empty(pin_memory=True)`
for comparison, and a plain call made while the pool grows by one capture's size (does
page-locking slow the generation?).

Command line, end to end (`--cli_sizes`): `capture_sample.py --should_decode_intermediates False`
against a plain generation process of the same pipeline (`load_pipeline`, `generate`, the image
saved as the command line saves it), each a fresh process; wall time from launch to exit, and phase
by phase from inside (module functions wrapped, the command's code unchanged): loading, the first
denoising step, the generation or capture in host memory (`run_capture`: the same whole call as
plain's `generate`, both the first of their process), the save (`save_capture`: the `.pt` written,
hashed and fsync'ed) with its throughput beside the disk's own (random bytes of the capture's size
written and fsync'ed in the same directory). Peak device memory as nvidia-smi shows it.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    NvidiaSmi,
    device_info,
    disk_write_GBps,
    parser,
    pipeline,
    sync,
    timed_command,
    write_results,
)

from flux_ir.capture import CaptureOptions, Selection, make_copier, prepare_capture, run_capture
from flux_ir.capture.copy import HostPool, host_pool, make_region, reset_host_pool
from flux_ir.capture.run import capture_nbytes
from flux_ir.sampling import SamplingOptions, generate

NOTE = __doc__.split("What is measured.")[1]
PROMPT = "a photo of a cat"
API_COLUMNS = [
    "size",
    "config",
    "median_s",
    "x_plain",
    "min_s",
    "min_x_plain",
    "first_s",
    "first_x_plain",
    "first_staged_GB",
    "prepared_s",
    "prepared_x_plain",
]
CLI_COLUMNS = [
    "size", "process", "wall_s", "loaded_s", "first_step_s", "generate_s", "x_plain",
    "save_s", "save_GBps", "disk_GBps", "capture_GB", "peak_nvidia_smi_GB",
]  # fmt: skip


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# -- public API ------------------------------------------------------------------------------------
def api(args, result: dict, rows: list[dict], out: Path) -> None:
    pipe, spec = pipeline(args.model, args.smoke)
    cuda = torch.cuda.is_available() and not args.smoke
    result["api"] = {}
    for size in args.sizes:
        result["api"][f"{size}"] = api_size(pipe, spec, size, args, rows, cuda)
        write_all(out, result, rows)
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def api_size(pipe, spec, size: int, args, rows: list[dict], cuda: bool) -> dict:
    """Plain and captures at one size (module docstring); appends the table's rows."""
    sampling = SamplingOptions(PROMPT, size, size, args.steps, args.max_len)
    opts = CaptureOptions(sampling, seed=0)

    def plain():
        return generate(pipe, sampling, seed=0, progress=False).images

    def capture(kind: str, stats: dict | None = None):
        copier = make_copier(kind)
        images, cap = run_capture(pipe, opts, model_name=spec.name, copier=copier, progress=False)
        if stats is not None:
            stats.update(getattr(copier, "stats", {}))
        return images, cap

    def timed(fn, *a):
        gc.collect()  # the previous capture's regions go back to the pool, outside the timing
        sync()
        t0 = time.perf_counter()
        out = fn(*a)
        sync()
        return time.perf_counter() - t0, out

    reset_host_pool()
    gc.collect()
    plain_first, _ = timed(plain)
    pool0 = dict(host_pool().stats)
    copier_stats: dict = {}
    first_s, kept = timed(capture, args.first, copier_stats)
    made = {k: v - pool0.get(k, 0) for k, v in host_pool().stats.items()}
    del kept
    # the README's way: prepare_capture before other work (here one plain call, as loading the
    # model would be), then a capture with a new copier into the prepared, otherwise empty pool
    reset_host_pool()
    gc.collect()
    sync()
    t0 = time.perf_counter()
    prepare_capture(pipe, opts)
    plain()
    sync()
    plain_beside_prepare = time.perf_counter() - t0
    host_pool().wait_idle()
    prepared_s, kept = timed(capture, args.first)
    del kept
    names = ["plain", *args.copiers]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):  # in turn: a drift of the machine hits every configuration
        for name in names:
            dt, kept = timed(plain) if name == "plain" else timed(capture, name)
            times[name].append(dt)
            del kept
    base = median(times["plain"])
    res = {
        "plain_first_s": plain_first,
        "first": {
            "copier": args.first,
            "seconds": first_s,
            "x_plain": first_s / base,
            "copier_stats": copier_stats,
            "pool_made": made,
        },
        "prepared": {
            "copier": args.first,
            "seconds": prepared_s,
            "x_plain": prepared_s / base,
            "plain_beside_prepare_s": plain_beside_prepare,
        },
        "times_s": times,
    }
    for name in names:
        row = dict(size=f"{size}²", config=name, median_s=median(times[name]))
        row["x_plain"] = row["median_s"] / base
        row["min_s"] = min(times[name])
        row["min_x_plain"] = row["min_s"] / min(times["plain"])
        if name == "plain":
            row.update(first_s=plain_first, first_x_plain=plain_first / base)
        if name == args.first:
            row.update(
                first_s=first_s,
                first_x_plain=first_s / base,
                first_staged_GB=copier_stats.get("staged_bytes", 0) / 1e9,
                prepared_s=prepared_s,
                prepared_x_plain=prepared_s / base,
            )
        rows.append(row)
    sel = Selection().resolve(
        len(pipe.transformer.transformer_blocks),
        len(pipe.transformer.single_transformer_blocks),
        args.steps,
    )
    capture_bytes = capture_nbytes(pipe.transformer, sel, sampling, 1)[0]
    res["capture_GB_estimate"] = capture_bytes / 1e9
    if size == args.sizes[0]:
        res["pool"] = pool_diagnostics(plain, base, capture_bytes, cuda)
    print(
        f"api {size}²: plain {base:.3f} s; "
        + ", ".join(f"{n} {median(times[n]) / base:.3f}x" for n in args.copiers)
        + f"; first {args.first} {first_s / base:.3f}x, prepared {prepared_s / base:.3f}x "
        f"(staged {copier_stats.get('staged_bytes', 0) / 1e9:.2f} GB)",
        flush=True,
    )
    return res


def pool_diagnostics(plain, plain_median: float, nbytes: int, cuda: bool) -> dict:
    """The pool's growth rate from empty, torch's page-locking rate, and a plain call made while the
    pool grows by `nbytes`."""
    out: dict = {"threads": host_pool().threads}
    reset_host_pool()
    pool = host_pool()
    t0 = time.perf_counter()
    pool.reserve(nbytes)
    pool.wait_idle()
    wall = time.perf_counter() - t0
    st = pool.stats
    out["grow_GBps"] = st["made_bytes"] / wall / 1e9
    out["grow_per_thread_GBps"] = st["made_bytes"] / max(st["make_s"], 1e-9) / 1e9
    out["touch_per_thread_GBps"] = st["made_bytes"] / max(st["touch_s"], 1e-9) / 1e9
    out["register_per_thread_GBps"] = (
        st["made_bytes"] / max(st["make_s"] - st["touch_s"], 1e-9) / 1e9
    )
    out["huge_pages_kept"] = pool.huge_pages
    region = make_region(256 << 20, pool.pin)
    out["registered"] = region.registered  # cudaHostRegister worked (else torch's pinned memory)
    del region
    pool.reserve(-nbytes)
    reset_host_pool()
    small = HostPool(huge_pages=False)  # ordinary pages only, for comparison
    t0 = time.perf_counter()
    small.reserve(nbytes)
    small.wait_idle()
    out["grow_4k_pages_GBps"] = small.stats["made_bytes"] / (time.perf_counter() - t0) / 1e9
    small.close()
    if cuda:
        n, t0 = 8, time.perf_counter()
        keep = [torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(n)]
        out["torch_pin_GBps"] = n * (256 << 20) / (time.perf_counter() - t0) / 1e9
        del keep
    reset_host_pool()
    pool = host_pool()
    sync()
    t0 = time.perf_counter()
    pool.reserve(nbytes)
    plain()
    sync()
    out["plain_while_growing_x_plain"] = (time.perf_counter() - t0) / plain_median
    pool.wait_idle()
    pool.reserve(-nbytes)
    reset_host_pool()
    print(
        f"pool: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()})}"
    )
    return out


# -- the command line -------------------------------------------------------------------------------
def cli_flags(args, size: int) -> dict:
    return dict(
        model=args.model,
        weights=None if args.smoke else "random",
        width=size,
        height=size,
        num_steps=args.steps,
        seed=0,
        prompt=PROMPT,
    )


def child_plain(flags: dict, timing_out: str) -> None:
    """A plain generation process: what the command line does, without the capture."""
    marks = {"start": time.time()}
    from flux_ir.capture import CaptureOptions
    from flux_ir.io.images import sampling_exif, save_image
    from flux_ir.models import LoadOptions, load_pipeline

    load = LoadOptions.create(flags["model"], None, False, flags["weights"] or "pretrained")
    opts = CaptureOptions.from_spec(
        load.spec,
        seed=flags["seed"],
        prompt=flags["prompt"],
        width=flags["width"],
        height=flags["height"],
        num_steps=flags["num_steps"],
    )
    marks["load_begin"] = time.time()
    pipe, spec = load_pipeline(load)
    sync()
    marks["load_end"] = time.time()

    def first_step(module, args, kwargs) -> None:
        marks.setdefault("first_step", time.time())

    pipe.transformer.register_forward_pre_hook(first_step, with_kwargs=True)
    marks["generate_begin"] = time.time()
    images = generate(pipe, opts.sampling, seed=opts.seed, num_images=opts.num_images).images
    sync()
    marks["generate_end"] = time.time()
    out = Path(flags["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    save_image(images[0], out / "img_0.jpg", sampling_exif(spec.name, opts.sampling.prompt))
    marks["save_end"] = marks["end"] = time.time()
    Path(timing_out).write_text(json.dumps({"marks": marks, "rc": 0}))


def child_cli(flags: dict, timing_out: str) -> int:
    from flux_ir.cli.capture import capture

    argv = []
    for key, value in flags.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    argv += ["--should_decode_intermediates", "False"]
    return timed_command(capture, argv, "capture_sample.py", timing_out)


def run_child(kind: str, flags: dict, scratch: Path, args) -> dict:
    timing = scratch / f"{kind}_timing.json"
    cmd = [sys.executable, __file__, "--child", kind, "--child_flags", json.dumps(flags)]
    cmd += ["--timing_out", str(timing)]
    t0 = time.time()
    with NvidiaSmi() as smi:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    wall = time.time() - t0
    if proc.returncode or not timing.is_file():
        raise RuntimeError(f"{kind} process failed ({proc.returncode}): {proc.stderr[-3000:]}")
    data = json.loads(timing.read_text())
    m = data["marks"]
    gen = "capture" if kind == "cli" else "generate"
    res = {
        "process": "capture_sample.py" if kind == "cli" else "plain generation",
        "wall_s": wall,
        "loaded_s": m["load_end"] - t0,
        "first_step_s": m.get("first_step", float("nan")) - t0,
        "generate_s": m[f"{gen}_end"] - m[f"{gen}_begin"],
        "peak_nvidia_smi_GB": smi.peak_GB,
        "peak_device_used_GB": data.get("peak_device_used_GB"),
        "marks": m,
    }
    if kind == "cli":
        res["save_s"] = m["save_end"] - m["save_begin"]
        files = list(scratch.rglob("capture_*.pt"))
        res["capture_GB"] = sum(f.stat().st_size for f in files) / 1e9
        res["save_GBps"] = res["capture_GB"] / res["save_s"]
        res["after_save_s"] = m["end"] - m["save_end"]  # images, metadata
    return res


def cli(args, result: dict, rows: list[dict], out: Path) -> None:
    result["cli"] = {}
    for size in args.cli_sizes:
        scratch = Path(tempfile.mkdtemp(prefix="bench_capture_cli_", dir=args.scratch))
        try:
            flags = cli_flags(args, size)
            plain = run_child(
                "plain", {**flags, "output_dir": str(scratch / "plain")}, scratch, args
            )
            flags = {**flags, "output_dir": str(scratch / "capture")}
            cap = run_child("cli", flags, scratch, args)
            cap["x_plain"] = cap["generate_s"] / plain["generate_s"]
            cap["disk_GBps"] = disk_write_GBps(scratch, max(int(cap["capture_GB"] * 1e9), 1 << 20))
            cap["wall_without_save_x_plain"] = (cap["wall_s"] - cap["save_s"]) / plain["wall_s"]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        result["cli"][f"{size}"] = {"plain": plain, "capture": cap}
        for r in (plain, cap):
            rows.append({"size": f"{size}²", **{k: v for k, v in r.items() if k != "marks"}})
        print(
            f"cli {size}²: plain process {plain['wall_s']:.1f} s, capture process "
            f"{cap['wall_s']:.1f} s; in memory {cap['generate_s']:.3f} s vs "
            f"{plain['generate_s']:.3f} s ({cap['x_plain']:.3f}x); save {cap['save_s']:.1f} s "
            f"({cap['save_GBps']:.2f} GB/s, disk {cap['disk_GBps']:.2f} GB/s)",
            flush=True,
        )
        write_all(out, result, rows)


# -- results ---------------------------------------------------------------------------------------
def write_all(out: Path, result: dict, rows: list[dict]) -> str:
    api_rows = [r for r in rows if "config" in r]
    cli_rows = [r for r in rows if "process" in r]
    table = write_results(out, "capture_api", result, api_rows, API_COLUMNS, NOTE)
    if cli_rows:
        from common import markdown_table

        extra = markdown_table(cli_rows, CLI_COLUMNS)
        md = out / "capture_api.md"
        md.write_text(md.read_text() + "\n**Command line, end to end:**\n\n" + extra + "\n")
        table += "\n\n" + extra
    pool = next((v.get("pool") for v in result.get("api", {}).values() if v.get("pool")), None)
    if pool:
        line = "Pool: " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in pool.items()
        )
        md = out / "capture_api.md"
        md.write_text(md.read_text() + "\n" + line + "\n")
        table += "\n\n" + line
    return table


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="flux-dev (flux-tiny with --smoke)")
    p.add_argument("--sizes", default=None, help="comma separated (1024,512; 64 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (4; 2 with --smoke)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every configuration (5)")
    p.add_argument("--copiers", default="pinned,pageable", help="copiers timed in the rounds")
    p.add_argument("--first", default="pinned", help="the copier of each size's first capture")
    p.add_argument("--cli_sizes", default=None, help="command line runs (1024; '' for none)")
    p.add_argument("--no_api", action="store_true", help="the command line part only")
    p.add_argument("--scratch", default=None, help="where the command line writes (default: /tmp)")
    p.add_argument("--child_timeout", type=int, default=300)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_flags", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timing_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        flags = json.loads(args.child_flags)
        if args.child == "plain":
            child_plain(flags, args.timing_out)
        else:
            sys.exit(child_cli(flags, args.timing_out))
        return
    smoke = args.smoke
    args.model = args.model or ("flux-tiny" if smoke else "flux-dev")
    args.sizes = [int(s) for s in (args.sizes or ("64" if smoke else "1024,512")).split(",")]
    args.cli_sizes = [
        int(s)
        for s in (("64" if smoke else "1024") if args.cli_sizes is None else args.cli_sizes).split(
            ","
        )
        if s
    ]
    args.steps = args.steps or (2 if smoke else 4)
    args.rounds = args.rounds or (2 if smoke else 5)
    args.max_len = 32 if smoke else 512
    args.copiers = [c for c in args.copiers.split(",") if c]
    out = Path(args.out)
    result = {"device": device_info(), "model": args.model, "steps": args.steps, "batch": 1}
    rows: list[dict] = []
    if not args.no_api:
        api(args, result, rows, out)
    if args.cli_sizes:
        cli(args, result, rows, out)
    print(write_all(out, result, rows))


if __name__ == "__main__":
    main()
