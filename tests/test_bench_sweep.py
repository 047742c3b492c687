"""The sweep benchmark's CPU smoke mode writes its JSON and markdown table."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_benchmark_writes_json_and_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_sweep

    args = [
        "--smoke",
        "--size",
        "32",
        "--batch_sizes",
        "1,2",
        "--batches",
        "1",
        "--step_repeats",
        "1",
    ]
    assert bench_sweep.main([*args, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_sweep_batch_smoke.json").read_text())
    assert [r["batch_size"] for r in result["rows"]] == [1, 2]
    assert all(r["images_per_s"] > 0 and r["bound_images_per_s"] > 0 for r in result["rows"])
    for row in result["rows"]:  # the breakdown accounts for the whole sweep
        shares = row["breakdown"]
        assert set(shares) == {"transformer", "vae_decode", "text_encoding", "writing", "other"}
        assert abs(sum(shares.values()) - 1.0) < 1e-9 and shares["transformer"] > 0
        assert row["bound_with_vae_images_per_s"] < row["bound_images_per_s"]
    table = (tmp_path / "bench_sweep_batch_smoke.md").read_text()
    assert "| 2 |" in table and "sweep / bound" in table and "VAE decode" in table
    sys.modules.pop("bench_sweep", None)


@pytest.mark.slow
def test_scaling_smoke_runs_two_ranks_on_their_own_shards(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "benchmarks/bench_sweep.py", "--smoke", "--scaling", "--size", "32",
        "--scaling_points", "4", "--scaling_batch", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "bench_sweep_scaling_smoke.json").read_text())["rows"][0]
    assert row["processes"] == 2 and row["complete"] and row["one_process_s"] > 0
    assert [r.split(": ")[-1] for r in row["ranks"]] == ["2 points", "2 points"]
