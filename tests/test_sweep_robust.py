"""Sweeps that resume safely: the weights' identity, promised phase files, claims shared by
independent runs, damaged metadata, Ctrl-C, and seeds that make the same noise."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flux_ir.models.fingerprint as fp_mod
import flux_ir.sweep.run as run_mod
from flux_ir.capture import run_capture
from flux_ir.cli import main
from flux_ir.errors import InvalidArgumentError
from flux_ir.models import load_pipeline, resolve_model, weights_fingerprint
from flux_ir.models.toy import PACKAGE_WEIGHTS, WEIGHTS_ENV
from flux_ir.sweep import GridSpec, SweepConfig, SweepStore, run_sweep
from flux_ir.sweep.store import BUSY, CLAIMED, DONE, ELSEWHERE, HOST, PointClaims

from .conftest import small_opts
from .test_sweep_generate import TransformerCalls, pixels

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / "fixtures" / "legacy"
TINY = ["--model", "flux-tiny", "--width", "32", "--height", "32", "--num_steps", "2"]
HEX16 = re.compile(r"\b[0-9a-f]{16}\b")


def cfg32(**kw) -> SweepConfig:
    """flux-tiny at 32x32, 2 steps, a 2x2 grid, as the command line makes it (dtype recorded)."""
    base = dict(width=32, height=32, num_steps=2, grid=GridSpec(n_alpha=2, n_beta=2))
    base["dtype"] = "float32"
    return SweepConfig.from_spec(resolve_model("flux-tiny"), **{**base, **kw})


def other_weights(pipe):
    """A pipeline of the same model, name and architecture with other weights."""
    other, _ = load_pipeline("flux-tiny", device="cpu")
    with torch.no_grad():
        for p in other.transformer.parameters():
            p.add_(0.01)
    # load_pipeline fingerprinted the weights before the edit: weights edited in place need refresh
    assert weights_fingerprint(other, refresh=True) != weights_fingerprint(pipe)
    return other


def interrupt_on_batch(monkeypatch, n: int) -> None:
    real, calls = run_mod.generate_batch, {"n": 0}

    def generate(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "generate_batch", generate)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_claim(store: SweepStore, stem: str, **owner) -> Path:
    store.claims.mkdir(parents=True, exist_ok=True)
    path = store.claims / f"{stem}.0.claim"
    path.write_text(json.dumps({"host": HOST, "rank": 0, "run": "earlier", **owner}))
    return path


# -- 1. the weights' identity ----------------------------------------------------------------------
def test_the_fingerprint_identifies_the_weights_and_is_cached(tiny, monkeypatch):
    pipe, _ = load_pipeline("flux-tiny", device="cpu")
    first = weights_fingerprint(pipe)
    assert re.fullmatch("[0-9a-f]{16}", first)
    assert weights_fingerprint(tiny[0]) == first  # same weights, another pipeline object
    monkeypatch.setattr(fp_mod, "modules_fingerprint", lambda m: pytest.fail("recomputed"))
    assert weights_fingerprint(pipe) == first  # cached on the pipeline
    monkeypatch.undo()
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] += 1.0  # one value, inside the sample (a whole bias)
    assert weights_fingerprint(pipe, refresh=True) != first
    pipe.to(dtype=torch.bfloat16)  # values as stored: another dtype is other weights
    assert weights_fingerprint(pipe) not in (first, weights_fingerprint(tiny[0]))


def test_resuming_with_other_toy_weights_under_the_same_name_is_refused(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "s"
    args = ["sweep", "--model", "flux-toy", "--prompt", "", "--width", "32", "--height", "32"]
    args += ["--num_steps", "2", "--n_alpha", "2", "--n_beta", "1", "--output_dir", str(out)]
    assert main([*args, "--progress=False"]) == 0
    recorded = json.loads((out / "metadata.json").read_text())["weights_fingerprint"]
    (out / "images" / "a001_b000.png").unlink()

    elsewhere = tmp_path / "toy"  # flux-toy's files, the transformer retrained (here: shifted)
    shutil.copytree(PACKAGE_WEIGHTS, elsewhere)
    from safetensors.torch import load_file, save_file

    weights = load_file(elsewhere / "transformer.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, elsewhere / "transformer.safetensors")
    monkeypatch.setenv(WEIGHTS_ENV, str(elsewhere))
    capsys.readouterr()
    assert main([*args, "--progress=False"]) == 2
    err = capsys.readouterr().err
    assert "was generated with weights" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "--output_dir" in err
    found = HEX16.findall(err)
    assert found[0] == recorded and len(set(found)) == 2  # both fingerprints, named
    assert not (out / "images" / "a001_b000.png").exists()  # nothing of the other model written


def test_other_weights_of_the_same_model_name_are_refused(tiny, tmp_path):
    run_sweep(tiny[0], cfg32(), tmp_path, batch_size=4, progress=False)
    (tmp_path / "images" / "a000_b000.png").unlink()
    other = other_weights(tiny[0])
    with pytest.raises(InvalidArgumentError, match="was generated with weights") as err:
        run_sweep(other, cfg32(), tmp_path, batch_size=4, progress=False)
    assert err.value.param == "output_dir"
    assert weights_fingerprint(tiny[0]) in str(err.value)
    assert weights_fingerprint(other) in str(err.value)


def test_a_legacy_sweep_records_its_fingerprint_and_then_keeps_it(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(LEGACY / "sweep", sweep)
    meta = json.loads((sweep / "metadata.json").read_text())
    assert "weights_fingerprint" not in meta  # written before fingerprints
    cfg = SweepConfig.from_signature(meta["sweep"])
    run_sweep(tiny[0], cfg, sweep, batch_size=4, progress=False)
    after = json.loads((sweep / "metadata.json").read_text())
    assert after["weights_fingerprint"] == weights_fingerprint(tiny[0]) and after["complete"]
    with pytest.raises(InvalidArgumentError, match="was generated with weights"):
        run_sweep(other_weights(tiny[0]), cfg, sweep, batch_size=4, progress=False)


def test_a_capture_records_the_fingerprint_computed_once(monkeypatch):
    calls = []
    real = fp_mod.modules_fingerprint
    monkeypatch.setattr(fp_mod, "modules_fingerprint", lambda m: calls.append(1) or real(m))
    pipe, spec = load_pipeline("flux-tiny", device="cpu")
    assert len(calls) == 1  # at load
    opts = small_opts(seed=0, width=32, height=32, num_steps=1)
    caps = [run_capture(pipe, opts, model_name=spec.name)[1] for _ in range(2)]
    assert caps[0].metadata["weights_fingerprint"] == caps[1].metadata["weights_fingerprint"]
    assert caps[0].metadata["weights_fingerprint"] == weights_fingerprint(pipe)
    assert len(calls) == 1


# -- 2. promised phase files -----------------------------------------------------------------------
def test_a_resume_that_drops_the_phases_is_refused_and_one_with_them_completes(
    tiny, tmp_path, monkeypatch, capsys
):
    interrupt_on_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny[0], cfg32(), tmp_path, batch_size=2, phase_pool=2, progress=False)
    monkeypatch.undo()
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["phase_pool"] == 2 and not meta["complete"]

    args = ["sweep", *TINY, "--n_alpha", "2", "--batch_size", "2", "--output_dir", str(tmp_path)]
    capsys.readouterr()
    assert main([*args, "--progress=False"]) == 2  # without --phases
    err = capsys.readouterr().err
    assert "pass --phases --phase_pool 2" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not json.loads((tmp_path / "metadata.json").read_text())["complete"]

    assert main([*args, "--phases", "--phase_pool", "2", "--progress=False"]) == 0
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["complete"] and len(list((tmp_path / "phases").glob("*.npy"))) == 4


def test_complete_needs_every_promised_phase_file(tiny, tmp_path):
    cfg = cfg32()
    run_sweep(tiny[0], cfg, tmp_path, batch_size=4, phase_pool=1, phase_images=16, progress=False)
    assert json.loads((tmp_path / "metadata.json").read_text())["complete"]
    (tmp_path / "phases" / "a001_b001_s00.png").unlink()
    with pytest.raises(InvalidArgumentError, match="resume with phase_images 16") as err:
        run_sweep(tiny[0], cfg, tmp_path, batch_size=4, phase_pool=1, progress=False)
    assert err.value.param == "phase_images"
    store = SweepStore(tmp_path)
    store.finalise(cfg, run_mod.grid_norms(cfg), {})  # the recorded promise is kept
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert not meta["complete"] and meta["phase_images"] == 16
    result = run_sweep(
        tiny[0], cfg, tmp_path, batch_size=4, phase_pool=1, phase_images=16, progress=False
    )
    assert (
        result.generated == 1 and json.loads((tmp_path / "metadata.json").read_text())["complete"]
    )


def test_analyze_says_when_phases_are_partial(tiny, tmp_path, capsys):
    run_sweep(tiny[0], cfg32(), tmp_path, batch_size=4, phase_pool=2, progress=False)
    assert main(["analyze", str(tmp_path), "--embedder", "pixel"]) == 0
    assert "lack per-step phases" not in capsys.readouterr().err
    (tmp_path / "phases" / "a000_b001.npy").unlink()
    assert main(["analyze", str(tmp_path), "--embedder", "pixel"]) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "per-step phases" in x]
    assert "1 of 4 finished points lack per-step phases" in line


# -- 3. claims -------------------------------------------------------------------------------------
def test_claims_are_exclusive_released_and_taken_over_when_stale(tiny, tmp_path):
    store = SweepStore(tmp_path)
    p0, p1, p2 = cfg32().grid.points()[:3]
    never = lambda p: False  # noqa: E731
    with PointClaims(store) as a, PointClaims(store) as b:  # two runs in one process (threads)
        assert a.acquire(p0, never) == CLAIMED
        assert b.acquire(p0, never) == BUSY
        a.release(p0)
        assert not list(store.claims.iterdir())
        assert b.acquire(p0, never) == CLAIMED
        assert a.acquire(p0, lambda p: True) == DONE  # busy but finished: nothing to wait for
    assert not list(store.claims.iterdir())  # closing releases what is held

    stale = write_claim(store, "a000_b001", pid=dead_pid())
    with PointClaims(store) as c:
        assert c.acquire(p1, never) == CLAIMED
        assert not stale.exists() and (store.claims / "a000_b001.1.claim").is_file()
        write_claim(store, "a001_b000", host="another-host", pid=os.getpid())
        assert c.acquire(p2, never) == ELSEWHERE
    write_claim(store, "a000_b000", pid=os.getpid())  # an earlier, finished run of this process
    with PointClaims(store) as d:
        assert d.acquire(p0, never) == CLAIMED


def test_a_stale_claim_is_taken_over_on_resume_and_finished_claims_removed(tiny, tmp_path):
    store = SweepStore(tmp_path)
    write_claim(store, "a000_b001", pid=dead_pid())  # a run killed while generating the point
    calls = TransformerCalls(tiny[0])
    try:
        result = run_sweep(tiny[0], cfg32(), tmp_path, batch_size=3, progress=False)
    finally:
        calls.close()
    assert result.generated == 4 and calls.rows == 4 * 2
    assert json.loads((tmp_path / "metadata.json").read_text())["complete"]
    assert not store.claims.exists()


def test_points_claimed_by_a_live_process_are_waited_for_and_taken_over_if_it_dies(
    tiny, tmp_path, monkeypatch, capsys
):
    store = SweepStore(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_claim(store, "a000_b000", pid=other.pid)
        real = run_mod.generate_batch

        def generate(*a, **k):  # the other process dies while this one generates the rest
            other.kill()
            other.wait()
            return real(*a, **k)

        monkeypatch.setattr(run_mod, "generate_batch", generate)
        calls = TransformerCalls(tiny[0])
        try:
            result = run_sweep(tiny[0], cfg32(), tmp_path, batch_size=4, progress=False)
        finally:
            calls.close()
    finally:
        other.kill()
        other.wait()
    assert result.generated == 4 and calls.rows == 4 * 2  # each point once
    assert f"another process on this host (pid {other.pid})" in capsys.readouterr().err
    assert json.loads((tmp_path / "metadata.json").read_text())["complete"]


def test_points_claimed_on_another_host_are_left_to_it(tiny, tmp_path, capsys):
    store = SweepStore(tmp_path)
    claim = write_claim(store, "a001_b001", host="node-7", pid=1234)
    result = run_sweep(tiny[0], cfg32(), tmp_path, batch_size=4, progress=False)
    assert result.generated == 3 and claim.is_file()
    assert not json.loads((tmp_path / "metadata.json").read_text())["complete"]
    assert "1 point(s) were left to processes on other hosts that claim them (node-7)" in (
        capsys.readouterr().err
    )
    claim.unlink()
    assert run_sweep(tiny[0], cfg32(), tmp_path, batch_size=4, progress=False).generated == 1


TWO_RUNS = """
import sys, time
from pathlib import Path
import flux_ir.sweep.run as run_mod
from flux_ir.models import load_pipeline
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep

out, name = Path(sys.argv[1]), sys.argv[2]
pipe, spec = load_pipeline("flux-tiny", device="cpu")
cfg = SweepConfig.from_spec(spec, width=32, height=32, num_steps=2, dtype="float32",
                            grid=GridSpec(n_alpha=2, n_beta=3))
real = run_mod.generate_batch
def slow(*a, **k):  # long enough for the two runs to overlap
    time.sleep(0.3)
    return real(*a, **k)
run_mod.generate_batch = slow
(out.parent / f"ready.{name}").touch()
while len(list(out.parent.glob("ready.*"))) < 2:
    time.sleep(0.01)
result = run_sweep(pipe, cfg, out, batch_size=1, progress=False)
print("generated", result.generated)
"""


@pytest.mark.slow
def test_two_identical_sweeps_started_together_compute_each_point_once(tiny, tmp_path):
    out = tmp_path / "s"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_RUNS, str(out), name],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    generated = [int(o.split("generated")[1]) for o, _ in outs]
    assert sum(generated) == 6 and min(generated) > 0  # shared, none twice
    assert json.loads((out / "metadata.json").read_text())["complete"]
    assert len(pixels(out)) == 6 and not (out / "claims").exists()


# -- 4. damaged metadata ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[]", '{"sweep": 5}', "{}"])
def test_metadata_that_is_not_a_sweeps_is_refused_in_one_line(text, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "metadata.json").write_text(text)
    assert main(["sweep", *TINY, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'metadata.json'} is not a sweep's metadata" in err and "--output_dir" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(InvalidArgumentError) as caught:
        SweepStore(out).check(cfg32())
    assert caught.value.param == "output_dir"


# -- 5. Ctrl-C -------------------------------------------------------------------------------------
def test_ctrl_c_flushes_then_says_how_to_resume_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    interrupt_on_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny[0], cfg32(), tmp_path, batch_size=2, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: 2 points written, re-run the same command to resume"]
    assert len(pixels(tmp_path)) == 2 and not SweepStore(tmp_path).claim_files()


# -- 6. seeds --------------------------------------------------------------------------------------
def test_seeds_that_make_the_same_noise_are_recorded_alike(tiny, tmp_path):
    assert small_opts(seed=-1).seed == small_opts(seed=2**64 - 1).seed == 2**64 - 1
    opts = [small_opts(seed=s, width=32, height=32, num_steps=2) for s in (-1, 2**64 - 1)]
    (a,), cap_a = run_capture(tiny[0], opts[0], model_name="flux-tiny")
    (b,), cap_b = run_capture(tiny[0], opts[1], model_name="flux-tiny")
    assert cap_a.metadata["seed"] == cap_b.metadata["seed"] == 2**64 - 1
    assert np.array_equal(np.asarray(a), np.asarray(b))

    grid = GridSpec(n_alpha=1, n_beta=2)
    neg = cfg32(seeds=(-1, 5, -(2**63)), grid=grid)
    unsigned = cfg32(seeds=(2**64 - 1, 5, 2**63), grid=grid)
    assert cfg32(seeds=(0, 123, 200)).seeds == (0, 123, 200)  # what torch uses: unchanged
    assert neg.signature() == unsigned.signature() and neg.seeds == (2**64 - 1, 5, 2**63)
    run_sweep(tiny[0], neg, tmp_path / "neg", batch_size=2, progress=False)
    run_sweep(tiny[0], unsigned, tmp_path / "uns", batch_size=2, progress=False)
    assert pixels(tmp_path / "neg").keys() == pixels(tmp_path / "uns").keys()
    for name, image in pixels(tmp_path / "neg").items():
        assert np.array_equal(image, pixels(tmp_path / "uns")[name]), name
    # the same sweep: either spelling resumes it, also as recorded before seeds were normalised
    assert run_sweep(tiny[0], unsigned, tmp_path / "neg", progress=False).generated == 0
    meta_path = tmp_path / "uns" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["sweep"]["seeds"] = [-1, 5, -(2**63)]
    meta_path.write_text(json.dumps(meta))
    assert SweepStore(tmp_path / "uns").check(unsigned)
    with pytest.raises(InvalidArgumentError, match="^seeds must lie between"):
        cfg32(seeds=(2**64, 5, 6))
