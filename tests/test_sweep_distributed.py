"""Two processes (torchrun, gloo on the CPU) share one sweep and merge its metadata."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flux_ir.models import resolve_model
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep
from tests.test_sweep_generate import assert_same_images, pixels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_write_disjoint_shards_equal_to_one_process(tiny, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "grid_sweep.py", "--model", "flux-tiny", "--width", "32", "--height", "32",
        "--num_steps", "2", "--n_alpha", "2", "--n_beta", "3", "--batch_size", "2",
        "--output_dir", str(out), "--progress=False",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    parts = [pd.read_csv(out / "parts" / f"points.rank{r}.csv") for r in (0, 1)]
    assert sorted(parts[0]["index"]) == [0, 2, 4] and sorted(parts[1]["index"]) == [1, 3, 5]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["complete"] and meta["processes"] == 2 and len(meta["points"]) == 6

    cfg = SweepConfig.from_spec(
        resolve_model("flux-tiny"), width=32, height=32, num_steps=2,
        grid=GridSpec(n_alpha=2, n_beta=3), dtype="float32",
    )  # fmt: skip
    one = tmp_path / "one"
    run_sweep(tiny[0], cfg, one, batch_size=6, progress=False)
    assert meta["sweep"] == json.loads((one / "metadata.json").read_text())["sweep"]  # same sweep
    assert_same_images(pixels(one), pixels(out))
