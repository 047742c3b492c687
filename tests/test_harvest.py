"""Activation datasets: prompt files, the plan, exact vectors, resuming after a kill, loading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import flux_ir.workflows.harvest as harvest_mod
from flux_ir.capture import CaptureOptions, Selection, run_capture
from flux_ir.cli import main
from flux_ir.errors import InvalidArgumentError
from flux_ir.models import resolve_model
from flux_ir.store.dataset import TokenDataset, TokenStream, open_dataset
from flux_ir.workflows.harvest import (
    HarvestOptions,
    check_disk,
    pipeline_architecture,
    plan_harvest,
    read_prompts,
    run_harvest,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(width=32, height=32, num_steps=2)  # flux-tiny: 4 image tokens, T5 length 32
SPEC = resolve_model("flux-tiny")


def prompt_file(tmp_path, lines=("a cat", "a dog", "a red car")) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(["# a comment", *lines, ""]))
    return path


def test_prompt_files_in_three_formats(tmp_path):
    txt = read_prompts(prompt_file(tmp_path), SPEC, seeds_per_prompt=2, first_seed=10)
    assert [e.sampling.prompt for e in txt] == ["a cat", "a dog", "a red car"]
    assert [e.seeds for e in txt] == [(10, 11), (12, 13), (14, 15)]
    csv = tmp_path / "p.csv"
    csv.write_text(
        'prompt,seeds,num_steps,negative_prompt\n"a cat, sitting",1;2,3,\na dog,,,blurry\n'
    )
    entries = read_prompts(csv, SPEC, seeds=(7,), width=32, height=32)
    assert entries[0].sampling.prompt == "a cat, sitting" and entries[0].seeds == (1, 2)
    assert entries[0].sampling.num_steps == 3 and entries[1].seeds == (7,)
    assert entries[1].sampling.negative_prompt == "blurry" and entries[1].sampling.width == 32
    notes = tmp_path / "notes.yaml"  # the sampling notes' layout, with its own key names
    notes.write_text(
        "sample:\n  sampler: euler\n  sample_every: 50\n  sample_steps: 3\n  guidance_scale: 2.5\n"
        "  width: 64\n  height: 32\n  prompts:\n    - a mountain\n"
        "    - {prompt: a city, seeds: [4, 5], scheduler: unipc, sample_steps: 2}\n"
    )
    a, b = read_prompts(notes, SPEC)
    assert (a.sampling.num_steps, a.sampling.guidance, a.sampling.width, a.seeds) == (
        3,
        2.5,
        64,
        (0,),
    )
    assert (b.sampling.scheduler, b.sampling.num_steps, b.seeds) == ("unipc", 2, (4, 5))


def test_prompt_files_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {prompt: a cat, colour: red}\n")
    with pytest.raises(InvalidArgumentError, match="bad.yaml entry 1: unknown field.*colour"):
        read_prompts(bad, SPEC)
    bad.write_text("- {seed: 3}\n")
    with pytest.raises(InvalidArgumentError, match="entry 1 has no prompt"):
        read_prompts(bad, SPEC)
    bad.write_text("- {prompt: a cat, width: 100}\n")
    with pytest.raises(InvalidArgumentError, match="width must be a positive multiple of 16"):
        read_prompts(bad, SPEC)
    with pytest.raises(InvalidArgumentError, match="prompts .* is not a file"):
        read_prompts(tmp_path / "missing.txt", SPEC)


def test_the_plan_sizes_the_files_and_the_disk_check_refuses(tiny, tmp_path, monkeypatch):
    pipe, _ = tiny
    entries = read_prompts(prompt_file(tmp_path), SPEC, seeds_per_prompt=2, **SMALL)
    opts = HarvestOptions(Selection.parse("0", "-1", streams="both"), tokens_per_image=3)
    plan = plan_harvest(entries, opts, pipeline_architecture(pipe), "float32")
    # 6 images x 2 steps x 2 blocks x (3 image + 32 text tokens)
    assert plan.vectors == 6 * 2 * 2 * (3 + 32) and plan.nbytes == plan.vectors * (32 * 4 + 4)
    assert "6 images (3 prompts), 840 vectors of 32 x float32" in plan.describe()

    class Usage:
        free = plan.nbytes  # less than the size and its margin

    monkeypatch.setattr(harvest_mod.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(
        InvalidArgumentError, match="^output_dir .*needs 108.3 KiB but the disk holds"
    ):
        check_disk(tmp_path / "new" / "dir", plan.nbytes)
    with pytest.raises(InvalidArgumentError, match="tokens_per_image 5 exceeds the 4 image tokens"):
        plan_harvest(
            entries, HarvestOptions(tokens_per_image=5), pipeline_architecture(pipe), "float32"
        )


def test_vectors_are_the_captured_activations(tiny, tmp_path):
    """batch_size 1: each image alone, as a capture makes it (bitwise equal)."""
    pipe, spec = tiny
    entries = read_prompts(prompt_file(tmp_path, ["a cat", "a dog"]), SPEC, **SMALL)
    sel = Selection.parse("none", "1,-1", streams="both")
    opts = HarvestOptions(sel, tokens_per_image=3, token_seed=5, batch_size=1)
    run_harvest(pipe, entries, tmp_path / "ds", opts, model_name=spec.name, progress=False)
    ds = open_dataset(tmp_path / "ds")
    assert ds.complete and len(ds.index) == 2 * 2 * 2 * 2  # images x steps x blocks x streams
    for entry, item in zip(entries, (0, 1)):
        _, cap = run_capture(pipe, CaptureOptions(entry.sampling, seed=entry.seeds[0]))
        rows = ds.index[ds.index["item"] == item]
        positions = None
        for r in rows.itertuples(index=False):
            vectors = ds.activations(r.shard)[r.offset : r.offset + r.count]
            tokens = ds.tokens(r.shard)[r.offset : r.offset + r.count].long()
            get = cap.image_tokens if r.stream == "img" else cap.text_tokens
            expected = get(r.kind, r.block, r.step)[0, tokens]
            assert torch.equal(vectors, expected)
            if r.stream == "img":  # the same positions at every step and block, sorted
                assert positions is None or torch.equal(positions, tokens)
                positions = tokens
                assert tokens.tolist() == sorted(tokens.tolist()) and len(set(tokens.tolist())) == 3
            else:
                assert tokens.tolist() == list(range(32))
        assert r.prompt == entry.sampling.prompt and r.seed == entry.seeds[0]


def _flaky_generate(monkeypatch, calls_before_failure):
    real, calls = harvest_mod.generate, {"n": 0}

    def generate(*args, **kwargs):
        if calls["n"] == calls_before_failure:
            raise KeyboardInterrupt  # as a kill in the middle of the run
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(harvest_mod, "generate", generate)


def test_a_killed_harvest_resumes_without_loss_or_duplicates(tiny, tmp_path, monkeypatch):
    pipe, spec = tiny
    entries = read_prompts(prompt_file(tmp_path), SPEC, seeds_per_prompt=2, **SMALL)
    opts = HarvestOptions(
        Selection.parse("none", "-1"), batch_size=2, shard_mb=1e-6
    )  # 1 batch/shard
    whole = tmp_path / "whole"
    run_harvest(pipe, entries, whole, opts, model_name=spec.name, progress=False)
    killed = tmp_path / "killed"
    _flaky_generate(monkeypatch, 2)  # two batches done, the third fails
    with pytest.raises(KeyboardInterrupt):
        run_harvest(pipe, entries, killed, opts, model_name=spec.name, progress=False)
    monkeypatch.undo()
    half = open_dataset(killed)
    assert sorted(set(half.index["shard"])) == [
        "shard-000000.safetensors",
        "shard-000001.safetensors",
    ]
    assert not half.complete and half.index["item"].nunique() == 4
    assert not any(
        p.name.startswith(".") for p in (killed / "shards").iterdir()
    )  # no partial shard
    result = run_harvest(pipe, entries, killed, opts, model_name=spec.name, progress=False)
    assert (result.skipped, result.generated, result.images) == (2, 1, 2)
    a, b = open_dataset(whole), open_dataset(killed)
    assert b.complete and a.index.equals(b.index)
    assert not b.index.duplicated(["item", "step", "kind", "block", "stream", "pass"]).any()
    for shard in sorted(set(a.index["shard"])):
        assert torch.equal(a.activations(shard), b.activations(shard))
    assert b.verify() == 3
    with pytest.raises(InvalidArgumentError, match="holds a different harvest .*tokens_per_image"):
        run_harvest(
            pipe,
            entries,
            killed,
            HarvestOptions(opts.selection, 2, batch_size=2, shard_mb=1e-6),
            model_name=spec.name,
            progress=False,
        )


def test_datasets_read_lazily(tiny, tmp_path):
    pipe, spec = tiny
    entries = read_prompts(prompt_file(tmp_path), SPEC, seeds_per_prompt=2, **SMALL)
    opts = HarvestOptions(Selection.parse("0", "-1"), batch_size=4, shard_mb=1e-6)
    run_harvest(pipe, entries, tmp_path / "ds", opts, model_name=spec.name, progress=False)
    index = pd.read_csv(tmp_path / "ds" / "index.csv")
    assert list(index.columns[:9]) == [
        "prompt", "seed", "step", "kind", "block", "stream", "pass", "shard", "offset"
    ]  # fmt: skip
    data = TokenDataset(tmp_path / "ds", block="single.3", step=1)
    assert len(data) == 6 * 4 and data[0].shape == (32,) and data[0].dtype == torch.float32
    batch = data.__getitems__([5, 0, 23, 5])
    assert all(torch.equal(x, data[i]) for x, i in zip(batch, [5, 0, 23, 5]))
    info = data.item_info(23)
    assert (info["prompt"], info["seed"], info["step"], info["block"], info["token"]) == (
        "a red car",
        5,
        1,
        3,
        3,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=7, shuffle=True)
    assert sum(b.shape[0] for b in loader) == 24
    every = torch.stack([data[i] for i in range(len(data))])
    streamed = torch.cat(list(TokenStream(tmp_path / "ds", "single.3", 1, batch_size=5, seed=3)))
    assert streamed.shape == every.shape and not torch.equal(streamed, every)  # shuffled
    assert torch.equal(streamed.sort(0).values, every.sort(0).values)  # each vector once
    parts = [list(TokenStream(tmp_path / "ds", "single.3", 1, rank=r, world=2)) for r in (0, 1)]
    assert len(parts[0]) + len(parts[1]) == 24 and parts[0] and parts[1]


def test_the_command_line_harvests_and_refuses(tmp_path, capsys):
    prompts = prompt_file(tmp_path, ["a cat"])
    out = tmp_path / "cli"
    base = ["harvest", str(prompts), "--model", "flux-tiny", "--output_dir", str(out)]
    base += ["--width", "32", "--height", "32", "--num_steps", "2", "--progress=False"]
    assert main([*base, "--seeds", "3,4", "--single_blocks", "-1", "--tokens_per_image", "2"]) == 0
    text = capsys.readouterr().out
    assert "harvest: 2 images (1 prompts), 8 vectors of 32 x float32" in text
    manifest = json.loads((out / "harvest.json").read_text())
    assert manifest["complete"] and manifest["entries"][0]["seeds"] == [3, 4]
    assert manifest["identity"]["single_blocks"] == [-1]
    assert main([*base, "--seeds", "3,4", "--single_blocks", "-1"]) == 2
    assert "holds a different harvest (differs in: tokens_per_image)" in capsys.readouterr().err
    assert main([*base, "--scheduler", "heun"]) == 2
    assert "--scheduler 'heun' is not offered: diffusers' FlowMatchHeun" in capsys.readouterr().err
    assert main([*base, "--passes", "all"]) == 2
    assert "--passes 'all': choose one of cond, both" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_share_the_shards(tiny, tmp_path):
    prompts = prompt_file(tmp_path, ["a cat", "a dog", "a red car", "a bird"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--no-python", str(Path(sys.executable).with_name("flux-ir")), "harvest", str(prompts), "--model", "flux-tiny", "--width", "32",
        "--height", "32", "--num_steps", "2", "--single_blocks", "-1", "--batch_size", "1",
        "--shard_mb", "0.000001", "--output_dir", str(out), "--progress=False",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = open_dataset(out)
    assert two.complete and two.manifest["processes"] == 2
    pipe, spec = tiny
    entries = read_prompts(prompts, SPEC, **SMALL)
    sel = Selection.parse("none", "-1", streams="img")  # the command line's default streams
    opts = HarvestOptions(sel, batch_size=1, shard_mb=1e-6)
    run_harvest(pipe, entries, tmp_path / "one", opts, model_name=spec.name, progress=False)
    one = open_dataset(tmp_path / "one")
    assert one.index.equals(two.index)
    for shard in sorted(set(one.index["shard"])):
        assert torch.equal(one.activations(shard), two.activations(shard))
    assert np.array_equal(
        one.tokens("shard-000003.safetensors"), two.tokens("shard-000003.safetensors")
    )


@pytest.mark.slow
def test_the_benchmark_runs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_harvest

    result = bench_harvest.main(["--smoke", "--out", str(tmp_path / "out")])
    assert [r["call"] for r in result["rows"]] == ["first", "later"]
    # 4 images x 2 steps x 4 image tokens x 32 float32: the activations, then tokens and records
    assert all(r["GB_written"] * 1e9 > 4 * 2 * 4 * 32 * 4 for r in result["rows"])
    assert json.loads((tmp_path / "out" / "harvest.json").read_text())["target_ratio"] == 0.9
    assert "| first |" in (tmp_path / "out" / "harvest.md").read_text()
