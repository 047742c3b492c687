"""Generate a latent-grid sweep (same flags as `flux-ir sweep`).

uv run python grid_sweep.py --model flux-tiny --width 64 --height 64 --n_alpha 4 --output_dir output/sweep
"""

import sys

from flux_ir.cli import run_fire
from flux_ir.cli.sweep import sweep

if __name__ == "__main__":
    sys.exit(run_fire(sweep, name="grid_sweep.py"))
