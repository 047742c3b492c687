"""Where capture time goes: the AsyncCopier taken apart, stage by stage, on the same model and shape.

    PYTHONPATH=. python benchmarks/bench_capture_diag.py --out results/   # CUDA, flux-dev random bf16
    PYTHONPATH=. python benchmarks/bench_capture_diag.py --smoke           # CPU, flux-tiny

What is measured: one generation of `--steps` steps from precomputed prompt embeddings
(output_type="latent"), every block and both streams recorded unless named otherwise. Each
configuration adds one stage of the capture path to the one before it:
- plain: no hooks. noop_hooks: a forward hook that does nothing on every block.
- trace_keep: BlockTrace with a copier that returns the device tensor itself (the trace's own Python
  work; the outputs stay on the device).
- queue_only: AsyncCopier that carves host tensors and queues the copies, then drops them at flush
  (no CUDA copy issued).
- issue_only: AsyncCopier that issues the side-stream copies and records one event per group, with
  no background threads (the main thread waits for the events after the generation).
- issue_on_device: issue_only with device destinations (the same calls; no PCIe transfer).
- paced_dma: no capture; a hook on every 7th block copies 64 MiB of an unrelated device buffer to
  page-locked host memory on a side stream (the capture's traffic alone, without its per-tensor work).
- async: the default AsyncCopier (regions of the process's page-locked pool, the shared threads
  waiting for the events).
Every configuration is warmed up once, then `--repeats` rounds run each configuration once in turn
(so a drift of the machine hits all alike); `step_ms` is the median run divided by the
steps (`min_step_ms`/`min_ratio`: the fastest run, beside the median: the host's noise makes
some runs far slower); `launch_ms`: main-thread CPU time per step until the pipeline returns (before the final
device synchronisation, so spinning in it does not count); `in_hooks_ms`: wall time per step spent
inside the trace's hooks (the copier's flushes included; the BlockTrace configurations);
`bg_cpu_ms`: CPU time per step of all
other threads of the process during the runs; pool statistics: page-locked regions made during the
runs, the seconds spent making them (background) and the copies that found no region ready (staged).
Afterwards one run each of plain and async is profiled (torch.profiler, CPU and CUDA activity) and
the operators with the largest self CPU time are listed (`profile_<shape>.txt`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from pathlib import Path

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

from flux_ir.capture import BlockTrace
from flux_ir.capture.copy import AsyncCopier, SyncCopier, complete
from flux_ir.sampling import encode_prompt

NOTE = __doc__.split("What is measured:")[1]
COLUMNS = [
    "shape",
    "config",
    "step_ms",
    "ratio",
    "min_step_ms",
    "min_ratio",
    "launch_ms",
    "in_hooks_ms",
    "bg_cpu_ms",
    "runs_ms",
    "regions_made",
    "region_make_s",
    "misses",
]


class KeepOnDevice(SyncCopier):
    """A copier that returns the tensor itself (nothing leaves the device)."""

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return t


class QueueOnly(AsyncCopier):
    """Carves host tensors and queues copies like AsyncCopier, then drops them at flush."""

    def flush(self) -> None:
        self._pending, self._pending_bytes = [], 0


class IssueOnly(AsyncCopier):
    """Issues the copies like AsyncCopier; the caller's thread waits for them in `synchronize`.

    (No thread completes groups during the run, so the in-flight bound is lifted.)
    """

    def __init__(self):
        super().__init__(pool_bytes=1 << 40)
        self._held: list[tuple] = []

    def _submit(self, job: tuple) -> None:
        self._held.append(job)

    def synchronize(self) -> None:
        self.flush()
        jobs, self._held = self._held, []
        for job in jobs:
            complete(job)
        super().synchronize()


class IssueOnDevice(IssueOnly):
    """IssueOnly with device destinations: the same copy calls, events and bookkeeping, but the
    bytes stay in device memory (no PCIe transfer, no host memory written)."""

    def _carve(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=self.dtype or t.dtype, device=t.device)


@contextlib.contextmanager
def paced_dma(transformer, every: int = 7, nbytes: int = 64 << 20):
    """No capture: every `every`-th block's forward hook copies `nbytes` of an unrelated device
    buffer to page-locked host memory on a side stream (the capture's traffic, without its
    per-tensor work): does the transfer alone slow a launch-bound step?"""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    device = next(transformer.parameters()).device
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def hook(module, args, output):
        if stream is None:
            dst.copy_(src)
            return
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    handles = [b.register_forward_hook(hook) for b in blocks[every - 1 :: every]]
    try:
        yield None
    finally:
        for h in handles:
            h.remove()
        if stream is not None:
            stream.synchronize()


class TimedTrace(BlockTrace):
    """BlockTrace that adds the wall time spent inside its hooks (and flushes) to `HOOK_S[0]`."""

    def _block_hook(self, kind: str, index: int):
        return timed(super()._block_hook(kind, index))

    def _on_call(self, module, args, kwargs) -> None:
        timed(super()._on_call)(module, args, kwargs)

    def _on_temb(self, module, args, output) -> None:
        timed(super()._on_temb)(module, args, output)


HOOK_S = [0.0]


def timed(fn):
    def wrapper(*args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            HOOK_S[0] += time.perf_counter() - t0

    return wrapper


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            pass
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", default="512x1,1024x1", help="SIZExBATCH, comma separated")
    p.add_argument("--no_profile", action="store_true", help="skip the torch.profiler runs")
    args = p.parse_args()
    pipe, spec = pipeline(args.model, args.smoke)
    shapes = (
        [(64, 1)]
        if args.smoke
        else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    )
    steps = 2 if args.smoke else args.steps
    repeats = 2 if args.smoke else args.repeats
    main_tid = threading.get_native_id()
    result = {"device": device_info(), "model": spec.name, "steps": steps, "shapes": {}}
    rows: list[dict] = []
    copiers = {
        "queue_only": QueueOnly(),
        "issue_only": IssueOnly(),
        "issue_on_device": IssueOnDevice(),
        "async": AsyncCopier(),
    }

    @contextlib.contextmanager
    def noop_hooks():
        t = pipe.transformer
        blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
        handles = [b.register_forward_hook(lambda m, i, o: None) for b in blocks]
        try:
            yield None
        finally:
            for h in handles:
                h.remove()

    configs = {
        "plain": contextlib.nullcontext,
        "noop_hooks": noop_hooks,
        "trace_keep": lambda: TimedTrace(pipe.transformer, copier=KeepOnDevice()),
        "paced_dma": lambda: paced_dma(pipe.transformer),
        **{n: (lambda c=c: TimedTrace(pipe.transformer, copier=c)) for n, c in copiers.items()},
    }
    out = Path(args.out)
    for size, batch in shapes:
        shape = f"{size}x{size}_b{batch}"
        opts = sampling_options(size, steps, 32 if args.smoke else 512)
        emb = encode_prompt(pipe, opts)
        emb.repeat(batch)  # made once, outside the timing

        def run(ctx, opts=opts, emb=emb, batch=batch) -> tuple[float, float]:
            """(wall seconds to captured-in-host-memory, main-thread CPU seconds until return)."""
            sync()
            t0, c0 = time.perf_counter(), time.thread_time()
            with ctx, torch.inference_mode():
                generate_latents(pipe, opts, emb, batch)
                launch = time.thread_time() - c0
            sync()
            return time.perf_counter() - t0, launch

        for make in configs.values():  # warm-up, every configuration
            gc.collect()
            run(make())
        times = {n: [] for n in configs}
        hook_s = dict.fromkeys(configs, 0.0)
        launches = {n: [] for n in configs}
        stats = {n: {} for n in configs}
        bg = dict.fromkeys(configs, 0.0)
        for _ in range(repeats):  # round robin: drifts of the machine hit every configuration
            for name, make in configs.items():
                copier = copiers.get(name)
                stats0 = dict(copier.pool.stats) if copier else {}
                gc.collect()  # the last run's host tensors go back to the pinned budget
                ctx = make()
                cpu0, h0 = thread_cpu_s(), HOOK_S[0]
                wall, launch = run(ctx)
                cpu1 = thread_cpu_s()
                hook_s[name] += HOOK_S[0] - h0
                del ctx
                bg[name] += sum(v - cpu0.get(t, 0.0) for t, v in cpu1.items() if t != main_tid)
                times[name].append(wall)
                launches[name].append(launch)
                for k, v in copier.pool.stats.items() if copier else ():
                    stats[name][k] = stats[name].get(k, 0) + v - stats0[k]
        res = {}
        for name in configs:
            med = sorted(times[name])[repeats // 2]
            res[name] = dict(
                times_s=times[name],
                launch_s=launches[name],
                bg_cpu_s=bg[name],
                pool_stats=stats[name],
            )
            rows.append(
                dict(
                    shape=shape,
                    config=name,
                    step_ms=1000 * med / steps,
                    min_step_ms=1000 * min(times[name]) / steps,
                    launch_ms=1000 * sorted(launches[name])[repeats // 2] / steps,
                    in_hooks_ms=1000 * hook_s[name] / (steps * repeats),
                    bg_cpu_ms=1000 * bg[name] / (steps * repeats),
                    runs_ms=" / ".join(f"{1000 * t:.0f}" for t in times[name]),
                    regions_made=stats[name].get("regions"),
                    region_make_s=stats[name].get("make_s"),
                    misses=stats[name].get("misses"),
                    _median=med,
                )
            )
            print(shape, name, f"{med:.3f}s", stats[name], flush=True)
        plain = next(r for r in rows if r["shape"] == shape and r["config"] == "plain")
        for r in rows:
            if r["shape"] == shape:
                r["ratio"] = r["_median"] / plain["_median"]
                r["min_ratio"] = r["min_step_ms"] / plain["min_step_ms"]
        result["shapes"][shape] = res
        write_results(out, "capture_diag", result, rows, COLUMNS, NOTE)
        if not args.no_profile:
            profile(configs, run, shape, out)
    for c in copiers.values():
        c.close()
    print(write_results(out, "capture_diag", result, rows, COLUMNS, NOTE))


def profile(configs, run, shape: str, out: Path) -> None:
    """Self CPU time per operator for one run of plain and of async (`profile_<shape>.txt`)."""
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    text = []
    for name in ("plain", "async"):
        gc.collect()
        with torch.profiler.profile(activities=acts) as prof:
            wall, launch = run(configs[name]())
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        text.append(f"## {name}: {1000 * wall:.0f} ms (main thread CPU {1000 * launch:.0f} ms)\n")
        text.append(table)
    (out / f"profile_{shape}.txt").write_text("\n".join(text))


if __name__ == "__main__":
    main()
