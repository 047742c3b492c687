"""Scaling over the GPUs of one host: sweep, harvest and causal map, one GPU then all, in one launch.

    torchrun --standalone --nproc_per_node 8 benchmarks/bench_scaling.py --parts sweep --out DIR
    python benchmarks/bench_scaling.py --summary --out DIR      # scaling.{json,md}: every part in DIR
    benchmarks/run_scaling.sh --out DIR                         # every part, each under a time cap
    benchmarks/run_scaling.sh --smoke --out /tmp/scaling        # CPU, flux-tiny, 2 gloo ranks

Each process loads its own pipeline (random bf16 weights in the exact architecture, no download) on
`cuda:LOCAL_RANK`. Per part, every process warms up on a small run of its own; process 0 times a
second one, which sizes the measured workload so that one GPU needs about `--seconds` (a whole
number of rounds of `processes x batch` units, so that every process gets the same share); then
process 0 runs it alone while the others wait, and then all processes run it sharded through the
public API (`run_sweep(..., dist=)`, `run_harvest(..., dist=)`, `causal_map(..., dist=)`) exactly as
`flux-ir sweep`, `flux-ir harvest` and `flux-ir patch` do under torchrun. Speed-up = one GPU's wall
time / all GPUs' wall time, both measured in this run, from the first call to the last process done.

- sweep: flux-schnell's architecture, 512², 4 steps, batch 8 (`run_sweep`: PNGs and points table);
  the paper's 60,000-point grid projected from the all-GPU rate.
- harvest: flux-schnell's architecture, 512², 4 steps, batch 4, every image token of single block
  18 at every step, one batch a shard; the all-GPU dataset is compared with the one-GPU dataset
  through the dataset loader, record by record (prompt, seed, step, block, stream, pass: token
  positions and vectors), the index order aside, and shard by shard (sha256).
- causal: flux-dev's architecture, 1024², 4 steps, batch 8: blocks x every step, the blocks taken
  from the last one backwards; the all-GPU map's effects compared with the one-GPU map's.

Output in `--out`: `scaling_<part>.json` / `.md` per part, and `scaling.json` / `scaling.md`, the
summary of every part found there against the targets (sweep >= 3.7x on 4 GPUs and >= 7.2x on 8;
harvest >= 3.6x / >= 7x; the 60,000-point grid under 25 minutes on 8). `--smoke`: flux-tiny on the
CPU (gloo) at tiny sizes and fixed workloads, to check the script only; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import device_info, markdown_table  # noqa: E402

from flux_ir.sweep.shard import Distributed  # noqa: E402

PARTS = ("sweep", "harvest", "causal")
UNITS = {"sweep": "images", "harvest": "images", "causal": "sites"}
TARGETS = {"sweep": {4: 3.7, 8: 7.2}, "harvest": {4: 3.6, 8: 7.0}, "causal": {}}
GRID_POINTS, GRID_TARGET_MIN, GRID_TARGET_GPUS = 60_000, 25.0, 8
FULL = {
    "sweep": dict(model="flux-schnell", size=512, steps=4, batch=8),
    "harvest": dict(model="flux-schnell", size=512, steps=4, batch=4, block=18),
    "causal": dict(model="flux-dev", size=1024, steps=4, batch=8),
}
SMOKE = {
    "sweep": dict(model="flux-tiny", size=32, steps=2, batch=2),
    "harvest": dict(model="flux-tiny", size=32, steps=2, batch=2, block=-1),
    "causal": dict(model="flux-tiny", size=32, steps=2, batch=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for the JSON and markdown results")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: sweep,harvest,causal")
    p.add_argument("--smoke", action="store_true", help="flux-tiny on the CPU, tiny fixed sizes")
    p.add_argument("--summary", action="store_true", help="only write scaling.{json,md} from --out")
    p.add_argument(
        "--seconds", type=float, default=100.0, help="one GPU's time per part (sizes the work)"
    )
    p.add_argument(
        "--units", type=int, default=None, help="points / images / sites per part (not sized)"
    )
    p.add_argument("--scratch", default=None, help="where sweeps and datasets go (then deleted)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"--parts {','.join(unknown)}: choose from {','.join(PARTS)}")
    return args


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock() -> float:
    sync()
    return time.perf_counter()


def load(name: str, device: str):
    from flux_ir.models import load_pipeline

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        pipe, spec = load_pipeline(name, device=device, dtype=torch.bfloat16, weights="random")
    else:
        pipe, spec = load_pipeline(name, device=device, weights="random")
    pipe.set_progress_bar_config(disable=True)
    return pipe, spec


def workload(args, dist: Distributed, batch: int, unit_seconds: float | None) -> int:
    """Units of work for one GPU: `--units`, else about `--seconds` at the warm-up's rate, in whole
    rounds of `processes x batch` (at least two); decided by process 0, the same everywhere."""
    round_ = dist.world * batch
    if args.units is not None:
        n = args.units
    elif args.smoke:
        n = 2 * round_
    else:
        n = max(2, math.ceil(args.seconds / max(unit_seconds, 1e-9) / round_)) * round_
    return dist.gather(n)[0]


class Part:
    """One part's measurement: set up, warm up, size, run alone on process 0, then on all."""

    def __init__(self, args, dist: Distributed, device: str, scratch: Path, settings: dict):
        self.args, self.dist, self.device, self.scratch = args, dist, device, scratch
        self.settings = settings
        t0 = time.perf_counter()
        self.pipe, self.spec = load(settings["model"], device)
        self.load_s = time.perf_counter() - t0

    def say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    def measure(self, name: str) -> dict | None:
        dist = self.dist
        self.warm(0)  # every process: its first call
        dist.barrier()
        unit_s = None
        if dist.is_main:
            t0 = clock()
            n = self.warm(1)
            unit_s = (clock() - t0) / n
        units = workload(self.args, dist, self.settings["batch"], unit_s)
        units = self.prepare(units)
        self.say(
            f"{name}: {units} {UNITS[name]} (warm-up {unit_s} s each), load {self.load_s:.1f} s"
        )
        dist.barrier()
        one = None
        if dist.is_main:
            t0 = clock()
            self.run(None, "one")
            one = clock() - t0
        self.say(f"{name}: one GPU {one} s")
        dist.barrier()
        t0 = clock()
        mine = self.run(dist, "all")
        dist.barrier()
        many = clock() - t0
        self.say(f"{name}: {dist.world} GPUs {many:.2f} s")
        shares = dist.gather(f"{self.device}: {mine}")
        loads = dist.gather(round(self.load_s, 1))
        check = self.check() if dist.is_main else None
        self.cleanup()
        if not dist.is_main:
            return None
        row = {
            "part": name,
            "model": f"{self.spec.name} (random weights)",
            "setting": self.describe(),
            "gpus": dist.world,
            UNITS[name]: units,
            "one_gpu_s": one,
            "all_gpus_s": many,
            "rate_one": units / one,
            "rate_all": units / many,
            "rate_unit": f"{UNITS[name]}/s",
            "speedup": one / many,
            "efficiency": one / many / dist.world,
            "target": TARGETS[name].get(dist.world),
            "warmup_unit_s": unit_s,
            "load_s": loads,
            "ranks": shares,
            "check": check,
        }
        if name == "sweep":
            row["grid_60000_min_one"] = GRID_POINTS / row["rate_one"] / 60
            row["grid_60000_min_all"] = GRID_POINTS / row["rate_all"] / 60
        return row


