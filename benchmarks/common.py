"""Shared helpers of the capture benchmarks: arguments, timing, memory readings, result files.

Every benchmark writes `<name>.json` and `<name>.md` to `--out` (default `$OUT`, else
`benchmarks/results/`) and prints its table. `--smoke` runs a seconds-long version on the CPU with
flux-tiny, to check the script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flux_ir.sampling import PromptEmbeddings, SamplingOptions, generate  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    default_out = os.environ.get("OUT") or str(ROOT / "benchmarks" / "results")
    p.add_argument("--out", default=default_out, help="directory for the JSON and markdown results")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that only checks the script")
    return p


def device_info() -> dict:
    info = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import diffusers
        import transformers

        info.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_GB=round(p.total_memory / 1e9, 1))
    else:
        info.update(gpu=None)
    return info


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3, warmup: int = 1) -> dict:
    """Median and all wall-clock seconds of `fn()` (device synchronised before and after)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": sorted(times)[len(times) // 2], "times_s": times}


# -- host memory (no psutil needed) ---------------------------------------------------------------
def proc_status(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes; 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples VmRSS every `interval` s in a thread; `peak` is the highest reading."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, proc_status("VmRSS"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, proc_status("VmRSS"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status("VmRSS"))


# -- results --------------------------------------------------------------------------------------
def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    out: str | Path, name: str, result: dict, rows: list[dict], columns: list[str], note: str
) -> str:
    """Write `<name>.json` (everything) and `<name>.md` (note + table); return the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = result.setdefault("device", device_info())
    table = markdown_table(rows, columns)
    where = f"{info.get('gpu') or 'CPU'}, torch {info['torch']}, {info['date']}"
    md = f"# {name}\n\n{where}\n\n{note.strip()}\n\n{table}\n"
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out / f"{name}.json")
    (out / f"{name}.md").write_text(md)
    return table


def pipeline(model: str, smoke: bool):
    """(pipe, spec): flux-tiny on the CPU for smoke runs, else `model` with random bf16 weights on CUDA."""
    from flux_ir.models import load_pipeline

    if smoke:
        return load_pipeline("flux-tiny", device="cpu")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs CUDA (or pass --smoke)")
    torch.backends.cuda.matmul.allow_tf32 = True
    return load_pipeline(model, device="cuda", dtype=torch.bfloat16, weights="random")


def sampling_options(size: int, steps: int, max_sequence_length: int) -> SamplingOptions:
    """The benchmarks' generation: "a photo of a cat", `size`² pixels, `steps` steps, no true CFG
    (guidance 3.5 where the model has a guidance embedding: `generate`'s default)."""
    return SamplingOptions(
        prompt="a photo of a cat",
        width=size,
        height=size,
        num_steps=steps,
        max_sequence_length=max_sequence_length,
    )


def generate_latents(pipe, opts: SamplingOptions, embeddings: PromptEmbeddings, batch: int = 1):
    """One seeded generation of `batch` images from precomputed prompt embeddings to packed
    latents (no text encoders, no VAE)."""
    return generate(
        pipe, opts, seed=0, embeddings=embeddings, num_images=batch, output_type="latent"
    )
