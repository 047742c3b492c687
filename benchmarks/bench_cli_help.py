"""How fast the command lines answer help and argument errors: whole processes, start to exit.

    uv run python benchmarks/bench_cli_help.py --out results/            # median of 5 runs each
    uv run python benchmarks/bench_cli_help.py --repeats 11 --out results/
    uv run python benchmarks/bench_cli_help.py --smoke --out /tmp/bench  # one run each

What is measured: each command is started as a new process, as a user starts it (the `flux-ir`
console script of this environment, `python capture_sample.py ...`; without `uv run`'s own start),
one warm-up run and then `--repeats` timed runs; the table gives the median and the range of the
wall-clock seconds from start to exit. `python -c pass` is the floor: the interpreter's own start.
`flux-ir --help` and `capture_sample.py -h` render help from the command's signature and docstring
without importing torch; an unknown flag is refused the same way. `capture_sample.py --width 100`
is refused by the library's settings (`--width must be a positive multiple of 16`), which import
torch and diffusers to validate: it is the cost of a one-line error that needs the library.
`heavy imports` says which of torch, diffusers and transformers the process imported (from one
extra run under `python -X importtime`).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, parser, write_results

NOTE = __doc__.split("What is measured:")[1]
HEAVY = ("torch", "diffusers", "transformers")


def flux_ir_command() -> list[str]:
    """The `flux-ir` console script beside this interpreter, else the same entry point via -c."""
    script = Path(sys.executable).with_name("flux-ir")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flux_ir.cli import entry; entry()"]


def cases() -> list[tuple[str, list[str], int]]:
    """(label, argv, expected exit code)."""
    py = sys.executable
    return [
        ("python -c pass (interpreter start)", [py, "-c", "pass"], 0),
        ("flux-ir --help", [*flux_ir_command(), "--help"], 0),
        ("capture_sample.py -h", [py, "capture_sample.py", "-h"], 0),
        (
            "capture_sample.py --num_step 1 (unknown flag)",
            [py, "capture_sample.py", "--num_step", "1"],
            2,
        ),
        (
            "capture_sample.py --width 100 (library's error)",
            [py, "capture_sample.py", "--width", "100"],
            2,
        ),
    ]


def run_once(argv: list[str], expected: int, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != expected:
        raise SystemExit(
            f"{' '.join(argv)} exited {proc.returncode}, expected {expected}:\n{proc.stderr[-2000:]}"
        )
    first = (proc.stdout if expected == 0 else proc.stderr).strip().splitlines()
    return seconds, first[-1] if expected else (first[0] if first else "")


def heavy_imports(argv: list[str], env: dict) -> str:
    """Which heavy packages the command imports (one run under -X importtime)."""
    if argv[0] != sys.executable:  # the console script: run its entry point under the same python
        argv = [
            sys.executable,
            "-c",
            "import sys; from flux_ir.cli import entry; entry()",
            *argv[1:],
        ]
    proc = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    found = [m for m in HEAVY if m in names]
    return ", ".join(found) if found else "none"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per command (median)")
    args = p.parse_args()
    repeats = 1 if args.smoke else args.repeats
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    for label, argv, expected in cases():
        run_once(argv, expected, env)  # warm-up: the file cache, .pyc files
        times, said = [], ""
        for _ in range(repeats):
            seconds, said = run_once(argv, expected, env)
            times.append(seconds)
        rows.append(
            {
                "command": label,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "runs": repeats,
                "exit": expected,
                "heavy imports": heavy_imports(argv, env),
                "output": said[:90],
                "times_s": times,
            }
        )
        print(f"{label}: median {rows[-1]['median_s']:.3f} s over {repeats}", flush=True)
    result = {"rows": rows, "repeats": repeats, "warmup": 1, "smoke": args.smoke}
    columns = ["command", "median_s", "min_s", "max_s", "runs", "heavy imports", "output"]
    print(write_results(args.out, "cli_help", result, rows, columns, NOTE))


if __name__ == "__main__":
    main()
