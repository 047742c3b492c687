"""The scaling benchmark: its summary against the targets, and its CPU smoke run (2 gloo ranks) of
every part through run_scaling.sh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def part_row(part: str, gpus: int, one: float, many: float, units: int, check: dict) -> dict:
    unit = "sites" if part == "causal" else "images"
    row = {
        "part": part, "model": "m", "setting": "s", "gpus": gpus, unit: units,
        "one_gpu_s": one, "all_gpus_s": many, "rate_one": units / one, "rate_all": units / many,
        "rate_unit": f"{unit}/s", "speedup": one / many, "efficiency": one / many / gpus,
        "target": {"sweep": {8: 7.2}, "harvest": {8: 7.0}}.get(part, {}).get(gpus),
        "check": check, "device": {"gpu": "NVIDIA H200", "torch": "2", "date": "today"},
    }  # fmt: skip
    if part == "sweep":
        row["grid_60000_min_one"] = 60000 / row["rate_one"] / 60
        row["grid_60000_min_all"] = 60000 / row["rate_all"] / 60
    return row


def test_the_summary_compares_each_part_with_its_target(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_scaling

    sweep = part_row("sweep", 8, 100.0, 13.0, 640, {"complete": True, "same_points": True})
    harvest = part_row(
        "harvest", 8, 100.0, 16.0, 512,
        {"complete": True, "records": 2048, "identical_vectors": False,
         "max_abs_difference": 0.5, "same_shard_sha256": 120, "shards": 128},
    )  # fmt: skip
    for row in (sweep, harvest):
        (tmp_path / f"scaling_{row['part']}.json").write_text(json.dumps(row))
    text = bench_scaling.summary(tmp_path)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if "|" in line}
    assert "7.69x" in lines["sweep"] and "| >= 7.2x | yes |" in lines["sweep"]
    assert "6.25x" in lines["harvest"] and "| >= 7.0x | no |" in lines["harvest"]
    assert "2048 records DIFFER (max |diff| 0.5); 120/128 shards same sha256" in lines["harvest"]
    assert "not run here" in lines["causal"]
    # 640 points in 13 s on 8 GPUs: 60,000 in 20.3 minutes, under the 25 of the target
    assert "20.3 min on 8 (target: under 25 min on 8: met)" in text
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert set(saved["parts"]) == {"sweep", "harvest"} and len(saved["table"]) == 3
    sys.modules.pop("bench_scaling", None)


@pytest.mark.slow
def test_the_smoke_run_measures_every_part_on_two_ranks(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = [str(ROOT / "benchmarks" / "run_scaling.sh"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {p: json.loads((tmp_path / f"scaling_{p}.json").read_text()) for p in
            ("sweep", "harvest", "causal")}  # fmt: skip
    assert all(r["env"]["NCCL_NVLS_ENABLE"] == "0" for r in rows.values())  # set by the script
    assert all(r["gpus"] == 2 and r["one_gpu_s"] > 0 and r["all_gpus_s"] > 0 for r in rows.values())
    # two rounds of 2 ranks x batch 2, shared out evenly
    assert rows["sweep"]["images"] == 8 and rows["sweep"]["check"]["complete"]
    assert [r.split(": ", 1)[1] for r in rows["sweep"]["ranks"]] == ["4 points", "4 points"]
    check = rows["harvest"]["check"]  # the two-rank dataset equals the one-rank dataset
    assert check["identical_vectors"] and check["records"] == 8 * 2  # images x steps
    assert check["same_shard_sha256"] == check["shards"] == 4
    assert rows["causal"]["check"]["identical_effects"] and rows["causal"]["sites"] == 8
    assert [r.split(": ", 1)[1] for r in rows["causal"]["ranks"]] == ["4 of 8 sites"] * 2
    summary = (tmp_path / "scaling.md").read_text()
    assert summary in proc.stdout and "map identical to one GPU's" in summary
    assert "60,000-point grid" in summary
    log = (tmp_path / "scaling.log").read_text()
    assert "sweep,harvest,causal on 2 processes: exit 0" in log
