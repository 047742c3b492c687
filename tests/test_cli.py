"""The command line end to end, and its errors before any model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import ExifTags, Image

from flux_ir.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run_dir(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def test_capture_writes_the_full_layout(tmp_path, capsys):
    code = main(
        [
            "capture",
            "--model",
            "flux-tiny",
            "--prompt",
            "a photo of a cat",
            "--seed",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    run_dir = _run_dir(tmp_path)
    assert f"run directory: {run_dir}" in capsys.readouterr().out
    inter = run_dir / "intermediates"
    (cap,) = inter.glob("capture_*_flux-tiny.pt")
    (meta,) = inter.glob("metadata_*_flux-tiny.json")
    assert cap.name.removeprefix("capture_") == meta.name.removeprefix("metadata_").replace(
        ".json", ".pt"
    )
    assert json.loads(meta.read_text())["prompt"] == "a photo of a cat"
    decoded = sorted(p.name for p in (inter / "decoded").iterdir())
    expected = [f"double_block_{i}_step_{k}.jpg" for i in range(2) for k in range(4)]
    expected += [f"single_block_{i}_step_{k}.jpg" for i in range(4) for k in range(4)]
    assert decoded == sorted(expected)
    assert (inter / "mosaic_x0.jpg").is_file()
    exif = Image.open(run_dir / "img_0.jpg").getexif()
    assert exif[ExifTags.Base.ImageDescription] == "a photo of a cat"
    assert not list(run_dir.rglob(".*tmp*")), "temporary files left behind"


def test_no_sampling_metadata_and_no_decoding(tmp_path):
    code = main(
        [
            "capture",
            "--model",
            "flux-tiny",
            "--seed",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--num_steps",
            "2",
            "--output_dir",
            str(tmp_path),
            "--should_decode_intermediates=False",
            "--add_sampling_metadata=False",
        ]
    )
    assert code == 0
    run_dir = _run_dir(tmp_path)
    assert ExifTags.Base.ImageDescription not in Image.open(run_dir / "img_0.jpg").getexif()
    assert not (run_dir / "intermediates" / "decoded").exists()


def test_decode_command_from_a_saved_capture(tmp_path):
    main(
        [
            "capture",
            "--model",
            "flux-tiny",
            "--seed",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--num_steps",
            "2",
            "--output_dir",
            str(tmp_path),
            "--should_decode_intermediates=False",
        ]
    )
    (cap,) = _run_dir(tmp_path).glob("intermediates/capture_*.pt")
    out = tmp_path / "lens"
    assert main(["decode", str(cap), "--target", "next", "--output_dir", str(out)]) == 0
    assert len(list((out / "decoded_next").glob("*.jpg"))) == (2 + 4) * 2
    assert (out / "mosaic_next.jpg").is_file()
    assert main(["decode", str(cap), "--output_dir", str(out)]) == 0  # x0 beside, not over, next
    assert len(list((out / "decoded").glob("*.jpg"))) == (2 + 4) * 2
    assert len(list((out / "decoded_next").glob("*.jpg"))) == (2 + 4) * 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "100"], "--width must be a positive multiple of 16"),
        (["--height", "250"], "--height must be a positive multiple of 16"),
        (["--num_steps", "0"], "--num_steps must be a positive integer"),
        (["--model", "flux-ultra"], "--model 'flux-ultra' is unknown; choose one of flux-schnell"),
        (["--decode_target", "eps"], "--decode_target 'eps' is unknown; choose one of x0, next"),
        (["--offload", "sideways"], "--offload 'sideways' is unknown; use one of none, model"),
        (["--weights", "zeros"], "--weights 'zeros' is unknown; use one of pretrained, random"),
        (["--copy", "lazy"], "--copy 'lazy': choose one of pageable, pinned, sync"),
    ],
)
def test_bad_input_fails_before_any_model_loads(args, message, tmp_path, capsys, monkeypatch):

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded despite bad input")

    monkeypatch.setattr("flux_ir.models.load_pipeline", no_loading)
    code = main(["capture", "--model", "flux-tiny", "--output_dir", str(tmp_path), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_output_dir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["capture", "--model", "flux-tiny", "--output_dir", str(blocker / "sub")])
    assert code == 2
    assert "--output_dir" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_main_command(tmp_path):
    """The README's first command, as a newcomer runs it (256x256, 4 steps, every block decoded)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "capture_sample.py",
        "--model",
        "flux-tiny",
        "--prompt",
        "a photo of a cat",
        "--seed",
        "1",
        "--output_dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = _run_dir(tmp_path)
    assert f"run directory: {run_dir}" in proc.stdout
    assert Image.open(run_dir / "img_0.jpg").size == (256, 256)
    assert len(list((run_dir / "intermediates" / "decoded").glob("*.jpg"))) == 6 * 4


def test_flux_toy_captures_at_its_native_size_with_its_cfg_by_default(tmp_path):
    args = ["capture", "--model", "flux-toy", "--prompt", "a red circle", "--seed", "1"]
    args += ["--num_steps", "2", "--should_decode_intermediates", "False"]
    assert main([*args, "--output_dir", str(tmp_path)]) == 0
    (meta,) = _run_dir(tmp_path).glob("intermediates/metadata_*.json")
    meta = json.loads(meta.read_text())
    assert (meta["width"], meta["height"]) == (128, 128)
    assert meta["true_cfg_scale"] == 2.0 and meta["negative_prompt"] == ""


@pytest.mark.parametrize(
    ("copy", "fmt", "prepared"),
    [("pinned", "pt", True), ("pinned", "shards", True), ("pageable", "pt", False)],
)
def test_capture_page_locks_its_memory_before_the_model_loads(
    copy, fmt, prepared, tmp_path, monkeypatch
):
    calls = []

    def prepare(load, opts, selection, streaming=False):
        calls.append(("prepare", load.spec.name, selection.single_blocks, streaming))
        return 0

    def stop_loading(*a, **k):
        calls.append(("load",))
        raise KeyboardInterrupt  # nothing after the load matters here

    monkeypatch.setattr("flux_ir.capture.prepare_capture", prepare)
    monkeypatch.setattr("flux_ir.models.load_pipeline", stop_loading)
    args = ["--copy", copy, "--format", fmt, "--single_blocks", "1,2"]
    main(["capture", "--model", "flux-toy", "--output_dir", str(tmp_path), *args])
    expected = [("prepare", "flux-toy", (1, 2), fmt == "shards")] if prepared else []
    assert calls == [*expected, ("load",)]