class SweepPart(Part):
    def config(self, points: int):
        from flux_ir.sweep import GridSpec, SweepConfig

        s = self.settings
        return SweepConfig.from_spec(
            self.spec,
            grid=GridSpec(n_alpha=1, n_beta=points),
            width=s["size"],
            height=s["size"],
            num_steps=s["steps"],
            guidance=self.spec.guidance,
            max_sequence_length=self.spec.max_sequence_length,
        )

    def warm(self, k: int) -> int:
        from flux_ir.sweep import run_sweep

        b = self.settings["batch"]
        root = self.scratch / f"warm-{self.dist.rank}-{k}"
        run_sweep(self.pipe, self.config(b), root, batch_size=b, progress=False)
        shutil.rmtree(root, ignore_errors=True)
        return b

    def prepare(self, units: int) -> int:
        self.cfg = self.config(units)
        return units

    def run(self, dist, tag: str):
        from flux_ir.sweep import run_sweep

        b = self.settings["batch"]
        out = self.scratch / f"sweep-{tag}"
        result = run_sweep(self.pipe, self.cfg, out, batch_size=b, dist=dist, progress=False)
        return f"{result.generated} points"

    def check(self) -> dict:
        meta = [json.loads((self.scratch / f"sweep-{t}" / "metadata.json").read_text()) for t in ("one", "all")]  # fmt: skip
        return {
            "complete": all(m["complete"] for m in meta),
            "same_points": len(meta[0]["points"]) == len(meta[1]["points"]),
        }

    def cleanup(self) -> None:
        self.dist.barrier()
        if self.dist.is_main:
            for t in ("one", "all"):
                shutil.rmtree(self.scratch / f"sweep-{t}", ignore_errors=True)

    def describe(self) -> str:
        s = self.settings
        return f"{s['size']}², {s['steps']} steps, batch {s['batch']}"


