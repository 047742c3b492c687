"""Interventions as users meet them: whole pipeline calls with edits against plain generation.

    python benchmarks/bench_intervene.py --out results/        # CUDA: flux-dev 1024², random bf16
    python benchmarks/bench_intervene.py --smoke --out /tmp/b   # CPU, flux-tiny: checks the script

What is measured (every figure a whole public call, `flux_ir.sampling.generate` with text encoding
and VAE decode to PIL, timed until it returns; plain and each configuration in turn, round robin,
after one call of each, which is reported as the process's first call):
- plain: `generate(pipe, opts, seed=0)`;
- steer_all: inside `Intervention(pipe.transformer, edits)` adding a random vector [D] to the image
  tokens of every double and single block at every step (`add`);
- attention (when flux_ir.capture.attention exists): inside `AttentionTrace` recording 8 text tokens'
  attention to the image tokens (txt->img), head-mean, every block, every step;
- attention_both: the same in both directions (img->txt too: each image token's attention to the
  8 tokens, normalised by the attention kernel's own logsumexp where it gives SDPA's output);
- attention check (not timed): one step recorded in both directions with the kernel's logsumexp
  ("auto") and with the side computation ("exact"); the largest difference of their maps, how many
  img->txt maps each normalised, and whether the latents equal plain generation's bit for bit;
- patching: `causal_map(pipe, target, source, selection=...)`, the sites per second of its batched
  patched runs (the source capture and the two plain runs included in the call's time).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from common import device_info, parser, pipeline, sampling_options, sync, write_results

from flux_ir.capture import CaptureOptions, Selection
from flux_ir.intervene import Intervention, Site, add
from flux_ir.sampling import generate
from flux_ir.workflows.patching import causal_map

NOTE = __doc__.split("What is measured")[1]


def steering_edits(pipe, vector: torch.Tensor) -> list:
    t = pipe.transformer
    sites = [Site("double", i) for i in range(len(t.transformer_blocks))]
    sites += [Site("single", i) for i in range(len(t.single_transformer_blocks))]
    return [(site, add(vector, 0.1)) for site in sites]


def attention_context(pipe, opts):
    """The attention recorder's context, `make(direction, **options)` (None if this version has none)."""
    try:
        from flux_ir.capture.attention import AttentionTrace
    except ImportError:
        return None
    return lambda direction="txt->img", **kw: AttentionTrace(
        pipe.transformer, tokens=list(range(8)), heads="mean", direction=direction,
        num_steps=opts.num_steps, passes_per_step=opts.passes_per_step, **kw,
    )  # fmt: skip


def attention_check(pipe, opts, make_trace) -> dict:
    """Step 0 recorded in both directions with the kernel's logsumexp and with the exact one: the
    maps' largest difference, the normalisation counts, and bit identity of the latents."""
    plain = generate(pipe, opts, seed=0, output_type="latent").images
    runs = {}
    for mode in ("auto", "exact"):
        with make_trace("both", steps=(0,), logsumexp=mode) as trace:
            latents = generate(pipe, opts, seed=0, output_type="latent").images
        runs[mode] = (trace.maps, dict(trace.normalised), bool(torch.equal(latents, plain)))
    (auto, counts, same_auto), (exact, exact_counts, same_exact) = runs["auto"], runs["exact"]
    diff = max(float((auto.tensors[k] - v).abs().max()) for k, v in exact.tensors.items())
    return {
        "max_abs_difference": diff,
        "normalised_auto": counts,
        "normalised_exact": exact_counts,
        "latents_bit_identical": same_auto and same_exact,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--patch_blocks", type=int, default=8, help="single blocks in the patching run")
    p.add_argument("--patch_batch", type=int, default=8)
    args = p.parse_args()
    pipe, spec = pipeline(args.model, args.smoke)
    size, steps = (64, 2) if args.smoke else (args.size, args.steps)
    opts = sampling_options(size, steps, 32 if args.smoke else spec.max_sequence_length)
    dim = pipe.transformer.inner_dim
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    edits = steering_edits(pipe, vector)

    def plain():
        return generate(pipe, opts, seed=0).images

    def steer():
        with Intervention(pipe.transformer, edits):
            return generate(pipe, opts, seed=0).images

    configs = {"plain": plain, "steer_all": steer}
    make_trace = attention_context(pipe, opts)
    if make_trace is not None:

        def attention():
            with make_trace():
                return generate(pipe, opts, seed=0).images

        def attention_both():
            with make_trace("both") as trace:
                images = generate(pipe, opts, seed=0).images
            normalised.update(trace.normalised)
            return images

        normalised: dict = {}
        configs["attention"] = attention
        configs["attention_both"] = attention_both
    first, times = {}, {name: [] for name in configs}
    for name, fn in configs.items():
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        first[name] = time.perf_counter() - t0
    for _ in range(1 if args.smoke else args.rounds):
        for name, fn in configs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    rows = [
        {
            "configuration": name,
            "median_s": median[name],
            "x_plain": median[name] / median["plain"],
            "first_call_s": first[name],
            "first_x_plain": first[name] / first["plain"],
        }
        for name in configs
    ]

    check = None
    if make_trace is not None:
        rows[-1]["img_txt_by_kernel_lse"] = normalised.get("kernel")
        check = attention_check(pipe, opts, make_trace)
        print("attention check:", check)

    # patching throughput: the last `patch_blocks` single blocks at every step
    n_single = len(pipe.transformer.single_transformer_blocks)
    blocks = tuple(range(max(0, n_single - args.patch_blocks), n_single))
    sel = Selection(double_blocks=(), single_blocks=blocks)
    target = CaptureOptions(opts, seed=0)
    source = CaptureOptions(replace(opts, prompt="a photo of a dog"), seed=0)
    sync()
    t0 = time.perf_counter()
    cmap = causal_map(
        pipe, target, source, selection=sel, batch_size=args.patch_batch, progress=False
    )
    sync()
    seconds = time.perf_counter() - t0
    sites = cmap.effect.size
    full = 57 * 28  # flux-dev's whole map at its usual 28 steps
    rows.append(
        {
            "configuration": f"patching {len(blocks)} blocks x {steps} steps, batch {args.patch_batch}",
            "median_s": seconds,
            "sites": sites,
            "sites_per_s": sites / seconds,
            "projected_57x28_map_min": full / (sites / seconds) / 60 * 28 / steps,
        }
    )
    result = {
        "model": args.model,
        "size": size,
        "steps": steps,
        "rounds": args.rounds,
        "rows": rows,
        "attention_check": check,
        "device": device_info(),
    }
    table = write_results(
        args.out,
        "intervene",
        result,
        rows,
        [
            "configuration",
            "median_s",
            "x_plain",
            "first_call_s",
            "first_x_plain",
            "img_txt_by_kernel_lse",
            "sites",
            "sites_per_s",
            "projected_57x28_map_min",
        ],
        NOTE,
    )
    print(table)


if __name__ == "__main__":
    main()
