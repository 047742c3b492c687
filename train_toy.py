"""Train flux-toy (VAE, then transformer and text encoders) on shape scenes, resumably.

    uv run python train_toy.py --out toy_weights                      # one GPU, ~25 minutes
    uv run python train_toy.py --out toy_weights --time_budget_s 590  # stop after ~10 minutes ...
    uv run python train_toy.py --out toy_weights --resume             # ... and go on from there
    uv run python train_toy.py --out /tmp/toy --smoke                 # CPU check, seconds

Learning rates follow the step count, so a run split by --time_budget_s and --resume follows the same
schedule as one uninterrupted run. Copy the four .safetensors files and toy.json to
flux_ir/models/toy_weights/ to ship them, or point $FLUX_IR_TOY_WEIGHTS at --out.
"""

import sys

from flux_ir.cli import run_fire
from flux_ir.toy.cli import train

if __name__ == "__main__":
    sys.exit(run_fire(train, name="train_toy.py"))