class HarvestPart(Part):
    def entries(self, n: int, prefix: str):
        from flux_ir.sampling import SamplingOptions
        from flux_ir.workflows.harvest import HarvestEntry

        s = self.settings
        base = SamplingOptions(
            prompt="",
            width=s["size"],
            height=s["size"],
            num_steps=s["steps"],
            max_sequence_length=self.spec.max_sequence_length,
        )
        return [
            HarvestEntry(SamplingOptions(**{**base.to_dict(), "prompt": f"{prefix} {i}"}), (i,))
            for i in range(n)
        ]

    def options(self):
        from flux_ir.capture import Selection
        from flux_ir.workflows.harvest import HarvestOptions

        s = self.settings
        sel = Selection.parse("none", str(s["block"]), "all", "img")
        return HarvestOptions(sel, batch_size=s["batch"], shard_mb=1e-6)  # one batch a shard

    def warm(self, k: int) -> int:
        from flux_ir.workflows.harvest import run_harvest

        b = self.settings["batch"]
        root = self.scratch / f"warm-{self.dist.rank}-{k}"
        entries = self.entries(b, f"a warm-up photo {k},")
        run_harvest(self.pipe, entries, root, self.options(), model_name="warm", progress=False)
        shutil.rmtree(root, ignore_errors=True)
        return b

    def prepare(self, units: int) -> int:
        self.all_entries = self.entries(units, "a photo of a cat, number")
        return units

    def run(self, dist, tag: str):
        from flux_ir.workflows.harvest import run_harvest

        out = self.scratch / f"harvest-{tag}"
        name = f"{self.spec.name} (random weights)"
        result = run_harvest(
            self.pipe, self.all_entries, out, self.options(), model_name=name, dist=dist,
            progress=False,
        )  # fmt: skip
        gb = result.bytes_written / 1e9
        return f"{result.images} images, {result.generated} shards, {gb:.2f} GB written"

    def check(self) -> dict:
        return compare_datasets(self.scratch / "harvest-one", self.scratch / "harvest-all")

    def cleanup(self) -> None:
        self.dist.barrier()
        if self.dist.is_main:
            for t in ("one", "all"):
                shutil.rmtree(self.scratch / f"harvest-{t}", ignore_errors=True)

    def describe(self) -> str:
        s = self.settings
        return (
            f"{s['size']}², {s['steps']} steps, batch {s['batch']}, single block {s['block']} "
            "image tokens at every step"
        )


def compare_datasets(one: Path, other: Path) -> dict:
    """Two dataset directories, record by record through the loader (index order aside): the same
    records (prompt, seed, step, kind, block, stream, pass), token positions and vectors; and shard
    by shard, the commits' sha256."""
    from flux_ir.store.dataset import committed_shards, open_dataset

    keys = ["prompt", "seed", "step", "kind", "block", "stream", "pass"]
    a, b = open_dataset(one), open_dataset(other)
    ia, ib = (d.index.sort_values(keys).reset_index(drop=True) for d in (a, b))
    same_records = ia[keys].equals(ib[keys]) and ia["count"].equals(ib["count"])
    identical, worst = same_records, 0.0
    if same_records:
        for ra, rb in zip(ia.itertuples(index=False), ib.itertuples(index=False), strict=True):
            va = a.activations(ra.shard)[ra.offset : ra.offset + ra.count]
            vb = b.activations(rb.shard)[rb.offset : rb.offset + rb.count]
            ta = a.tokens(ra.shard)[ra.offset : ra.offset + ra.count]
            tb = b.tokens(rb.shard)[rb.offset : rb.offset + rb.count]
            if not (torch.equal(va, vb) and torch.equal(ta, tb)):
                identical = False
                worst = max(worst, float((va.float() - vb.float()).abs().max()))
    ca, cb = committed_shards(one), committed_shards(other)
    return {
        "complete": a.complete and b.complete,
        "records": len(ia),
        "same_records": bool(same_records),
        "identical_vectors": bool(identical),
        "max_abs_difference": worst,
        "shards": len(ca),
        "same_shard_sha256": sum(
            1 for k, c in ca.items() if k in cb and cb[k]["sha256"] == c["sha256"]
        ),
    }


