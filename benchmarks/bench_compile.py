"""torch.compile with capture: compiled blocks vs eager, with and without capture.

    PYTHONPATH=. python benchmarks/bench_compile.py --out results/     # CUDA: flux-dev 1024², 4 steps
    PYTHONPATH=. python benchmarks/bench_compile.py --smoke

What is measured: one generation of `--steps` steps (prompt embeddings precomputed, latent output),
eager and then with every block's `forward` compiled (`flux_ir.models.compile.compile_blocks`,
fullgraph, inductor), each without and with a capture of every block (async copier). "first_s" is the
first generation (compilation included for the first compiled one); "step_ms" is the median of 3 runs
after it; "new graphs" counts graphs compiled after the first run of that configuration (0: no
recompilation per step or per run); "graphs_total" counts all graphs compiled so far (2 expected: one
per block class, shared by all blocks; many more would mean per-block recompiles); the ratio is to
eager without capture.
"""

from __future__ import annotations

import time

import torch
from common import generate_latents, parser, pipeline, sampling_options, sync, write_results

from flux_ir.capture import BlockTrace
from flux_ir.capture.copy import AsyncCopier
from flux_ir.models.compile import compile_blocks
from flux_ir.sampling import encode_prompt

NOTE = __doc__.split("What is measured:")[1]


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--backend", default="inductor")
    args = p.parse_args()
    size, steps = (64, 2) if args.smoke else (args.size, args.steps)
    backend = "eager" if args.smoke else args.backend
    pipe, spec = pipeline(args.model, args.smoke)
    opts = sampling_options(size, steps, 32 if args.smoke else 512)
    emb = encode_prompt(pipe, opts)
    copier = AsyncCopier()

    def generate(capture: bool):
        ctx = BlockTrace(pipe.transformer, copier=copier) if capture else None
        with torch.inference_mode():
            if ctx:
                ctx.__enter__()
            try:
                generate_latents(pipe, opts, emb)
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)

    result, rows = {"model": spec.name, "size": size, "steps": steps, "runs": {}}, []
    for compiled in (False, True):
        if compiled:
            t0 = time.perf_counter()
            compile_blocks(pipe.transformer, backend=backend)
            result["compile_wrap_s"] = time.perf_counter() - t0
        for capture in (False, True):
            name = f"{'compiled' if compiled else 'eager'}{' + capture' if capture else ''}"
            sync()
            t0 = time.perf_counter()
            generate(capture)
            sync()
            first = time.perf_counter() - t0
            g0 = graphs()
            times = []
            for _ in range(1 if args.smoke else 3):
                sync()
                t0 = time.perf_counter()
                generate(capture)
                sync()
                times.append(time.perf_counter() - t0)
            med = sorted(times)[len(times) // 2]
            r = dict(
                config=name, first_s=first, step_ms=1000 * med / steps, new_graphs=graphs() - g0
            )
            result["runs"][name] = r
            base = result["runs"]["eager"]["step_ms"]
            r["ratio"] = r["step_ms"] / base
            rows.append(r)
            print(r, flush=True)
            write_results(args.out, "compile", result, rows, COLUMNS, NOTE)
    copier.close()
    print(write_results(args.out, "compile", result, rows, COLUMNS, NOTE))


COLUMNS = ["config", "first_s", "step_ms", "ratio", "new_graphs", "graphs_total"]

if __name__ == "__main__":
    main()
