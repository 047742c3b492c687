"""Files written by flux-ir 0.1.0 (tests/fixtures/legacy, made before the sampling core) still load,
decode and resume, and the same settings still produce the same tensors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_ir.capture import CaptureOptions, run_capture
from flux_ir.lens import decode_capture
from flux_ir.sampling import SamplingOptions
from flux_ir.store import load_capture
from flux_ir.sweep import SweepConfig, run_sweep

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def legacy_options() -> CaptureOptions:
    sampling = SamplingOptions(
        prompt="a red circle", width=32, height=32, num_steps=2, max_sequence_length=32,
        negative_prompt="", true_cfg_scale=2.0,
    )  # fmt: skip
    return CaptureOptions(sampling, seed=7)


def close_pixels(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float rounding on another CPU: at most one level apart, almost all identical."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape and diff.max() <= 1 and (diff == 0).mean() > 0.99


@pytest.fixture(scope="module")
def legacy_cap():
    return load_capture(LEGACY / "capture.pt")


def test_a_legacy_capture_and_its_shards_hold_the_same_tensors(legacy_cap):
    shards = load_capture(LEGACY / "capture_shards")
    assert (
        legacy_cap.block_indices
        == shards.block_indices
        == {"double": [0, 1], "single": [0, 1, 2, 3]}
    )
    assert legacy_cap.has_uncond and shards.has_uncond
    for kind, index in (("double", 1), ("single", 3)):
        for step in (0, 1):
            a, b = legacy_cap[kind, index, step], shards[kind, index, step]
            for x, y in zip(a, b) if kind == "double" else ((a, b),):
                assert torch.equal(x, y)
    assert shards.metadata == legacy_cap.metadata


@pytest.mark.parametrize("target", ["x0", "next"])
def test_a_legacy_capture_decodes_as_it_did(tiny, legacy_cap, target):
    pipe, _ = tiny
    images = [
        im
        for _, im in decode_capture(
            pipe, legacy_cap, target=target, progress=False, output_type="pt"
        )
    ]
    ours = torch.cat(images).permute(0, 2, 3, 1).float().mul(255).round().to(torch.uint8).numpy()
    close_pixels(ours, np.load(LEGACY / f"lens_{target}.npy"))


def test_the_same_settings_still_capture_the_same_tensors(tiny, legacy_cap):
    pipe, spec = tiny
    images, cap = run_capture(pipe, legacy_options(), model_name=spec.name)
    close_pixels(np.asarray(images[0]), np.load(LEGACY / "image.npy"))
    old_meta = {k: v for k, v in legacy_cap.metadata.items() if k not in ("timestamp", "run_id")}
    new_meta = {k: v for k, v in cap.metadata.items() if k in old_meta}
    assert new_meta == old_meta  # the same keys and values, versions included (new keys may join)
    for kind, index in (("double", 0), ("single", 2)):
        a, b = legacy_cap.image_tokens(kind, index, 1), cap.image_tokens(kind, index, 1)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_legacy_sweep_resumes_and_completes(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(LEGACY / "sweep", sweep)
    meta = json.loads((sweep / "metadata.json").read_text())
    cfg = SweepConfig.from_signature(meta["sweep"])
    assert cfg.signature() == meta["sweep"]  # the settings read back are the ones written
    result = run_sweep(tiny[0], cfg, sweep, batch_size=4, progress=False)
    assert result.skipped == 3 and result.generated == 1
    after = json.loads((sweep / "metadata.json").read_text())
    assert after["complete"] and after["sweep"] == meta["sweep"]
    redone = np.asarray(Image.open(sweep / "images" / "a001_b001.png"))
    close_pixels(redone, np.asarray(Image.open(LEGACY / "sweep_a001_b001.png")))
