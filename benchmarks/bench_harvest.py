"""Harvest throughput: images/s and GB/s written, against plain generation of the same prompts.

    PYTHONPATH=. python benchmarks/bench_harvest.py --out benchmarks/results      # CUDA: full-size schnell
    uv run python benchmarks/bench_harvest.py --smoke --out /tmp/bench            # CPU, flux-tiny, seconds

Full-size FLUX.1-schnell architecture with random bf16 weights (no download): `--images` distinct
prompts at `--size`² pixels, `--steps` steps, `--batch` images per pipeline call. Plain generation is
`generate(..., prompts=batch, seed=seeds, output_type="latent")` per batch (text encoders included,
no VAE: a harvest does not decode either). The harvest is `run_harvest` of the same prompts and seeds
keeping every image token of one block (`--block`, default single block 18) at every step into a new
dataset directory under `--scratch`: device-to-host copies on a side stream, shards written and
fsync'ed by a background thread, commits and the index table. Both run in the same process, after a
warm-up batch: harvest (the process's first), plain, harvest again (later calls), plain again;
`ratio` = harvest images/s / plain images/s of the same round. The target is a ratio of 0.9 or more.
The datasets are deleted afterwards.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, parser, pipeline, sync, write_results  # noqa: E402

from flux_ir.capture import Selection  # noqa: E402
from flux_ir.sampling import SamplingOptions, generate  # noqa: E402
from flux_ir.workflows.harvest import HarvestEntry, HarvestOptions, run_harvest  # noqa: E402


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="flux-schnell")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--block", default="18", help="single block whose image tokens are kept")
    p.add_argument("--scratch", default=None, help="where the datasets are written (then deleted)")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.batch, args.images, args.block = 32, 2, 2, 4, "-1"
    pipe, spec = pipeline(args.model, args.smoke)
    t5 = 32 if args.smoke else spec.max_sequence_length
    opts = SamplingOptions(
        prompt="", width=args.size, height=args.size, num_steps=args.steps, max_sequence_length=t5
    )
    prompts = [f"a photo of a cat, number {i}" for i in range(args.images)]
    entries = [
        HarvestEntry(SamplingOptions(**{**opts.to_dict(), "prompt": t}), (i,))
        for i, t in enumerate(prompts)
    ]
    harvest = HarvestOptions(
        Selection.parse("none", args.block, "all", "img"), batch_size=args.batch, shard_mb=1024
    )
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-harvest-"))
    scratch.mkdir(parents=True, exist_ok=True)

    def plain() -> float:
        sync()
        t0 = time.perf_counter()
        for lo in range(0, args.images, args.batch):
            generate(
                pipe,
                opts,
                prompts=prompts[lo : lo + args.batch],
                seed=list(range(lo, min(lo + args.batch, args.images))),
                output_type="latent",
                progress=False,
            )
        sync()
        return time.perf_counter() - t0

    def harvested(name: str) -> tuple[float, int]:
        root = scratch / name
        sync()
        t0 = time.perf_counter()
        result = run_harvest(pipe, entries, root, harvest, model_name=spec.name, progress=False)
        sync()
        seconds = time.perf_counter() - t0
        shutil.rmtree(root, ignore_errors=True)
        return seconds, result.bytes_written

    generate(pipe, opts, prompts=prompts[: args.batch], seed=0, output_type="latent")  # warm-up
    rows = []
    try:
        for call in ("first", "later"):
            h_s, nbytes = harvested(f"harvest-{call}")
            p_s = plain()
            rows.append(
                {
                    "call": call,
                    "images": args.images,
                    "plain_img_s": args.images / p_s,
                    "harvest_img_s": args.images / h_s,
                    "ratio": p_s / h_s,
                    "GB_written": nbytes / 1e9,
                    "GB_s": nbytes / 1e9 / h_s,
                }
            )
            print(rows[-1], flush=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "model": f"{spec.name} (random weights)",
        "size": args.size,
        "steps": args.steps,
        "batch": args.batch,
        "block": f"single.{args.block}",
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "rows": rows,
        "ratio_later": rows[-1]["ratio"],
        "target_ratio": 0.9,
        "device": device_info(),
    }
    note = (
        f"{spec.name} architecture, random weights, {args.size}x{args.size}, {args.steps} steps, "
        f"batch {args.batch}: every image token of single block {args.block} at every step "
        "written (safetensors shards, fsync'ed), against plain generation to latents. "
        "ratio = harvest images/s / plain images/s (target >= 0.9)."
    )
    columns = ["call", "images", "plain_img_s", "harvest_img_s", "ratio", "GB_written", "GB_s"]
    print(write_results(args.out, "harvest", result, rows, columns, note))
    return result


if __name__ == "__main__":
    main()
