"""Lens throughput: decoded (block, step) images per second from an in-memory capture.

    PYTHONPATH=. python benchmarks/bench_lens.py --out results/     # CUDA: flux-schnell 512², 4 steps
    PYTHONPATH=. python benchmarks/bench_lens.py --smoke

What is measured: a capture of every block at every step (random bf16 weights, 4 steps at 512²:
57 x 4 = 228 items) decoded with `decode_capture` (lens head on the GPU, VAE decode in batches of
`batch` latents, bf16), wall clock for all items, to PIL images ("pil") and to tensors ("pt", no
host image conversion). The first batch size is run once before timing (warm-up).
"""

from __future__ import annotations

import time

from common import parser, pipeline, sampling_options, sync, write_results

from flux_ir.capture import CaptureOptions, run_capture
from flux_ir.capture.copy import AsyncCopier
from flux_ir.lens import block_steps, decode_capture

NOTE = __doc__.split("What is measured:")[1]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-schnell")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batches", default="8,16")
    args = p.parse_args()
    size = 64 if args.smoke else args.size
    pipe, spec = pipeline(args.model, args.smoke)
    opts = CaptureOptions(sampling_options(size, 4, 32 if args.smoke else 256), seed=0)
    _, cap = run_capture(pipe, opts, copier=AsyncCopier())
    items = block_steps(cap)
    result = {"model": spec.name, "size": size, "items": len(items), "runs": []}
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for out_type in ("pt", "pil"):
        for i, batch in enumerate(batches):

            def run(n=None, batch=batch, out_type=out_type):
                for _ in decode_capture(
                    pipe,
                    cap,
                    items[: n or len(items)],
                    batch_size=batch,
                    progress=False,
                    output_type=out_type,
                ):
                    pass

            if i == 0:
                run(min(len(items), 2 * batch))  # warm-up
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            dt = time.perf_counter() - t0
            r = dict(output=out_type, batch=batch, seconds=dt, images_per_s=len(items) / dt)
            result["runs"].append(r)
            rows.append(r)
            print(r, flush=True)
            write_results(args.out, "lens_throughput", result, rows, COLUMNS, NOTE)
    print(write_results(args.out, "lens_throughput", result, rows, COLUMNS, NOTE))


COLUMNS = ["output", "batch", "seconds", "images_per_s"]

if __name__ == "__main__":
    main()
