"""Capture overhead: plain generation vs capture (sync / async / selective), per shape.

    PYTHONPATH=. python benchmarks/bench_capture.py --out results/     # CUDA, flux-dev random bf16
    PYTHONPATH=. python benchmarks/bench_capture.py --smoke            # CPU, flux-tiny

What is measured: one generation of `--steps` denoising steps (prompt embeddings precomputed,
output_type="latent", so text encoders and VAE are outside the timing), wall clock from launch to
"every captured tensor is in host memory" (device synchronised, copier drained). Configurations run
in the same process, on the same model: each is warmed up once, then `--repeats` rounds run every
configuration once in turn (a drift of the machine hits all alike); the median run of each is
compared to `plain` of that shape.
- plain: no hooks. noop_hooks: a Python forward hook that does nothing on every block (the hook
  dispatch cost alone: if it is large, the step is CPU launch-bound).
- sync: blocking `.cpu()` of every block output (the original tool).
- async_per_tensor: the earlier prototype: per tensor wait_stream + copy into a reused pinned buffer
  + record_stream, no drain to pageable memory.
- async: flux-ir's AsyncCopier as it runs by default (`dest="pinned"`): batched side-stream copies
  straight into regions of the process's page-locked pool (within a budget of a quarter of host
  memory, at most 32 GiB), one event per group, no host copy.
- async_pageable: `dest="pageable"` (called "fresh" in results before 2026-12): a new pageable tensor per copy, drained
  tensor by tensor by the copiers' shared threads (first-touch page faults in the drain).
- async_nodrain (diagnostic): async_pageable without the background pinned -> pageable copy (data
  discarded: `flux_ir.capture.copy.drain_runs` is replaced by a no-op while it runs).
- async_img: async, image tokens only. async_sel: 9 blocks, image tokens, 2x2 pooled, bf16.
All blocks, both streams, every step unless named otherwise. first_run_ratio: the warm-up run (new
page-locked regions and slabs are made in it) against plain's warm-up. main_cpu_ms: CPU time of the main
(launching) thread per step; when it is close to step_ms the step is CPU launch-bound and any
Python work in hooks adds to the step time one for one.
"""

from __future__ import annotations

import contextlib
import gc
import time
from unittest import mock

import torch
from common import (
    device_info,
    generate_latents,
    parser,
    pipeline,
    sampling_options,
    sync,
    write_results,
)

import flux_ir.capture.copy as capture_copy
from flux_ir.capture import BlockTrace
from flux_ir.capture.copy import AsyncCopier, SyncCopier
from flux_ir.capture.select import Selection
from flux_ir.sampling import encode_prompt

NOTE = __doc__.split("What is measured:")[1]


class PerTensorAsyncCopier(SyncCopier):
    """The earlier prototype, for comparison: per-tensor side-stream copy with record_stream
    (flush and fence as SyncCopier's: every copy is issued at once, and no sink asks for a fence)."""

    def __init__(self):
        super().__init__()
        self.stream = torch.cuda.Stream()
        self.bufs: list[torch.Tensor] = []
        self.i = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if self.i >= len(self.bufs):
                self.bufs.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
            b = self.bufs[self.i]
            self.i += 1
            b.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
        return b

    def synchronize(self) -> None:
        self.stream.synchronize()
        self.i = 0


def no_drain(runs, slab) -> None:
    """Diagnostic stand-in for `flux_ir.capture.copy.drain_runs`: skips the pinned -> pageable copy."""


class NoDrainTrace(BlockTrace):
    """Diagnostic (async_nodrain): a BlockTrace during which the copier's background threads skip the
    pinned -> pageable copy (the host tensors keep no data). `flux_ir.capture.copy.drain_runs` is
    replaced by a no-op from entering until the copier has synchronised on exit, and only then."""

    def __enter__(self) -> NoDrainTrace:
        self._no_drain = mock.patch.object(capture_copy, "drain_runs", no_drain)
        self._no_drain.start()
        try:
            return super().__enter__()
        except BaseException:
            self._no_drain.stop()
            raise

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)  # synchronises the copier: every drain has run
        finally:
            self._no_drain.stop()


