"""Offload modes: peak VRAM and time of a full capture, schnell architecture at 1024², 4 steps.

    PYTHONPATH=. python benchmarks/bench_offload.py --out results/
    PYTHONPATH=. python benchmarks/bench_offload.py --smoke

What is measured: for each `--offload` mode, in its own process: the pipeline (random bf16 weights,
built on the GPU, then moved to the CPU and offloaded), one 1-step warm-up, then a plain generation
(prompt to PIL image) and a capture of every block, both streams, every step (async copier, held in
host memory), each timed once. Peak VRAM is `torch.cuda.max_memory_allocated` (and reserved) over
the capture run. "max rel diff" compares six block outputs at the first and last step to the
no-offload run (nan-aware; random bf16 weights can overflow, so this is reported, not asserted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import parser, sync, write_results

NOTE = __doc__.split("What is measured:")[1]
MODES = ("none", "model", "group", "sequential")
KEEP = {"double": (0, 9, 18), "single": (0, 18, 37)}


def child(mode: str, smoke: bool, size: int, steps: int, out: Path) -> None:
    from common import pipeline

    from flux_ir.capture import GenerationOptions, run_capture
    from flux_ir.capture.copy import AsyncCopier
    from flux_ir.models.loading import place_pipeline

    t0 = time.perf_counter()
    pipe, spec = pipeline("flux-schnell", smoke)
    dev = "cpu" if smoke else "cuda"
    if mode != "none":
        pipe.to("cpu")
        if not smoke:
            torch.cuda.empty_cache()
        place_pipeline(pipe, dev, mode)
    setup_s = time.perf_counter() - t0
    opts = GenerationOptions(
        "a photo of a cat", size, size, steps, seed=0, max_sequence_length=32 if smoke else 256
    )
    run_capture(pipe, GenerationOptions(**{**opts.to_dict(), "num_steps": 1}), copier=AsyncCopier())
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        pipe(
            prompt=opts.prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            max_sequence_length=opts.max_sequence_length,
            guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(0),
        )
        sync()
        plain_s = time.perf_counter() - t0
    if not smoke:
        torch.cuda.reset_peak_memory_stats()
    copier = AsyncCopier()
    sync()
    t0 = time.perf_counter()
    _, cap = run_capture(pipe, opts, copier=copier)
    sync()
    capture_s = time.perf_counter() - t0
    copier.close()
    kept = {}
    for kind, idx in KEEP.items():
        n = len(cap.blocks(kind))
        for i in idx:
            i = min(i, n - 1)
            for s in (0, steps - 1):
                kept[f"{kind}.{i}.{s}"] = cap.image_tokens(kind, i, s).clone()
    torch.save(kept, out.with_suffix(".pt"))
    res = dict(
        mode=mode,
        setup_s=setup_s,
        plain_s=plain_s,
        capture_s=capture_s,
        peak_vram_GB=torch.cuda.max_memory_allocated() / 1e9 if not smoke else None,
        peak_reserved_GB=torch.cuda.max_memory_reserved() / 1e9 if not smoke else None,
    )
    out.write_text(json.dumps(res))


def rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k, x in a.items():
        x, y = x.float(), b[k].float()
        ok = torch.isfinite(x) & torch.isfinite(y)
        if not ok.any():
            continue
        d = (x[ok] - y[ok]).abs().max() / y[ok].abs().max().clamp_min(1e-12)
        worst = max(worst, float(d))
    return worst


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--mode_timeout", type=int, default=150)
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--child_out", default=None)
    args = p.parse_args()
    size, steps = (64, 2) if args.smoke else (args.size, args.steps)
    if args.child:
        child(args.child, args.smoke, size, steps, Path(args.child_out))
        return
    modes = args.modes.split(",")
    if args.smoke:  # accelerate's sequential offload cannot run CPU -> CPU
        modes = [m for m in modes if m != "sequential"]
    result, rows, kept = {"size": size, "steps": steps, "modes": {}}, [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            out = Path(tmp) / f"{mode}.json"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--child_out",
                str(out),
                "--out",
                args.out,
            ]
            cmd += ["--smoke"] if args.smoke else []
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(
                    cmd, timeout=args.mode_timeout, capture_output=True, text=True
                )
                err = proc.stderr[-2000:] if proc.returncode else None
            except subprocess.TimeoutExpired:
                err = f"timed out after {args.mode_timeout} s"
            if out.is_file():
                res = json.loads(out.read_text())
                kept[mode] = torch.load(out.with_suffix(".pt"), weights_only=True)
            else:
                res = {"mode": mode, "error": err}
                print(f"{mode} failed: {err}", flush=True)
            res["process_s"] = time.perf_counter() - t0
            if mode in kept and "none" in kept:
                res["max_rel_diff_vs_none"] = rel_diff(kept[mode], kept["none"])
            result["modes"][mode] = res
            base = result["modes"].get("none", {}).get("capture_s")
            if base and "capture_s" in res:
                res["capture_ratio_vs_none"] = res["capture_s"] / base
            rows.append(res)
            print(res, flush=True)
            write_results(args.out, "offload_modes", result, rows, COLUMNS, NOTE)
    print(write_results(args.out, "offload_modes", result, rows, COLUMNS, NOTE))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


COLUMNS = [
    "mode",
    "peak_vram_GB",
    "plain_s",
    "capture_s",
    "capture_ratio_vs_none",
    "max_rel_diff_vs_none",
]

if __name__ == "__main__":
    main()
