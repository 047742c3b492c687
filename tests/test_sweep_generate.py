"""Batched sweep generation on flux-tiny: determinism, layout, resume, refusal, per-step x0."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import flux_ir.sweep.run as run_mod
from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import pack_latents, unpack_latents
from flux_ir.models import resolve_model
from flux_ir.sampling import encode_prompt
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep
from flux_ir.sweep.generate import generate_batch
from flux_ir.sweep.grid import grid_latents, vertex_latents

SIZE = 32  # 32x32 pixels -> 4x4 latents -> 4 packed tokens


def small_cfg(**kw) -> SweepConfig:
    """flux-tiny's defaults at 32x32 with 2 steps; `kw` overrides grid or sampling settings."""
    base = dict(width=SIZE, height=SIZE, num_steps=2, grid=GridSpec(n_alpha=2, n_beta=3))
    base.update(kw)
    return SweepConfig.from_spec(resolve_model("flux-tiny"), **base)


def pixels(directory) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((directory / "images").glob("*.png"))}


def assert_same_images(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Equal up to float rounding: CPU matrix kernels block their sums by the number of rows, so a
    different batch size reorders float additions (~1e-6); after quantising to uint8 that can flip a
    value by one level, in well under 1% of the values. Any real mix-up of points differs far more."""
    assert a.keys() == b.keys()
    for name in a:
        diff = np.abs(a[name].astype(int) - b[name].astype(int))
        assert diff.max() <= 1, name
        assert (diff > 0).mean() < 0.01, name


class TransformerCalls:
    """Counts the images the transformer denoised (batch rows per forward call)."""

    def __init__(self, pipe):
        self.rows = 0
        self.handle = pipe.transformer.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, out):
        self.rows += kwargs["hidden_states"].shape[0]

    def close(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
    """One 2x3 sweep with batch size 4 (a full and a partial batch), kept for several tests."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    run_sweep(tiny[0], small_cfg(), out, batch_size=4, progress=False)
    return out


def test_a_point_gives_the_same_image_whatever_the_batch_size(tiny, swept, tmp_path):
    run_sweep(tiny[0], small_cfg(), tmp_path, batch_size=1, progress=False)
    assert_same_images(pixels(swept), pixels(tmp_path))


def test_layout_metadata_and_points_table(swept):
    names = sorted(p.name for p in (swept / "images").iterdir())
    assert names == [f"a{r:03d}_b{c:03d}.png" for r in range(2) for c in range(3)]
    meta = json.loads((swept / "metadata.json").read_text())
    assert meta["complete"] and meta["grid_size"] == [2, 3]
    assert (
        meta["sweep"]["seeds"] == [0, 123, 200]
        and meta["sweep"]["grid"]["normalisation"] == "annulus"
    )
    assert {"torch", "diffusers", "transformers", "flux_ir"} <= set(meta["versions"])
    table = pd.read_csv(swept / "points.csv")
    assert list(table["index"]) == list(range(6)) and table["done"].all()
    assert table.loc[5, "file"] == "images/a001_b002.png"
    assert (table.loc[5, "alpha"], table.loc[5, "beta"]) == (1.0, 1.0)
    assert np.allclose(table["norm_after"], np.sqrt(16 * 4 * 4), rtol=1e-5)
    assert meta["points"][5]["norm_before"] == pytest.approx(table.loc[5, "norm_before"])
    assert not list(swept.rglob(".*tmp*")), "temporary files left behind"


def test_resume_generates_only_the_missing_points(tiny, swept, tmp_path):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(swept, out)
    (out / "images" / "a001_b000.png").unlink()
    kept = (out / "images" / "a000_b000.png").stat().st_mtime_ns
    calls = TransformerCalls(tiny[0])
    try:
        result = run_sweep(tiny[0], small_cfg(), out, batch_size=4, progress=False)
        assert (result.generated, result.skipped) == (1, 5)
        assert calls.rows == 1 * 2  # one point, two steps
        calls.rows = 0
        again = run_sweep(tiny[0], small_cfg(), out, batch_size=4, progress=False)
        assert again.generated == 0 and calls.rows == 0
    finally:
        calls.close()
    assert (out / "images" / "a000_b000.png").stat().st_mtime_ns == kept
    assert_same_images(pixels(swept), pixels(out))


def test_a_finished_sweep_does_not_even_encode_the_prompt(tiny, swept, monkeypatch):
    def no_encoding(*a, **k):
        raise AssertionError("the prompt was encoded although every point is done")

    monkeypatch.setattr(run_mod, "encode_prompt", no_encoding)
    assert run_sweep(tiny[0], small_cfg(), swept, batch_size=4, progress=False).generated == 0


def test_an_interrupted_sweep_keeps_its_finished_batches(tiny, tmp_path, monkeypatch):
    real = run_mod.generate_batch
    calls = {"n": 0}

    def crash_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "generate_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny[0], small_cfg(), tmp_path, batch_size=2, progress=False)
    assert len(list((tmp_path / "images").glob("*.png"))) == 2
    part = pd.read_csv(tmp_path / "parts" / "points.rank0.csv")
    assert sorted(part["index"]) == [0, 1]
    monkeypatch.setattr(run_mod, "generate_batch", real)
    result = run_sweep(tiny[0], small_cfg(), tmp_path, batch_size=2, progress=False)
    assert (result.generated, result.skipped) == (4, 2)


def test_a_different_sweep_in_the_same_directory_is_refused(tiny, swept):
    other = small_cfg(grid=GridSpec(alpha=(0, 2), n_alpha=2, n_beta=3))
    with pytest.raises(
        InvalidArgumentError, match="holds a different sweep \\(differs in: grid\\)"
    ):
        run_sweep(tiny[0], other, swept, batch_size=4, progress=False)


def test_prompt_embeddings_equal_the_pipelines_own_encoding(tiny):
    pipe = tiny[0]
    cfg = small_cfg(negative_prompt="blurry, ugly", true_cfg_scale=3.0)
    cond = encode_prompt(pipe, cfg.sampling)
    own, pooled, _ = pipe.encode_prompt("blurry, ugly", prompt_2=None, max_sequence_length=32)
    assert torch.equal(cond.negative_prompt_embeds, own) and torch.equal(
        cond.negative_pooled_prompt_embeds, pooled
    )
    assert cond.repeat(3)["prompt_embeds"].shape == (3, *cond.prompt_embeds.shape[1:])


def test_true_cfg_changes_the_images(tiny, swept, tmp_path):
    cfg = small_cfg(negative_prompt="blurry, ugly", true_cfg_scale=4.0)
    run_sweep(tiny[0], cfg, tmp_path, batch_size=6, progress=False)
    a, b = pixels(swept), pixels(tmp_path)
    assert any(np.abs(a[n].astype(int) - b[n].astype(int)).max() > 8 for n in a)


def test_per_step_x0_matches_the_transformer_and_ends_at_the_final_latents(tiny):
    pipe = tiny[0]
    cfg = small_cfg()
    z, _, _ = grid_latents(vertex_latents(cfg.seeds, SIZE, SIZE), cfg.grid, cfg.grid.points()[:2])
    velocities = []
    handle = pipe.transformer.register_forward_hook(
        lambda m, a, out: velocities.append(out[0].clone())
    )
    try:
        _, x0 = generate_batch(pipe, cfg, encode_prompt(pipe, cfg.sampling), z, phase_pool=1)
    finally:
        handle.remove()
    assert x0.shape == (2, 2, 16, 4, 4)
    sigma0 = float(pipe.scheduler.sigmas[0])
    expected0 = unpack_latents(pack_latents(z) - sigma0 * velocities[0], SIZE, SIZE)
    assert torch.allclose(x0[:, 0], expected0, atol=1e-5)
    final = pipe(
        **encode_prompt(pipe, cfg.sampling).repeat(2),
        latents=pack_latents(z),
        width=SIZE,
        height=SIZE,
        num_inference_steps=2,
        guidance_scale=3.5,
        output_type="latent",
    ).images
    assert torch.allclose(x0[:, -1], pipe._unpack_latents(final, SIZE, SIZE, 8), atol=1e-5)


def test_phases_are_kept_per_point_with_a_fixed_pooling(tiny, tmp_path):
    cfg = small_cfg(grid=GridSpec(n_alpha=2, n_beta=2))
    run_sweep(tiny[0], cfg, tmp_path, batch_size=4, phase_pool=2, progress=False)
    phase = np.load(tmp_path / "phases" / "a001_b001.npy", allow_pickle=False)
    assert phase.shape == (2, 16, 2, 2) and phase.dtype == np.float16
    with pytest.raises(InvalidArgumentError, match="resume with phase_pool 2"):
        run_sweep(tiny[0], cfg, tmp_path, batch_size=4, phase_pool=1, progress=False)


def test_the_last_decoded_phase_is_the_final_image(tiny, tmp_path):
    cfg = small_cfg(grid=GridSpec(n_alpha=1, n_beta=2))
    run_sweep(tiny[0], cfg, tmp_path, batch_size=2, phase_pool=1, phase_images=SIZE, progress=False)
    for name in ("a000_b000", "a000_b001"):
        last = np.asarray(Image.open(tmp_path / "phases" / f"{name}_s01.png")).astype(int)
        final = np.asarray(Image.open(tmp_path / "images" / f"{name}.png")).astype(int)
        first = np.asarray(Image.open(tmp_path / "phases" / f"{name}_s00.png")).astype(int)
        assert np.abs(last - final).max() <= 1  # x0 at the last step is the final latent
        assert np.abs(first - final).max() > 8  # while the first step's estimate is not


def test_sweep_images_are_exactly_the_pipelines_own_output(tiny, swept):
    pipe, cfg = tiny[0], small_cfg()
    points = cfg.grid.points()[:4]  # the fixture's first batch
    z, _, _ = grid_latents(vertex_latents(cfg.seeds, SIZE, SIZE), cfg.grid, points)
    own = pipe(
        **encode_prompt(pipe, cfg.sampling).repeat(4),
        latents=pack_latents(z),
        width=SIZE,
        height=SIZE,
        num_inference_steps=2,
        guidance_scale=3.5,
        output_type="pil",
    ).images
    for point, image in zip(points, own):
        assert np.array_equal(
            np.asarray(Image.open(swept / "images" / point.file)), np.asarray(image)
        )


def test_the_text_encoders_run_once_per_sweep(tiny, tmp_path, monkeypatch):
    pipe = tiny[0]
    encoded = []
    real = pipe.text_encoder_2.forward
    monkeypatch.setattr(
        pipe.text_encoder_2, "forward", lambda *a, **k: encoded.append(1) or real(*a, **k)
    )
    run_sweep(pipe, small_cfg(), tmp_path, batch_size=2, progress=False)  # three batches
    assert len(encoded) == 1
