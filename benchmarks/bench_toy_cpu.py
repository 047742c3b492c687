"""flux-toy and flux-toy-2 on the CPU: seconds for one 128² image with its true CFG, as a user meets it.

    uv run python benchmarks/bench_toy_cpu.py --out benchmarks/results/cpu-toy   # both toys, 2 threads
    uv run python benchmarks/bench_toy_cpu.py --smoke --out /tmp/bench           # checks the script

What is measured: for each model, in one process on `--threads` CPU threads, `load_pipeline` (the
shipped float32 weights), then whole `generate` calls of the public API with the model's defaults
(128², 16 steps, true CFG 2 against the empty prompt: two transformer passes per step, text encoding
and the VAE decode included) for one image: each model's first call of the process, then the median
of `--repeats` later ones, each with its own prompt and seed, the models called in turn in each
round. `ratio` is flux-toy-2's median over flux-toy's, both measured in the same run; the bar for
flux-toy-2 is 3 s per image on the 2-core CPU. The machine's load average is recorded beside the
figures: on a shared CPU wall times move with it, so the process's CPU seconds per image
(`median_cpu_s`, all threads together) are given beside them; on an idle machine the wall time
approaches them divided by the threads.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import parser, write_results  # noqa: E402

from flux_ir.models import load_pipeline  # noqa: E402
from flux_ir.sampling import SamplingOptions, generate  # noqa: E402

PROMPTS = [
    "a red circle on a blue background",
    "a green triangle on a white background",
    "a blue square on a yellow background",
    "a purple circle on a white background",
]


def one_image(pipe, opts: SamplingOptions, i: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process) of one whole `generate` call."""
    t0, c0 = time.perf_counter(), time.process_time()
    generate(pipe, opts, seed=[i], prompts=[PROMPTS[i % len(PROMPTS)]], progress=False)
    return time.perf_counter() - t0, time.process_time() - c0


def measure(models: list[str], repeats: int) -> list[dict]:
    """Load every model, time its first call, then `repeats` rounds calling each model in turn."""
    pipes, rows = {}, []
    for m in models:
        t0 = time.perf_counter()
        pipes[m] = load_pipeline(m, device="cpu")
        load_s = time.perf_counter() - t0
        opts = SamplingOptions.from_spec(pipes[m][1])
        first = one_image(pipes[m][0], opts, 0)
        rows.append(
            dict(
                model=m,
                size=f"{opts.width}x{opts.height}",
                steps=opts.num_steps,
                true_cfg=opts.true_cfg_scale,
                load_s=load_s,
                first_s=first[0],
                later_s=[],
            )
        )
    for i in range(1, repeats + 1):  # round-robin: a drift of the machine hits every model alike
        for row in rows:
            pipe, spec = pipes[row["model"]]
            row["later_s"].append(one_image(pipe, SamplingOptions.from_spec(spec), i))
    for row in rows:
        row.update(
            median_s=statistics.median(w for w, _ in row["later_s"]),
            median_cpu_s=statistics.median(c for _, c in row["later_s"]),
            load_average=os.getloadavg()[0],
        )
    return rows


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=5, help="later calls per model")
    p.add_argument("--models", default="flux-toy,flux-toy-2", help="comma-separated models")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = ["flux-tiny"] if args.smoke else [m for m in args.models.split(",") if m]
    repeats = 1 if args.smoke else args.repeats
    rows = measure(models, repeats)
    base = rows[0]["median_s"]
    base_cpu = rows[0]["median_cpu_s"]
    for r in rows:
        r["ratio"] = r["median_s"] / base
        r["cpu_ratio"] = r["median_cpu_s"] / base_cpu
    result = dict(threads=args.threads, repeats=repeats, rows=rows)
    columns = ["model", "size", "steps", "true_cfg", "load_s", "first_s", "median_s", "ratio"]
    columns += ["median_cpu_s", "cpu_ratio", "load_average"]
    note = f"{args.threads} CPU threads.\n\n" + __doc__.split("What is measured:")[1]
    print(write_results(args.out, "toy_cpu", result, rows, columns, note))
    return result


if __name__ == "__main__":
    main()