def captured_bytes(trace: BlockTrace) -> int:
    total = 0
    for rec in trace.records.values():
        for store in (rec.double, rec.single):
            for steps in store.values():
                for v in steps:
                    for t in v if isinstance(v, tuple) else (v,):
                        total += 0 if t is None else t.numel() * t.element_size()
    return total


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", default="512x1,1024x1,512x4", help="SIZExBATCH, comma separated")
    args = p.parse_args()
    pipe, spec = pipeline(args.model, args.smoke)
    cuda = not args.smoke
    shapes = (
        [(64, 1), (64, 2)]
        if args.smoke
        else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    )
    steps = 2 if args.smoke else args.steps
    max_len = 32 if args.smoke else 512
    result = {"device": device_info(), "model": spec.name, "steps": steps, "shapes": {}}
    rows = []
    noop_handles: list = []

    def noop_ctx():
        @contextlib.contextmanager
        def ctx():
            t = pipe.transformer
            hook = lambda m, i, o: None  # noqa: E731
            blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
            noop_handles[:] = [b.register_forward_hook(hook) for b in blocks]
            try:
                yield None
            finally:
                for h in noop_handles:
                    h.remove()

        return ctx()

    sel_img = Selection(streams="img")
    sel_small = (
        Selection(
            double_blocks=(0, 6, 12, 18),
            single_blocks=(0, 9, 18, 27, 37),
            streams="img",
            reduce="pool2",
            store_dtype="bfloat16",
        )
        if not args.smoke
        else Selection(double_blocks=(0,), single_blocks=(1,), streams="img", reduce="pool2")
    )
    copiers = {
        "async": AsyncCopier(),
        "async_pageable": AsyncCopier(dest="pageable"),
    }
    async_copier = copiers["async"]
    configs = {
        "plain": lambda: contextlib.nullcontext(),
        "noop_hooks": noop_ctx,
        "sync": lambda: BlockTrace(pipe.transformer, copier=SyncCopier()),
        **{
            name: (lambda c=c: BlockTrace(pipe.transformer, copier=c))
            for name, c in copiers.items()
        },
        "async_img": lambda: BlockTrace(pipe.transformer, copier=async_copier, selection=sel_img),
        "async_sel": lambda: BlockTrace(
            pipe.transformer, copier=async_copier, selection=sel_small, image_grid=grid
        ),
    }
    if cuda:
        configs["async_nodrain"] = lambda: NoDrainTrace(pipe.transformer, copier=nodrain_copier)
        configs["async_per_tensor"] = lambda: BlockTrace(
            pipe.transformer, copier=PerTensorAsyncCopier()
        )
    nodrain_copier = AsyncCopier(dest="pageable") if cuda else None
    for size, batch in shapes:
        grid = (size // 16, size // 16)
        opts = sampling_options(size, steps, max_len)
        emb = encode_prompt(pipe, opts)
        emb.repeat(batch)  # made once, outside the timing

        def generate(ctx, opts=opts, emb=emb, batch=batch):
            with ctx, torch.inference_mode():
                generate_latents(pipe, opts, emb, batch)
                t_gpu = time.perf_counter()
                sync()
            return ctx, t_gpu

        shape_key = f"{size}x{size}_b{batch}"
        res = {}
        first = {}
        for name, make in configs.items():  # warm-up (pinned chunks, allocator, autotuning)
            gc.collect()
            sync()
            t0 = time.perf_counter()
            generate(make())
            sync()
            first[name] = time.perf_counter() - t0
        times = {n: [] for n in configs}
        gpu_times = {n: [] for n in configs}
        cpu_times = {n: [] for n in configs}
        nbytes = {}
        for _ in range(1 if args.smoke else args.repeats):
            for name, make in configs.items():  # round robin: a drift hits every configuration
                ctx = None
                gc.collect()  # the last run's host tensors go back to the pinned budget
                ctx = make()
                sync()
                t0, c0 = time.perf_counter(), time.thread_time()
                ctx, t_gpu = generate(ctx)
                sync()
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.thread_time() - c0)
                gpu_times[name].append(t_gpu - t0)
                nbytes[name] = captured_bytes(ctx) if isinstance(ctx, BlockTrace) else 0
                del ctx
        for name in configs:
            med = sorted(times[name])[len(times[name]) // 2]
            res[name] = {
                "median_s": med,
                "first_run_s": first[name],
                "times_s": times[name],
                "until_pipe_returned_s": sorted(gpu_times[name])[len(gpu_times[name]) // 2],
                "main_thread_cpu_s": sorted(cpu_times[name])[len(cpu_times[name]) // 2],
                "captured_GB_per_step": nbytes[name] / steps / 1e9,
            }
            print(shape_key, name, f"{med:.3f}s", flush=True)
        base = res["plain"]["median_s"]
        for name, r in res.items():
            r["ratio"] = r["median_s"] / base
            rows.append(
                dict(
                    shape=shape_key,
                    config=name,
                    step_ms=1000 * r["median_s"] / steps,
                    ratio=r["ratio"],
                    first_run_ratio=r["first_run_s"] / res["plain"]["first_run_s"],
                    main_cpu_ms=1000 * r["main_thread_cpu_s"] / steps,
                    GB_per_step=r["captured_GB_per_step"],
                )
            )
        result["shapes"][shape_key] = res
        write_results(args.out, "capture_overhead", result, rows, COLUMNS, NOTE)
        torch.cuda.empty_cache() if cuda else None
    for c in copiers.values():
        c.close()
    if nodrain_copier is not None:
        nodrain_copier.close()
    print(write_results(args.out, "capture_overhead", result, rows, COLUMNS, NOTE))


COLUMNS = ["shape", "config", "step_ms", "ratio", "main_cpu_ms", "GB_per_step", "first_run_ratio"]

if __name__ == "__main__":
    main()
