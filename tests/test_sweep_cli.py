"""`flux-ir sweep` and `flux-ir analyze` end to end, and their errors before any model loads."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flux_ir.cli import main

TINY = ["--model", "flux-tiny", "--width", "32", "--height", "32", "--num_steps", "2"]


def test_sweep_then_analyze_writes_images_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sweep", *TINY, "--n_alpha", "3", "--n_beta", "2", "--batch_size", "4"]
    phases = ["--phases", "--phase_pool", "2", "--phase_images", "16"]
    code = main([*args, *phases, "--output_dir", str(out), "--progress=False"])
    assert code == 0
    assert f"sweep directory: {out}" in capsys.readouterr().out
    assert len(pd.read_csv(out / "points.csv")) == 6
    assert len(list((out / "phases").glob("*.npy"))) == 6
    assert Image.open(out / "phases" / "a002_b001_s01.png").size == (16, 16)

    assert main(["analyze", str(out), "--embedder", "pixel"]) == 0
    analysis = out / "analysis"
    for name in (
        "mosaic.png",
        "lipschitz_pixel32.png",
        "overlay_pixel32.png",
        "phases_pixel32.png",
    ):
        assert (analysis / name).stat().st_size > 0, name
    field = pd.read_csv(analysis / "lipschitz_pixel32.csv")
    assert len(field) == 6 and field["lipschitz"].notna().all()
    assert (out / "embeddings" / "pixel32.npz").is_file()
    with np.load(analysis / "lipschitz_pixel32.npz") as saved:
        assert saved["phase_fields"].shape == (2, 3, 2) and str(saved["phase_space"]) == "image"


def test_preset_sets_the_papers_prompts(tmp_path):
    out = tmp_path / "s"
    assert (
        main(
            [
                "sweep",
                *TINY,
                "--n_alpha",
                "1",
                "--preset",
                "hessian-paper",
                "--output_dir",
                str(out),
                "--progress=False",
            ]
        )
        == 0
    )
    sweep = json.loads((out / "metadata.json").read_text())["sweep"]
    assert sweep["prompt"] == "High quality picture, 4k, detailed"
    assert (
        sweep["negative_prompt"] == "blurry, ugly, stock photo" and sweep["true_cfg_scale"] == 5.0
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "1,0"], "--alpha interval 1.0,0.0 is empty"),
        (["--beta", "0.5,0.5"], "--beta interval 0.5,0.5 is empty"),
        (["--n_alpha", "0"], "--n_alpha must be a positive integer"),
        (["--batch_size", "0"], "--batch_size must be a positive integer"),
        (["--normalisation", "sphere"], "--normalisation 'sphere' is unknown"),
        (["--width", "100"], "--width must be a positive multiple of 16"),
        (["--seeds", "1,2"], "--seeds must be three integers"),
        (["--preset", "paper"], "--preset 'paper' is unknown; choose one of hessian-paper"),
        (["--phases", "--phase_pool", "3"], "--phase_pool must be a positive integer dividing"),
        (
            ["--phase_images", "32"],
            "--phase_images needs --phases",
        ),
        (["--model", "flux-ultra"], "--model 'flux-ultra' is unknown"),
    ],
)
def test_bad_input_fails_before_any_model_loads(args, message, tmp_path, capsys, monkeypatch):

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded despite bad input")

    monkeypatch.setattr("flux_ir.models.load_pipeline", no_loading)
    code = main(["sweep", *TINY, "--output_dir", str(tmp_path / "s"), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_different_sweep_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):

    out = tmp_path / "s"
    assert (
        main(["sweep", *TINY, "--n_alpha", "1", "--output_dir", str(out), "--progress=False"]) == 0
    )
    monkeypatch.setattr("flux_ir.models.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["sweep", *TINY, "--n_alpha", "2", "--output_dir", str(out)]) == 2
    assert "holds a different sweep (differs in: grid)" in capsys.readouterr().err


def test_unwritable_output_dir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["sweep", *TINY, "--output_dir", str(blocker / "sub")]) == 2
    assert "--output_dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--embedder", "dino"], "--embedder 'dino' is unknown; choose one of clip"),
        ([], "is not a sweep directory"),
    ],
)
def test_analyze_refuses_bad_input(args, message, tmp_path, capsys):
    assert main(["analyze", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_an_unfinished_sweep_can_be_analysed(tmp_path, monkeypatch, capsys):
    import flux_ir.sweep.run as run_mod

    out = tmp_path / "s"
    real, calls = run_mod.generate_batch, {"n": 0}

    def stop_after_one_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "generate_batch", stop_after_one_batch)
    args = ["sweep", *TINY, "--n_alpha", "2", "--batch_size", "3", "--output_dir", str(out)]
    assert main([*args, "--progress=False"]) == 130  # Ctrl-C: exit code 130, one line, no traceback
    err = capsys.readouterr().err
    assert "interrupted: 3 points written, re-run the same command to resume" in err
    assert "Traceback" not in err
    assert main(["analyze", str(out), "--embedder", "pixel", "--phases=False"]) == 0
    field = pd.read_csv(out / "analysis" / "lipschitz_pixel32.csv")
    assert field["lipschitz"].notna().sum() == 3  # a000_b000, a000_b001, a001_b000 (one batch)


def test_flux_toy_sweeps_at_its_native_size_by_default(tmp_path):
    out = tmp_path / "s"
    args = ["sweep", "--model", "flux-toy", "--prompt", "", "--n_alpha", "1", "--num_steps", "2"]
    assert main([*args, "--output_dir", str(out), "--progress=False"]) == 0
    sweep = json.loads((out / "metadata.json").read_text())["sweep"]
    assert (sweep["width"], sweep["height"]) == (128, 128)
