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


# -- device memory as a user sees it --------------------------------------------------------------
def gb(n: float | None) -> float | None:
    return None if n is None else n / 1e9


class DeviceMemory:
    """Peak device memory in use as `nvidia-smi` shows it (total minus free, from
    `torch.cuda.mem_get_info`: the CUDA context, what the caching allocator holds, and any other
    process on the device), sampled every `interval` s by a thread once CUDA is initialised, beside
    the allocator's own peaks (`max_memory_allocated`, `max_memory_reserved`, reset on entry).
    `result()`: GB; `context_GB`: in use beyond the allocator's reservation when sampling began."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_used, self.context, self.peaks = interval, 0, None, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cuda = torch.cuda.is_available()

    def _sample(self) -> None:
        free, total = torch.cuda.mem_get_info()
        used = total - free
        if self.context is None:
            self.context = used - torch.cuda.memory_reserved()
        self.peak_used = max(self.peak_used, used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if torch.cuda.is_initialized():
                self._sample()

    def __enter__(self) -> DeviceMemory:
        if self._cuda:
            if torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.peaks = {}
        if self._cuda:
            self._stop.set()
            self._thread.join()
            if torch.cuda.is_initialized():
                self._sample()
                self.peaks = {
                    "peak_device_used_GB": gb(self.peak_used),
                    "peak_reserved_GB": gb(torch.cuda.max_memory_reserved()),
                    "peak_allocated_GB": gb(torch.cuda.max_memory_allocated()),
                    "context_GB": gb(self.context),
                }

    def result(self) -> dict:
        """The peaks (GB) over the block (empty without CUDA)."""
        return dict(self.peaks)


class NvidiaSmi:
    """`nvidia-smi --query-gpu=memory.used -lms 100` in a subprocess while the block runs: the peak
    memory in use on the first visible GPU as nvidia-smi itself shows it (`peak_GB`; None where
    nvidia-smi is missing)."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms, self.proc, self.peak_GB = interval_ms, None, None

    def __enter__(self) -> NvidiaSmi:
        import shutil
        import subprocess

        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        cmd = [exe, f"--id={gpu}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        self.proc = subprocess.Popen(
            [*cmd, f"-lms={self.interval_ms}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        mib = [int(x) for x in out.split() if x.strip().isdigit()]
        self.peak_GB = max(mib) * 2**20 / 1e9 if mib else None


# -- the command line, timed phase by phase ---------------------------------------------------------
def timed_command(command, argv: list[str], name: str, timing_out: str | Path) -> int:
    """Run a command-line function (`flux_ir.cli.capture.capture`, ...) with `argv` in this process
    exactly as its script does (`run_fire`), and write `timing_out` (JSON): the epoch seconds at
    which phases began and ended (`load`: load_pipeline; `first_step`: the transformer's first call;
    `capture`: run_capture, the capture in host memory; `save`: save_capture, the .pt file written
    and fsync'ed; `end`), the exit code and the device memory peaks (`DeviceMemory`). Only
    module attributes are wrapped: the command's own code runs unchanged."""
    import flux_ir.models as models
    import flux_ir.workflows.capture_run as capture_run
    from flux_ir.cli import run_fire

    marks: dict[str, float] = {"start": time.time()}

    def wrap(module, attr: str, key: str, after=None):
        fn = getattr(module, attr)

        def wrapper(*args, **kwargs):
            marks.setdefault(f"{key}_begin", time.time())
            out = fn(*args, **kwargs)
            sync()
            marks[f"{key}_end"] = time.time()
            if after is not None:
                after(out)
            return out

        setattr(module, attr, wrapper)

    def first_step(loaded) -> None:
        pipe = loaded[0]

        def hook(module, args, kwargs):
            marks.setdefault("first_step", time.time())

        pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)

    wrap(models, "load_pipeline", "load", first_step)
    wrap(capture_run, "run_capture", "capture")
    wrap(capture_run, "save_capture", "save")
    with DeviceMemory() as mem:
        rc = run_fire(command, argv, name)
    marks["end"] = time.time()
    Path(timing_out).write_text(json.dumps({"marks": marks, "rc": rc, **mem.result()}))
    return rc


def disk_write_GBps(directory: str | Path, nbytes: int, block: int = 64 << 20) -> float:
    """The disk's own sequential write speed in `directory`: `nbytes` of random bytes written in
    `block`-sized writes and fsync'ed (GB/s; the file is deleted)."""
    path = Path(directory) / f".disk_speed_{os.getpid()}.bin"
    data = os.urandom(block)  # not zeros: a compressing filesystem would not write them
    t0 = time.perf_counter()
    try:
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                f.write(data[: min(block, left)])
                left -= block
            f.flush()
            os.fsync(f.fileno())
        return nbytes / (time.perf_counter() - t0) / 1e9
    finally:
        path.unlink(missing_ok=True)
