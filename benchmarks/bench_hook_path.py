"""Host-side cost of the capture hook path: microseconds of Python per block hook, on the CPU.

    PYTHONPATH=. python benchmarks/bench_hook_path.py --out results/
    PYTHONPATH=. python benchmarks/bench_hook_path.py --smoke

What is measured: BlockTrace's block hooks called directly (a double block: two tensors; a single
block: one [txt; img] buffer) with tiny CPU tensors, so the copies cost nothing and what remains is
the Python work per hook: `null` (a copier that returns its input: the hook itself), `sync`
(SyncCopier) and AsyncCopier per host destination (on the CPU its flush is a plain copy, so this is
the enqueue and chunk bookkeeping, without the CUDA calls). Best of 7 rounds of 2000 hook pairs. A
step of flux-dev calls 57 block hooks: multiply by 57 for the main thread's cost per step.
"""

from __future__ import annotations

import time

import torch
from common import parser, write_results
from torch import nn

from flux_ir.capture.copy import AsyncCopier, SyncCopier
from flux_ir.capture.trace import BlockTrace, PassRecord

NOTE = __doc__.split("What is measured:")[1]


class NullCopier(SyncCopier):
    """Returns the tensor itself: the cost of the hook path alone."""

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return t


def blocks() -> nn.Module:
    t = nn.Module()
    t.transformer_blocks = nn.ModuleList([nn.Identity()])
    t.single_transformer_blocks = nn.ModuleList([nn.Identity()])
    t.time_text_embed = nn.Identity()
    return t


def us_per_hook(copier, n: int) -> float:
    trace = BlockTrace(blocks(), copier=copier)
    trace._recording_blocks, trace._current = True, PassRecord()
    double, single = trace._block_hook("double", 0), trace._block_hook("single", 0)
    with torch.inference_mode():
        img, txt, joint = torch.randn(1, 16, 64), torch.randn(1, 8, 64), torch.randn(1, 24, 64)
        pair = (joint[:, :8], joint[:, 8:])
        t0 = time.perf_counter()
        for _ in range(n):
            double(None, (), (txt, img))
            single(None, (), pair)
        copier.synchronize()
        return 1e6 * (time.perf_counter() - t0) / (2 * n)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    n, rounds = (200, 2) if args.smoke else (2000, 7)
    makers = {
        "null": NullCopier,
        "sync": SyncCopier,
        **{f"async_{d}": (lambda d=d: AsyncCopier(dest=d)) for d in ("pinned", "pageable")},
    }
    rows = []
    for name, make in makers.items():
        copier = make()
        best = min(us_per_hook(copier, n) for _ in range(rounds))
        getattr(copier, "close", lambda: None)()
        rows.append({"copier": name, "us_per_hook": best, "ms_per_57_hooks": 57 * best / 1000})
        print(name, f"{best:.1f} us", flush=True)
    print(write_results(args.out, "hook_path", {"rows": rows}, rows, COLUMNS, NOTE))


COLUMNS = ["copier", "us_per_hook", "ms_per_57_hooks"]

if __name__ == "__main__":
    main()
