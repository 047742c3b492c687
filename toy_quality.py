"""Measure flux-toy's quality bars and print them as a table (JSON and markdown into --out).

uv run python toy_quality.py                                  # shipped weights, on the CPU
uv run python toy_quality.py --weights toy_weights --device cuda --out results/
"""

import sys

from flux_ir.cli import run_fire
from flux_ir.toy.cli import quality

if __name__ == "__main__":
    sys.exit(run_fire(quality, name="toy_quality.py"))