class CausalPart(Part):
    def selection(self, rows: int):
        from flux_ir.capture import Selection

        t = self.pipe.transformer
        n_double, n_single = len(t.transformer_blocks), len(t.single_transformer_blocks)
        blocks = [("double", i) for i in range(n_double)] + [("single", i) for i in range(n_single)]
        chosen = blocks[len(blocks) - min(rows, len(blocks)) :]
        return Selection(
            double_blocks=tuple(i for k, i in chosen if k == "double"),
            single_blocks=tuple(i for k, i in chosen if k == "single"),
        )

    def options(self):
        from dataclasses import replace

        from flux_ir.capture import CaptureOptions
        from flux_ir.sampling import SamplingOptions

        s = self.settings
        opts = SamplingOptions(
            prompt="a photo of a cat",
            width=s["size"],
            height=s["size"],
            num_steps=s["steps"],
            max_sequence_length=self.spec.max_sequence_length,
        )
        return CaptureOptions(opts, seed=0), CaptureOptions(
            replace(opts, prompt="a photo of a dog"), seed=0
        )

    def causal(self, sel, dist=None):
        from flux_ir.workflows.patching import causal_map

        target, source = self.options()
        return causal_map(
            self.pipe, target, source, selection=sel, batch_size=self.settings["batch"],
            progress=False, dist=dist,
        )  # fmt: skip

    def warm(self, k: int) -> int:
        rows = max(1, self.settings["batch"] // self.settings["steps"])
        return self.causal(self.selection(rows)).effect.size

    def prepare(self, units: int) -> int:
        steps = self.settings["steps"]
        self.sel = self.selection(math.ceil(units / steps))
        n = len(self.sel.double_blocks) + len(self.sel.single_blocks)
        self.maps = {}
        return n * steps

    def run(self, dist, tag: str):
        self.maps[tag] = self.causal(self.sel, dist)
        n, b = self.maps[tag].effect.size, self.settings["batch"]
        batches = [min(b, n - lo) for lo in range(0, n, b)]  # causal_map's batches of sites
        d = dist or Distributed()
        return f"{sum(batches[d.rank :: d.world])} of {n} sites"

    def check(self) -> dict:
        a, b = self.maps["one"].effect, self.maps["all"].effect
        return {
            "blocks": len(self.maps["one"].rows),
            "identical_effects": bool(np.array_equal(a, b)),
            "max_abs_difference": float(np.nanmax(np.abs(a - b))),
            "finite": bool(np.isfinite(b).all()),
        }

    def cleanup(self) -> None:
        self.maps = {}

    def describe(self) -> str:
        s = self.settings
        n = len(self.sel.double_blocks) + len(self.sel.single_blocks)
        return f"{s['size']}², {s['steps']} steps, batch {s['batch']}, {n} blocks x every step"


CLASSES = {"sweep": SweepPart, "harvest": HarvestPart, "causal": CausalPart}


def part_markdown(row: dict) -> str:
    lines = [
        f"# scaling: {row['part']}",
        "",
        f"{row['device'].get('gpu') or 'CPU'} x {row['gpus']}, {row['model']}, {row['setting']}, "
        f"torch {row['device']['torch']}, {row['device']['date']}",
        "",
        markdown_table([row], ["gpus", UNITS[row["part"]], "one_gpu_s", "all_gpus_s", "rate_one",
                               "rate_all", "rate_unit", "speedup", "efficiency", "target"]),
        "",
        f"check: {json.dumps(row['check'])}",
        f"pipeline load (s) per process: {row['load_s']}",
        *[f"- rank {k}: {r}" for k, r in enumerate(row["ranks"])],
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def summary(out: Path) -> str:
    """scaling.json / scaling.md from every `scaling_<part>.json` in `out`."""
    rows = {}
    for name in PARTS:
        path = out / f"scaling_{name}.json"
        if path.is_file():
            rows[name] = json.loads(path.read_text())
    table = []
    for name in PARTS:
        r = rows.get(name)
        if r is None:
            table.append({"part": name, "result": "not run here (or stopped by its time cap)"})
            continue
        target = r.get("target")
        met = None if target is None else ("yes" if r["speedup"] >= target else "no")
        table.append({
            "part": name, "model": r["model"], "setting": r["setting"], "GPUs": r["gpus"],
            "work": f"{r[UNITS[name]]} {UNITS[name]}",
            "one GPU": f"{r['rate_one']:.3g} {r['rate_unit']}",
            "all GPUs": f"{r['rate_all']:.3g} {r['rate_unit']}",
            "speed-up": f"{r['speedup']:.2f}x", "efficiency": f"{r['efficiency']:.0%}",
            "target": None if target is None else f">= {target}x",
            "met": met, "check": check_text(name, r["check"]),
        })  # fmt: skip
    columns = ["part", "model", "setting", "GPUs", "work", "one GPU", "all GPUs", "speed-up",
               "efficiency", "target", "met", "check", "result"]  # fmt: skip
    columns = [c for c in columns if any(c in t for t in table)]
    md = ["# Scaling on one host", ""]
    any_row = next(iter(rows.values()), None)
    if any_row is not None:
        info = any_row["device"]
        md += [f"{info.get('gpu') or 'CPU'}, torch {info['torch']}, {info['date']}", ""]
    md += [markdown_table(table, columns), ""]
    sweep = rows.get("sweep")
    if sweep is not None:
        n = sweep["gpus"]
        line = (
            f"The paper's {GRID_POINTS:,}-point grid at the sweep's rate: "
            f"{sweep['grid_60000_min_one']:.1f} min on one GPU, {sweep['grid_60000_min_all']:.1f} "
            f"min on {n}"
        )
        if n == GRID_TARGET_GPUS:
            ok = sweep["grid_60000_min_all"] < GRID_TARGET_MIN
            line += (
                f" (target: under {GRID_TARGET_MIN:.0f} min on {n}: {'met' if ok else 'not met'})"
            )
        md += [line + ".", ""]
    md += [
        "Speed-up: one GPU's wall time over all GPUs' for the same work, both in the same launch "
        "(targets: sweep >= 3.7x on 4 GPUs, >= 7.2x on 8; harvest >= 3.6x / >= 7x). "
        "Per-part details: scaling_<part>.md.",
    ]
    text = "\n".join(md) + "\n"
    (out / "scaling.md").write_text(text)
    (out / "scaling.json").write_text(json.dumps({"parts": rows, "table": table}, indent=1))
    return text


def check_text(name: str, check: dict) -> str:
    if name == "harvest":
        ok = check["identical_vectors"] and check["complete"]
        return (
            f"{check['records']} records {'identical' if ok else 'DIFFER'}"
            + ("" if ok else f" (max |diff| {check['max_abs_difference']:.3g})")
            + f"; {check['same_shard_sha256']}/{check['shards']} shards same sha256"
        )
    if name == "causal":
        if check["identical_effects"]:
            return "map identical to one GPU's"
        return f"map differs by up to {check['max_abs_difference']:.3g}"
    return "complete" if check["complete"] and check["same_points"] else "INCOMPLETE"


def launch_env() -> dict:
    """The launch's NCCL / multicast switches and thread count, as the processes saw them."""
    names = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
             "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")  # fmt: skip
    return {k: os.environ.get(k) for k in names}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summary:
        print(summary(out))
        return 0
    dist = Distributed.from_env()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on the CPU", file=sys.stderr)
        return 2
    if dist.world < 2:
        print("launch with several processes: torchrun --nproc_per_node N ...", file=sys.stderr)
        return 2
    device = dist.device("cpu" if args.smoke else "cuda")
    dist.init(device)
    try:
        scratch = None
        if dist.is_main:
            base = Path(args.scratch) if args.scratch else None
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            scratch = tempfile.mkdtemp(prefix="flux_ir_scaling_", dir=base)
        scratch = Path(dist.gather(scratch)[0])
        for name in args.parts:
            settings = (SMOKE if args.smoke else FULL)[name]
            part = CLASSES[name](args, dist, device, scratch, settings)
            row = part.measure(name)
            del part
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if row is not None:
                row.update(device=device_info(), smoke=args.smoke, env=launch_env())
                (out / f"scaling_{name}.json").write_text(json.dumps(row, indent=1, default=str))
                text = part_markdown(row)
                (out / f"scaling_{name}.md").write_text(text)
                print(text, flush=True)
        dist.barrier()
        if dist.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
            print(summary(out))
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
