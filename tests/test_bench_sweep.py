"""The sweep benchmark's CPU smoke mode writes its JSON and markdown table."""

import json
import sys
from pathlib import Path

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
