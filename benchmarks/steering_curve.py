"""The steering curve on flux-toy: how often a red-to-blue vector turns the shape blue, and keeps the
background, at each scale, over many samples (CPU, the shipped flux-toy weights).

    uv run python benchmarks/steering_curve.py --out benchmarks/results/cpu-2026-12-03   # 50 samples
    uv run python benchmarks/steering_curve.py --smoke --out /tmp/steer                 # checks the script

What is measured: a steering vector of single block 5 (`steering_vector`, toward "a blue {circle,
square, triangle} on a white background", away from the red ones, seeds 0 and 1, conditional pass)
is added with `add(vec.vectors[step], scale)` at every step and both passes of true CFG to the image
tokens of `--samples` images "a red {shape} on a white background" (shapes in turn, seeds 100, 101,
...; flux-toy's default sampling: 128², 16 steps, true CFG 2). Tokens "shape": only the tokens the
unsteered image's shape touches (`shape_token_mask`), one edit per sample; "all": every image token.
For each scale the checker (`check_images`) reads the steered images: the share read with a blue shape,
the share whose background colour is the one read in the same sample's unsteered image, the share
whose shape class is unchanged, and the share with a shape still red.
"""

from __future__ import annotations

import time

import torch
from common import device_info, parser, write_results

from flux_ir.intervene import Intervention, Site, add, steering_vector
from flux_ir.models import load_pipeline
from flux_ir.sampling import SamplingOptions, generate
from flux_ir.toy.checker import check_images, shape_token_mask
from flux_ir.toy.scenes import COLOURS, SHAPES

NOTE = __doc__.split("What is measured: ")[1]
BLUE, RED, WHITE = COLOURS.index("blue"), COLOURS.index("red"), COLOURS.index("white")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--scales", default="16,32,48,64,96", help="scales on the shape's tokens")
    p.add_argument("--all_scales", default="32", help="scales on every image token ('' skips)")
    p.add_argument("--kind", default="single")
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--batch", type=int, default=50, help="images per generate call")
    args = p.parse_args()
    if args.smoke:
        args.samples, args.scales, args.all_scales, args.batch = 2, "0,64", "64", 2
    start = time.perf_counter()
    pipe, spec = load_pipeline("flux-toy", device="cpu")
    opts = SamplingOptions.from_spec(spec)
    if args.smoke:
        opts = SamplingOptions.from_spec(spec, num_steps=2)
    vec = steering_vector(
        pipe, opts,
        toward=[f"a blue {s} on a white background" for s in SHAPES],
        away=[f"a red {s} on a white background" for s in SHAPES],
        kind=args.kind, block=args.block, seeds=(0, 1),
    )  # fmt: skip
    prompts = [f"a red {SHAPES[i % 3]} on a white background" for i in range(args.samples)]
    seeds = [100 + i for i in range(args.samples)]
    batches = [
        range(i, min(i + args.batch, args.samples)) for i in range(0, args.samples, args.batch)
    ]

    def images(edits_of) -> torch.Tensor:
        """[samples, 3, H, W] of the prompts, each batch with `edits_of(batch)` applied."""
        out = []
        for idx in batches:
            edits = edits_of(idx)
            with Intervention(pipe.transformer, edits, passes_per_step=opts.passes_per_step):
                out.append(
                    generate(
                        pipe, opts, prompts=[prompts[i] for i in idx],
                        seed=[seeds[i] for i in idx], output_type="pt", progress=False,
                    ).images.float()
                )  # fmt: skip
        return torch.cat(out)

    plain = images(lambda idx: [])
    plain_read = check_images(plain)
    masks = shape_token_mask(plain)  # [samples, H/16, W/16]

    def direction(step: int) -> torch.Tensor:
        return vec.vectors[step]

    def row(tokens: str, scale: float, steered: torch.Tensor) -> dict:
        read = check_images(steered)
        return {
            "tokens": tokens,
            "scale": scale,
            "blue_shape": (read.colour == BLUE).float().mean().item(),
            "background_unchanged": (read.background == plain_read.background)
            .float()
            .mean()
            .item(),
            "shape_class_unchanged": (read.shape == plain_read.shape).float().mean().item(),
            "still_red": (read.colour == RED).float().mean().item(),
        }

    def report(rows: list[dict], done: bool) -> str:
        """Write the JSON and markdown of the rows so far (the run can be cut short)."""
        shape_rows = [r for r in rows if r["tokens"] == "shape"]
        best = [
            r for r in shape_rows if r["blue_shape"] >= 0.8 and r["background_unchanged"] >= 0.8
        ]
        plain_md = {
            "red_shape": (plain_read.colour == RED).float().mean().item(),
            "white_background": (plain_read.background == WHITE).float().mean().item(),
        }
        result = {
            "model": "flux-toy",
            "site": f"{args.kind} {args.block}",
            "samples": args.samples,
            "complete": done,
            "plain": plain_md,
            "sampling": opts.to_dict(),
            "vector": vec.info,
            "rows": rows,
            "passes_check": bool(best),
            "passing_scales": [r["scale"] for r in best],
            "seconds": time.perf_counter() - start,
            "device": device_info(),
        }
        note = (
            f"{NOTE.strip()}\n\n{args.samples} samples; the plain runs read red shapes in "
            f"{plain_md['red_shape']:.0%} and white backgrounds in "
            f"{plain_md['white_background']:.0%}. Scales with >= 80% blue and >= 80% background "
            f"unchanged (shape tokens): {result['passing_scales'] or 'none'}. "
            f"{result['seconds']:.0f} s in all{'' if done else ' (so far: the run is not finished)'}."
        )
        columns = ["tokens", "scale", "blue_shape", "background_unchanged"]
        columns += ["shape_class_unchanged", "still_red"]
        return write_results(args.out, "steering_curve", result, rows, columns, note)

    rows = [row("none (plain)", 0.0, plain)]
    for scale in floats(args.scales):

        def on_shape(idx, scale=scale):
            def site(j):
                return Site(args.kind, args.block, tokens=masks[j], batch=(j - idx[0],))

            return [(site(j), add(direction, scale)) for j in idx]

        rows.append(row("shape", scale, images(on_shape)))
        print(rows[-1], flush=True)
        report(rows, done=False)
    for scale in floats(args.all_scales):
        edits = [(Site(args.kind, args.block), add(direction, scale))]
        rows.append(row("all", scale, images(lambda idx, e=edits: e)))
        print(rows[-1], flush=True)
        report(rows, done=False)
    print(report(rows, done=True))


if __name__ == "__main__":
    main()
