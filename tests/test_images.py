"""Images carry their prompt in EXIF as Unicode, cut to fit; the run's metadata keeps it whole."""

import json

import pytest
from PIL import Image

from flux_ir.cli import main
from flux_ir.io.images import EXIF_TEXT_BYTES, exif_prompt, sampling_exif, save_image


def test_a_non_ascii_prompt_comes_back_from_the_exif(tmp_path):
    prompt = "un chat rouge — 猫 sur fond bleu"
    path = save_image(Image.new("RGB", (8, 8)), tmp_path / "a.jpg", sampling_exif("m", prompt))
    assert exif_prompt(path) == prompt


def test_a_70000_character_prompt_is_cut_in_the_exif_but_kept_whole_in_the_metadata(tmp_path):
    prompt = "a red circle " * 5400  # 70,200 characters
    args = [
        "capture",
        "--model",
        "flux-tiny",
        "--width",
        "32",
        "--height",
        "32",
        "--num_steps",
        "1",
    ]
    args += ["--prompt", prompt, "--seed", "1", "--should_decode_intermediates", "False"]
    with pytest.warns(UserWarning, match="longer than the 32 T5 tokens the model reads"):
        assert main([*args, "--output_dir", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    in_exif = exif_prompt(run_dir / "img_0.jpg")
    assert in_exif.endswith("…") and prompt.startswith(in_exif[:-1])
    assert len(in_exif.encode("utf-16-le")) <= EXIF_TEXT_BYTES
    (meta,) = (run_dir / "intermediates").glob("metadata_*.json")
    assert json.loads(meta.read_text())["prompt"] == prompt
