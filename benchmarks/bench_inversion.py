"""Inversion against generation: one 1024² image, flux-dev's architecture, random bf16 weights.

    PYTHONPATH=. python benchmarks/bench_inversion.py --out "$OUT"           # CUDA, ~3 minutes
    uv run python benchmarks/bench_inversion.py --smoke --out /tmp/bench      # CPU, flux-tiny, seconds

What is measured: whole calls of the public API on one image of `--size`² with `--steps` steps
(flux-dev's default 50), prompt embeddings precomputed for both (`encode_prompt` once; text encoders
outside the timing): `generate` (seeded noise -> K transformer passes -> VAE decode -> image tensor)
against `invert_images` (image tensor -> VAE encode -> K transformer passes -> noise), and
`invert_images(refine=1)` (two passes per step). Each configuration's first call of the process is
reported apart (`first_s`); then `--repeats` rounds run every configuration once in turn (a drift of
the machine hits all alike) and the median is compared with generation's (`ratio`; the bar is
inversion <= 1.1x generation). Weights are random (the exact architecture; no download): pixels
mean nothing, cost is the real one.
"""

from __future__ import annotations

import time

from common import device_info, parser, pipeline, sampling_options, sync, write_results

from flux_ir.inversion import invert_images
from flux_ir.sampling import encode_prompt, generate

NOTE = __doc__.split("What is measured:")[1]


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.repeats = 64, 4, 2
    pipe, spec = pipeline(args.model, args.smoke)
    pipe.set_progress_bar_config(disable=True)
    opts = sampling_options(args.size, args.steps, 32 if args.smoke else spec.max_sequence_length)
    emb = encode_prompt(pipe, opts)
    state: dict = {}

    def run_generate():
        out = generate(pipe, opts, seed=0, embeddings=emb, output_type="pt", progress=False)
        state["image"] = out.images.float().clamp(0, 1).nan_to_num(0.5)
        return out

    def run_invert(refine: int):
        def call():
            return invert_images(
                pipe, opts, state["image"], embeddings=emb, refine=refine, progress=False
            )

        return call

    configs = {
        "generate": run_generate,
        "invert": run_invert(0),
        "invert_refine1": run_invert(1),
    }
    first: dict[str, float] = {}
    for name, fn in configs.items():  # generation first: its image is inverted
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    rows = [
        {
            "config": name,
            "first_s": first[name],
            "median_s": median[name],
            "ratio": median[name] / median["generate"],
            "first_ratio": first[name] / first["generate"],
            "ms_per_step": 1000 * median[name] / args.steps,
        }
        for name in configs
    ]
    result = {
        "model": "flux-tiny" if args.smoke else args.model,
        "weights": "random",
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "dtype": str(pipe.transformer.dtype),
        "times_s": times,
        "rows": rows,
        "invert_within_1_1x": median["invert"] <= 1.1 * median["generate"],
        "device": device_info(),
    }
    table = write_results(
        args.out,
        "inversion_speed",
        result,
        rows,
        ["config", "first_s", "median_s", "ratio", "first_ratio", "ms_per_step"],
        NOTE,
    )
    print(table)
    return result


if __name__ == "__main__":
    main()
