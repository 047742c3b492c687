"""The causal map over several processes: each process patches whole batches of sites, and the
gathered map equals a one-process map exactly (effects, readings, thumbnails, files)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flux_ir.capture import Selection
from flux_ir.cli import main
from flux_ir.sweep.shard import Distributed
from flux_ir.workflows.patching import causal_map

from .conftest import small_opts

ROOT = Path(__file__).resolve().parents[1]


def test_each_process_patches_whole_batches_and_together_they_make_the_map(tiny):
    pipe, _ = tiny
    target, source = small_opts(prompt="a red circle"), small_opts(prompt="a green square", seed=5)
    sel = Selection(double_blocks=(0,), single_blocks=(0, -1), steps=(1, 3))  # 6 sites
    kw = dict(selection=sel, batch_size=2, progress=False, thumb=8)

    def brightness(images):  # a classifier: one integer reading per image
        return {"bright": (images.mean((1, 2, 3)) * 1000).long()}

    one = causal_map(pipe, target, source, classify=brightness, **kw)
    # no process group: each "process" keeps only its own batches (every 3rd batch of 2 sites)
    parts = [
        causal_map(pipe, target, source, classify=brightness, dist=Distributed(r, 3), **kw)
        for r in range(3)
    ]
    sites = np.arange(6).reshape(3, 2)  # site number, rows x steps
    for r, part in enumerate(parts):
        done = ~np.isnan(part.effect)
        assert set(sites[done] // 2) == {r}  # batch r alone
        assert np.array_equal(part.effect[done], one.effect[done])
        assert np.array_equal(part.readings["bright"][done], one.readings["bright"][done])
        assert np.array_equal(part.thumbs[done], one.thumbs[done])
        assert (part.readings["bright"][~done] == -1).all()
    assert np.isfinite(one.effect).all() and (one.readings["bright"] >= 0).all()


@pytest.mark.slow
def test_flux_ir_patch_under_torchrun_writes_the_one_process_map(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    flux_ir = str(Path(sys.executable).with_name("flux-ir"))
    args = [
        "patch", "a green square", "--model", "flux-tiny", "--prompt", "a red circle",
        "--width", "32", "--height", "32", "--num_steps", "3", "--double_blocks", "0",
        "--single_blocks", "0,-1", "--steps", "0,2", "--batch_size", "4", "--progress=False",
    ]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cmd = [*launch, "2", "--no-python", flux_ir, *args, "--output_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("CausalMap(3 blocks x 2 steps") == 1  # printed by rank 0 alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' one thread each: the same kernels
    try:
        assert main([*args, "--output_dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    summary = json.loads((two / "causal_map.json").read_text())
    assert np.isfinite(summary["effect"]).all()  # 6 sites in batches of 4 and 2, one per rank
    for name in ("causal_map.json", "causal_map.csv", "causal_grid.png", "causal_map.png"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
