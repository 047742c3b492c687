"""Offload modes as users meet them: random weights built as the command line builds them, memory as
nvidia-smi shows it, time against no offload (first call included).

    PYTHONPATH=. python benchmarks/bench_offload.py --out results/      # flux-dev 1024²: none, group; CLI
    PYTHONPATH=. python benchmarks/bench_offload.py --model flux-schnell --modes none,group,model,sequential
    PYTHONPATH=. python benchmarks/bench_offload.py --smoke

What is measured: for each `--offload` mode or group variant, in its own process: the pipeline as
the command line loads it (`load_pipeline(model, device="cuda", offload=mode, weights="random")`:
made on the meta device, every parameter filled on the GPU and moved to the CPU for offloaded modes
(for `group`: VAE and CLIP made on the GPU and kept there, the other parameters copied straight into
page-locked memory, where diffusers keeps them);
variants place it with their `GroupOffload`), timed (`setup_s`); a capture of every block, both
streams, every step (async copier, held in host memory, prompt to PIL image), the first call of the
process (`first_capture_s`); a plain generation timed by component (text_s: `encode_prompt`;
denoise_s: the transformer steps from the prompt embeddings; vae_s: unpacking and VAE decode;
plain_s is their sum); and the capture again (`capture_s`). `sequential` skips the plain run.
Memory: `peak_nvidia_smi_GB` is what nvidia-smi showed for the process at its peak (polled by the
parent every 100 ms); `peak_used_GB` the same from inside (`torch.cuda.mem_get_info`, total minus
free, every 20 ms: the CUDA context plus what the caching allocator holds); beside them the
allocator's peaks, `peak_reserved_GB` and `peak_allocated_GB` (what earlier tables called peak
VRAM), and `context_GB` (in use beyond the allocator's reservation). Group variants
(`GroupOffload` in flux_ir/models/loading.py; `group` is the default):
- group: VAE and CLIP resident on the GPU; the transformer block by block and T5 leaf by leaf
  (every Linear/Embedding its own group), on a side stream with record_stream.
- group_t5block: `group` with T5 at block level: T5 has no block list at its top level, so diffusers
  moves all of it as one group without a stream (pageable memory) at every prompt encoding.
- group_all: every component group-offloaded at block level, no record_stream.
- group_all_rs: every component group-offloaded at block level, with record_stream.
- group_nors: `group_t5block` without record_stream (the host syncs after every group).
"max rel diff" compares six block outputs at the first and last step to the no-offload run of the
same model (the same random weights: nan-aware, as random bf16 weights can overflow). `--cli` also
runs the command line as a user would: `capture_sample.py --model flux-schnell --weights random
--width 1024 --height 1024 --offload group --format shards --should_decode_intermediates False`,
timed from launch to its first denoising step (`first_step_s`), to the end of the capture and to
exit, with its peak memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DeviceMemory, NvidiaSmi, parser, sync, timed_command, write_results

NOTE = __doc__.split("What is measured:")[1]
MODES = ("none", "model", "group", "sequential")
VARIANTS = {
    "group": {},
    "group_t5block": dict(text_encoder_2_level="block_level"),
    "group_all": dict(resident=(), record_stream=False, text_encoder_2_level="block_level"),
    "group_all_rs": dict(resident=(), text_encoder_2_level="block_level"),
    "group_nors": dict(record_stream=False, text_encoder_2_level="block_level"),
}
KEEP = {"double": (0, 9, 18), "single": (0, 18, 37)}
CLI_FLAGS = [
    "--model", "flux-schnell", "--weights", "random", "--width", "1024", "--height", "1024",
    "--offload", "group", "--format", "shards", "--should_decode_intermediates", "False",
    "--seed", "0",
]  # fmt: skip


def load(model: str, mode: str, smoke: bool):
    """The pipeline as `--offload mode --weights random` loads it (a variant: its GroupOffload)."""
    from flux_ir.models import REGISTRY, build_random_pipeline, load_pipeline
    from flux_ir.models.loading import GroupOffload, place_pipeline

    if smoke:
        pipe, spec = load_pipeline("flux-tiny", device="cpu")
        if mode != "none":  # the offload hooks on the CPU: the mechanism only
            group = GroupOffload(**VARIANTS[mode]) if mode in VARIANTS else None
            place_pipeline(pipe, "cpu", "group" if group else mode, group)
        return pipe, spec
    torch.backends.cuda.matmul.allow_tf32 = True
    if mode in MODES:
        return load_pipeline(model, device="cuda", offload=mode, weights="random")
    spec = REGISTRY[model]
    pipe = build_random_pipeline(spec, "cpu", torch.bfloat16, init_device="cuda")
    place_pipeline(pipe, "cuda", "group", GroupOffload(**VARIANTS[mode]))
    return pipe, spec


def child(model: str, mode: str, smoke: bool, size: int, steps: int, out: Path) -> None:
    from common import sampling_options

    from flux_ir.capture import CaptureOptions, run_capture
    from flux_ir.capture.copy import AsyncCopier

    res: dict = {"model": model, "mode": mode}

    def save() -> None:
        out.write_text(json.dumps(res))

    from flux_ir.models import REGISTRY

    max_len = 32 if smoke else REGISTRY[model].max_sequence_length
    opts = CaptureOptions(sampling_options(size, steps, max_len), seed=0)

    def capture():
        copier = AsyncCopier()
        sync()
        t0 = time.perf_counter()
        _, cap = run_capture(pipe, opts, copier=copier, progress=False)
        sync()
        return time.perf_counter() - t0, cap

    with DeviceMemory() as before:  # loading, the first capture and the plain generation
        t0 = time.perf_counter()
        pipe, spec = load(model, mode, smoke)
        sync()
        res["setup_s"] = time.perf_counter() - t0
        save()
        res["first_capture_s"], cap = capture()
        save()
        del cap
        if mode != "sequential":
            res.update(timed_phases(pipe, opts.sampling))
    with DeviceMemory() as during:  # the second capture
        res["capture_s"], cap = capture()
    res.update(before.result())
    res.update({f"capture_{k}": v for k, v in during.result().items()})
    if "capture_peak_device_used_GB" in res:
        res["peak_device_used_GB"] = max(
            res["peak_device_used_GB"], res["capture_peak_device_used_GB"]
        )
    kept = {}
    for kind, idx in KEEP.items():
        n = len(cap.blocks(kind))
        for i in idx:
            i = min(i, n - 1)
            for s in (0, steps - 1):
                kept[f"{kind}.{i}.{s}"] = cap.image_tokens(kind, i, s).clone()
    torch.save(kept, out.with_suffix(".pt"))
    save()


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


def run_child(
    cmd: list[str], limit: int, out: Path
) -> tuple[dict | None, float, float | None, str | None]:
    """(result or None, wall seconds, nvidia-smi's peak GB, error)."""
    t0 = time.perf_counter()
    with NvidiaSmi() as smi:
        try:
            proc = subprocess.run(cmd, timeout=limit, capture_output=True, text=True)
            err = proc.stderr[-2000:] if proc.returncode else None
        except subprocess.TimeoutExpired:
            err = f"timed out after {limit} s"
    res = json.loads(out.read_text()) if out.is_file() else None
    return res, time.perf_counter() - t0, smi.peak_GB, err


def cli_run(args, tmp: Path) -> dict:
    """The command line as a user runs it (`CLI_FLAGS`), timed phase by phase from inside."""
    timing = tmp / "cli_timing.json"
    flags = ["--model", "flux-tiny", "--width", "64", "--height", "64", "--format", "shards",
             "--should_decode_intermediates", "False", "--seed", "0"] if args.smoke else CLI_FLAGS  # fmt: skip
    flags = [*flags, "--output_dir", str(tmp / "cli")]
    cmd = [sys.executable, __file__, "--cli_child", json.dumps(flags), "--child_out", str(timing)]
    t0 = time.time()
    res, wall, smi, err = run_child(cmd, args.cli_timeout, timing)
    shutil.rmtree(tmp / "cli", ignore_errors=True)
    row = {"mode": "CLI: " + " ".join(flags[:12]), "process_s": wall, "peak_nvidia_smi_GB": smi}
    if res is None or res.get("rc"):
        row["error"] = err or f"exit code {res and res.get('rc')}"
        return row
    m = res["marks"]
    row.update(
        setup_s=m["load_end"] - t0,
        first_step_s=m.get("first_step", float("nan")) - t0,
        capture_s=m["capture_end"] - m["capture_begin"],
        capture_done_s=m["capture_end"] - t0,
        **{k: v for k, v in res.items() if k.endswith("_GB")},
    )
    return row


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev", help="registry name (flux-dev, flux-schnell)")
    p.add_argument(
        "--modes",
        default="none,group",
        help=f"comma separated, from {', '.join(dict.fromkeys([*MODES, *VARIANTS]))}",
    )
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cli", action="store_true", help="also time the command line (see NOTE)")
    p.add_argument("--mode_timeout", type=int, default=150, help="seconds per mode's process")
    p.add_argument("--sequential_timeout", type=int, default=300)
    p.add_argument("--cli_timeout", type=int, default=200)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cli_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    size, steps = (64, 2) if args.smoke else (args.size, args.steps)
    args.model = "flux-tiny" if args.smoke else args.model
    if args.cli_child:
        from flux_ir.cli.capture import capture

        sys.exit(
            timed_command(capture, json.loads(args.cli_child), "capture_sample.py", args.child_out)
        )
    if args.child:
        child(args.model, args.child, args.smoke, size, steps, Path(args.child_out))
        return
    modes = args.modes.split(",")
    unknown = set(modes) - {*MODES, *VARIANTS}
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {[*MODES, *VARIANTS]}")
    if args.smoke:  # accelerate's sequential offload cannot run CPU -> CPU
        modes = [m for m in modes if m != "sequential"]
    result = {"model": args.model, "size": size, "steps": steps, "modes": {}}
    rows, kept = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, "--child", mode, "--child_out", str(out)]
            cmd += ["--model", args.model, "--out", args.out, "--size", str(size)]
            cmd += ["--steps", str(steps)] + (["--smoke"] if args.smoke else [])
            limit = args.sequential_timeout if mode == "sequential" else args.mode_timeout
            res, wall, smi, err = run_child(cmd, limit, out)
            res = res or {"mode": mode}
            if err:
                res["error"] = err
                print(f"{mode} failed: {err}", flush=True)
            if out.with_suffix(".pt").is_file():
                kept[mode] = torch.load(out.with_suffix(".pt"), weights_only=True)
            res.update(process_s=wall, peak_nvidia_smi_GB=smi)
            if mode in kept and "none" in kept:
                res["max_rel_diff_vs_none"] = rel_diff(kept[mode], kept["none"])
            base = result["modes"].get("none", {})
            for key in ("first_capture_s", "capture_s"):
                if base.get(key) and key in res:
                    res[f"{key.removesuffix('_s')}_x_none"] = res[key] / base[key]
            result["modes"][mode] = res
            rows.append(res)
            print(
                {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}, flush=True
            )
            write_results(args.out, "offload_modes", result, rows, COLUMNS, NOTE)
        if args.cli:
            row = cli_run(args, Path(tmp))
            result["cli"] = row
            rows.append(row)
            print(
                {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True
            )
    print(write_results(args.out, "offload_modes", result, rows, COLUMNS, NOTE))


COLUMNS = [
    "mode",
    "setup_s",
    "first_step_s",
    "peak_nvidia_smi_GB",
    "peak_device_used_GB",
    "peak_reserved_GB",
    "peak_allocated_GB",
    "first_capture_s",
    "first_capture_x_none",
    "capture_s",
    "capture_x_none",
    "plain_s",
    "denoise_s",
    "max_rel_diff_vs_none",
]

if __name__ == "__main__":
    main()
