"""The benchmark scripts run end to end in their CPU smoke mode (numbers meaningless)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script, name, key", [("bench_stream", "stream_store", "rss_above_model_GB")]
)
def test_smoke_mode_writes_json_and_table(script, name, key, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = [script, "--smoke", "--out", str(tmp_path / "out"), "--scratch", str(scratch)]
    monkeypatch.setattr(sys, "argv", argv)
    module = __import__(script)
    module.main()
    result = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    assert key in result and result["device"]["torch"]
    assert "|" in (tmp_path / "out" / f"{name}.md").read_text()
    assert not list(scratch.iterdir())  # the shards were deleted


def test_hook_path_smoke_reports_every_copier(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", ["bench_hook_path", "--smoke", "--out", str(tmp_path)])
    __import__("bench_hook_path").main()
    rows = json.loads((tmp_path / "hook_path.json").read_text())["rows"]
    names = [r["copier"] for r in rows]
    assert names == ["null", "sync", "async_pinned", "async_pageable"]
    assert all(r["us_per_hook"] > 0 for r in rows)


@pytest.mark.slow
def test_toy_fisher_smoke_writes_contrasts_geodesics_and_the_picture(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = __import__("toy_fisher")
    summary = module.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "toy_fisher.json").read_text())
    assert {r["classes"] for r in result["contrast"]} == {"scene", "shape", "colour", "background"}
    assert all(r["deviation"] >= 0 for r in result["geodesics"])
    assert (tmp_path / "toy_fisher.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["resolution"] == 6
