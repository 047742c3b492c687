"""Offload modes: peak VRAM and time of a full capture, schnell architecture at 1024², 4 steps.

    PYTHONPATH=. python benchmarks/bench_offload.py --out results/
    PYTHONPATH=. python benchmarks/bench_offload.py --smoke

What is measured: for each `--offload` mode or group variant, in its own process: the pipeline
(random bf16 weights, built on the GPU, then moved to the CPU and offloaded), one 1-step warm-up,
then a plain generation timed by component (text_s: `encode_prompt`; denoise_s: the transformer
steps from the prompt embeddings; vae_s: unpacking and VAE decode; plain_s is their sum) and a
capture of every block, both streams, every step (async copier, held in host memory, prompt to
PIL image), each timed once. `sequential` skips the warm-up and the plain run (capture only).
Group variants (`GroupOffload` in flux_ir/models/loading.py; `group` is the default):
- group: VAE and CLIP resident on the GPU; the transformer block by block and T5 leaf by leaf
  (every Linear/Embedding its own group), on a side stream with record_stream.
- group_t5block: `group` with T5 at block level: T5 has no block list at its top level, so diffusers
  moves all of it as one group without a stream (pageable memory) at every prompt encoding.
- group_all: every component group-offloaded at block level, no record_stream.
- group_all_rs: every component group-offloaded at block level, with record_stream.
- group_nors: `group_t5block` without record_stream (the host syncs after every group).
(diffusers moves one block per group whenever it uses a stream, so there is no blocks-per-group
variant.) Peak VRAM is `torch.cuda.max_memory_allocated` (and reserved) over
the capture run. "max rel diff" compares six block outputs at the first and last step to the
no-offload run (nan-aware; random bf16 weights can overflow, so this is reported, not asserted).
"""

from __future__ import annotations

import dataclasses
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
VARIANTS = {
    "group": {},
    "group_t5block": dict(text_encoder_2_level="block_level"),
    "group_all": dict(resident=(), record_stream=False, text_encoder_2_level="block_level"),
    "group_all_rs": dict(resident=(), text_encoder_2_level="block_level"),
    "group_nors": dict(record_stream=False, text_encoder_2_level="block_level"),
}
DEFAULT_MODES = "none,model,group,sequential"
KEEP = {"double": (0, 9, 18), "single": (0, 18, 37)}


def child(mode: str, smoke: bool, size: int, steps: int, out: Path) -> None:
    from common import pipeline, sampling_options

    from flux_ir.capture import CaptureOptions, run_capture
    from flux_ir.capture.copy import AsyncCopier
    from flux_ir.models.loading import GroupOffload, place_pipeline

    t0 = time.perf_counter()
    pipe, spec = pipeline("flux-schnell", smoke)
    dev = "cpu" if smoke else "cuda"
    if mode != "none":
        pipe.to("cpu")
        if not smoke:
            torch.cuda.empty_cache()
        group = GroupOffload(**VARIANTS[mode]) if mode in VARIANTS else None
        place_pipeline(pipe, dev, "group" if group else mode, group)
    setup_s = time.perf_counter() - t0
    opts = CaptureOptions(sampling_options(size, steps, 32 if smoke else 256), seed=0)
    phases = {}
    if mode != "sequential":
        warm = dataclasses.replace(opts, sampling=dataclasses.replace(opts.sampling, num_steps=1))
        run_capture(pipe, warm, copier=AsyncCopier())
        phases = timed_phases(pipe, opts.sampling)
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
        **phases,
        capture_s=capture_s,
        peak_vram_GB=torch.cuda.max_memory_allocated() / 1e9 if not smoke else None,
        peak_reserved_GB=torch.cuda.max_memory_reserved() / 1e9 if not smoke else None,
    )
    out.write_text(json.dumps(res))


def timed_phases(pipe, opts) -> dict:
    """Seconds of text encoding, denoising (latents out) and VAE decoding of one plain generation
    (`opts`: its `SamplingOptions`)."""
    from flux_ir.sampling import encode_prompt, generate

    out = {}
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        emb = encode_prompt(pipe, opts)
        sync()
        out["text_s"] = time.perf_counter() - t0
        latents = generate(pipe, opts, seed=0, embeddings=emb, output_type="latent").images
        sync()
        out["denoise_s"] = time.perf_counter() - t0 - out["text_s"]
        t1 = time.perf_counter()
        x = pipe._unpack_latents(latents, opts.height, opts.width, pipe.vae_scale_factor)
        x = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        pipe.image_processor.postprocess(pipe.vae.decode(x, return_dict=False)[0], "pil")
        sync()
        out["vae_s"] = time.perf_counter() - t1
    out["plain_s"] = out["text_s"] + out["denoise_s"] + out["vae_s"]
    return out


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
    p.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help=f"comma separated, from {', '.join(dict.fromkeys([*MODES, *VARIANTS]))}",
    )
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--mode_timeout", type=int, default=150, help="seconds per mode's process")
    p.add_argument("--sequential_timeout", type=int, default=300)
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--child_out", default=None)
    args = p.parse_args()
    size, steps = (64, 2) if args.smoke else (args.size, args.steps)
    if args.child:
        child(args.child, args.smoke, size, steps, Path(args.child_out))
        return
    modes = args.modes.split(",")
    unknown = set(modes) - {*MODES, *VARIANTS}
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {[*MODES, *VARIANTS]}")
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
            limit = args.sequential_timeout if mode == "sequential" else args.mode_timeout
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=limit, capture_output=True, text=True)
                err = proc.stderr[-2000:] if proc.returncode else None
            except subprocess.TimeoutExpired:
                err = f"timed out after {limit} s"
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
    "text_s",
    "denoise_s",
    "vae_s",
    "plain_s",
    "capture_s",
    "capture_ratio_vs_none",
    "max_rel_diff_vs_none",
]

if __name__ == "__main__":
    main()
