"""Diagnosis: where the first capture of a process spends its extra time (not a headline figure).

    PYTHONPATH=. python benchmarks/diag_first_capture.py --out "$OUT"             # CUDA, flux-dev 1024²
    PYTHONPATH=. python benchmarks/diag_first_capture.py --out "$OUT" --prepare   # prepare_capture first
    uv run python benchmarks/diag_first_capture.py --smoke --out /tmp/bench       # CPU, flux-tiny

What is measured: in one process, the pipeline loaded as `bench_capture_api.py` loads it, two plain
whole calls (`generate`, text encoding to PIL images), then the process's first `run_capture` with
a new pinned copier, then a second one, each under `cProfile` (wall clock of the calling thread,
device synchronised around the call), and a plain call between them. With `--prepare`,
`prepare_capture(load_options, opts)` is called before the model loads (the command line's way: the
pool is page-locked while the model loads), and the seconds from that call to the pool being ready
and to the pipeline being loaded are reported. Prints the wall times and the functions with the most
cumulative and own time in each capture; writes the profiles' text to --out.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import time

import torch
from common import parser, pipeline, sync, write_results

from flux_ir.capture import CaptureOptions, make_copier, prepare_capture, run_capture
from flux_ir.capture.copy import host_pool
from flux_ir.models import LoadOptions, resolve_model
from flux_ir.sampling import SamplingOptions, generate

NOTE = __doc__.split("What is measured:")[1]


def profiled(fn) -> tuple[float, object, str]:
    """(seconds, result, profile text) of `fn()` under cProfile, device synchronised around it."""
    gc.collect()
    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    out = fn()
    sync()
    prof.disable()
    dt = time.perf_counter() - t0
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("cumulative").print_stats(35)
    stats.sort_stats("tottime").print_stats(25)
    return dt, out, text.getvalue()


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--copier", default="pinned")
    p.add_argument("--prepare", action="store_true", help="prepare_capture before loading")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.steps = 64, 2
    name = "flux-tiny" if args.smoke else args.model
    spec = resolve_model(name)
    sampling = SamplingOptions(
        "a photo of a cat",
        args.size,
        args.size,
        args.steps,
        32 if args.smoke else spec.max_sequence_length,
    )
    opts = CaptureOptions(sampling, seed=0)
    res: dict = {"size": args.size, "steps": args.steps, "prepare": args.prepare}
    t0 = time.perf_counter()
    if args.prepare:
        weights = "pretrained" if args.smoke else "random"
        load = LoadOptions.create(name, "cpu" if args.smoke else "cuda", weights=weights)
        res["prepared_GB"] = prepare_capture(load, opts) / 1e9
    pipe, spec = pipeline(args.model, args.smoke)
    res["load_s"] = time.perf_counter() - t0
    host_pool().wait_idle()
    res["pool_ready_s"] = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)

    def plain():
        return generate(pipe, sampling, seed=0, progress=False).images

    def capture():
        copier = make_copier(args.copier)
        return run_capture(pipe, opts, model_name=spec.name, copier=copier, progress=False)

    res["plain_s"] = [profiled(plain)[0] for _ in range(2)]
    texts = {}
    res["first_capture_s"], kept, texts["first"] = profiled(capture)
    del kept
    res["plain_between_s"] = profiled(plain)[0]
    res["second_capture_s"], kept, texts["second"] = profiled(capture)
    del kept
    res["pool_stats"] = dict(host_pool().stats)
    base = min(res["plain_s"][1], res["plain_between_s"])
    res["first_x_plain"] = res["first_capture_s"] / base
    res["second_x_plain"] = res["second_capture_s"] / base
    for key, text in texts.items():
        print(f"===== {key} capture profile =====\n{text}", flush=True)
    summary = {k: v for k, v in res.items() if k != "pool_stats"}
    print(summary, flush=True)
    row = dict(
        prepare=args.prepare,
        plain_s=base,
        first_s=res["first_capture_s"],
        first_x_plain=res["first_x_plain"],
        second_s=res["second_capture_s"],
        second_x_plain=res["second_x_plain"],
    )
    name = "diag_first_capture" + ("_prepare" if args.prepare else "")
    write_results(args.out, name, res, [row], list(row), NOTE)
    if args.out:
        from pathlib import Path

        for key, text in texts.items():
            (Path(args.out) / f"{name}_{key}.txt").write_text(text)
    return res


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
