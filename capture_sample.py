"""Capture every FLUX block at every denoising step (the original tool's command line).

uv run python capture_sample.py --model flux-tiny --prompt "a photo of a cat" --seed 1
"""

import sys

from flux_ir.cli import run_fire
from flux_ir.cli.capture import capture

if __name__ == "__main__":
    sys.exit(run_fire(capture, name="capture_sample.py"))
