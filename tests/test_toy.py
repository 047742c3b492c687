"""flux-toy: scenes, checker, training pieces, a smoke training run loaded through load_pipeline,
and (only when trained weights ship) the cheap quality bars."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flux_ir.capture import CaptureOptions, run_capture
from flux_ir.cli import run_fire
from flux_ir.errors import InvalidArgumentError, ModelUnavailableError
from flux_ir.models import LoadOptions, load_pipeline
from flux_ir.models.toy import (
    COMPONENTS,
    CONFIG_FILE,
    WEIGHTS_ENV,
    build_t5_word_tokenizer,
    has_toy_weights,
    read_toy_config,
    toy_weights_dir,
)
from flux_ir.sampling import SamplingOptions
from flux_ir.toy import train as train_module
from flux_ir.toy.checker import NO_SHAPE, check_images
from flux_ir.toy.quality import (
    BARS,
    boundary_ratio,
    lens_convergence,
    phase_grid,
    spearman,
)
from flux_ir.toy.scenes import COLOURS, SHAPES, make_scenes
from flux_ir.toy.train import (
    CHECKPOINT_FILE,
    LOG_FILE,
    CaptionEncoder,
    TrainConfig,
    caption_lookup,
    caption_table,
    latent_statistics,
    pick_captions,
    sample_t,
    train_toy,
)

SMOKE_SIZE = 64


# ----------------------------------------------------------------------------- scenes and checker


def test_scenes_are_deterministic_per_seed():
    a, b, c = (make_scenes(8, SMOKE_SIZE, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)


def test_scene_images_are_rgb_in_unit_range():
    s = make_scenes(16, SMOKE_SIZE, seed=0)
    assert s.images.shape == (16, 3, SMOKE_SIZE, SMOKE_SIZE)
    assert s.images.min() >= 0 and s.images.max() <= 1


def test_captions_name_shape_colour_and_a_different_background():
    s = make_scenes(64, SMOKE_SIZE, seed=3)
    assert (s.colour != s.background).all()
    for text, sh, co, bg in zip(s.captions, s.shape, s.colour, s.background):
        assert text == f"a {COLOURS[co]} {SHAPES[sh]} on a {COLOURS[bg]} background"


@pytest.mark.parametrize("size", [64, 128])
def test_checker_reads_back_the_generated_scenes(size):
    s = make_scenes(300, size, seed=7)
    found = check_images(s.images)
    assert (found.shape == s.shape).float().mean() >= 0.99
    assert (found.colour == s.colour).float().mean() >= 0.99
    assert (found.background == s.background).float().mean() >= 0.99


def test_checker_finds_no_shape_on_a_plain_background():
    plain = torch.ones(2, 3, SMOKE_SIZE, SMOKE_SIZE) * torch.tensor([0.2, 0.3, 0.9])[:, None, None]
    assert (check_images(plain).shape == NO_SHAPE).all()


def test_t5_tokenizer_keeps_caption_words_whole():
    tok = build_t5_word_tokenizer()
    words = "a purple triangle on a white background".split()
    assert tok.tokenize(" ".join(words)) == ["\u2581" + w for w in words]


# ----------------------------------------------------------------------------- training pieces


def test_latent_statistics_centre_and_whiten():
    z = torch.randn(64, 16, 4, 4) * 3 + 0.7
    shift, scale = latent_statistics(z)
    assert shift == pytest.approx(z.mean().item(), abs=1e-5)
    assert ((z - shift) * scale).std().item() == pytest.approx(1.0, abs=1e-5)


def test_timestep_shift_moves_mass_to_high_noise():
    gen = torch.Generator().manual_seed(0)
    plain = sample_t(4096, 1.0, gen, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    shifted = sample_t(4096, 3.0, gen, torch.device("cpu"))
    assert (plain > 0).all() and (shifted < 1).all()
    assert (shifted >= plain).all() and shifted.median() > plain.median() + 0.1


def test_caption_encoder_matches_the_pipelines_encode_prompt():
    from flux_ir.models.toy import SMOKE_ARCH, build_toy_pipeline

    pipe = build_toy_pipeline(SMOKE_ARCH)
    texts = ["", "a red circle", "a blue square on a white background"]
    enc = CaptionEncoder(pipe, texts, 16, torch.device("cpu"))
    with torch.no_grad():
        ours = enc.encode(pipe, torch.tensor([2, 0]))
        ref = pipe.encode_prompt([texts[2], texts[0]], None, device="cpu", max_sequence_length=16)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)


def test_caption_dropout_rates_are_respected():
    texts, index = caption_table()
    lookup = caption_lookup(index, torch.device("cpu"))
    labels = [(i % 3, i % 6, (i + 1 + i // 6) % 6) for i in range(600)]
    labels = [(s, c, b) for s, c, b in labels if b != c]
    s, c, b = (torch.tensor(x) for x in zip(*labels))
    gen = torch.Generator().manual_seed(0)
    neutral = pick_captions(s, c, b, lookup, TrainConfig(p_neutral=1.0, p_partial=0.0), gen)
    assert {texts[k] for k in neutral.tolist()} == {""}
    full = pick_captions(s, c, b, lookup, TrainConfig(p_neutral=0.0, p_partial=0.0), gen)
    assert [texts[k] for k in full.tolist()] == [
        f"a {COLOURS[co]} {SHAPES[sh]} on a {COLOURS[bg]} background" for sh, co, bg in labels
    ]
    mixed = pick_captions(s, c, b, lookup, TrainConfig(p_neutral=0.2, p_partial=0.3), gen)
    kinds = [
        "neutral" if t == "" else "full" if " on a " in t else "partial"
        for t in (texts[k] for k in mixed.tolist())
    ]
    n = len(kinds)
    assert abs(kinds.count("neutral") / n - 0.2) < 0.06
    assert abs(kinds.count("partial") / n - 0.3) < 0.06
    for (sh, co, _), t in zip(labels, (texts[k] for k in mixed.tolist())):
        assert t == "" or SHAPES[sh] in t or COLOURS[co] in t  # partial captions stay true


# ----------------------------------------------------------------------------- smoke training run


@pytest.fixture(scope="module")
def smoke_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_weights")
    summary = train_toy(TrainConfig.smoke_config(out=str(out), seed=0))
    return out, summary


@pytest.fixture
def smoke_pipe(smoke_weights):
    out, _ = smoke_weights
    return load_pipeline(LoadOptions.create("flux-toy", "cpu", weights_dir=str(out)))


def test_the_weights_directory_can_come_from_the_environment(smoke_weights, monkeypatch):
    out, _ = smoke_weights
    monkeypatch.setenv(WEIGHTS_ENV, str(out))
    pipe, _ = load_pipeline("flux-toy", device="cpu")
    assert len(pipe.transformer.single_transformer_blocks) == 2  # the smoke architecture


def test_smoke_training_writes_every_file_small_and_float16(smoke_weights):
    out, summary = smoke_weights
    for name in COMPONENTS:
        path = out / f"{name}.safetensors"
        assert path.is_file() and path.stat().st_size < 16 * 2**20
    assert (out / CONFIG_FILE).is_file() and (out / LOG_FILE).is_file()
    assert read_toy_config(out)["milestone"] == "final"
    assert summary["final_loss"] is not None


class StepClock:
    """A clock that advances one second per reading: time budgets become exact step counts."""

    def __init__(self) -> None:
        self.now = 0.0

    def elapsed(self) -> float:
        self.now += 1.0
        return self.now


def test_training_stops_on_its_time_budget_and_leaves_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "Clock", StepClock)
    cfg = TrainConfig.smoke_config(out=str(tmp_path), time_budget_s=30.0, reserve_s=5.0)
    cfg.dit_steps = 10**6  # only the clock can end it
    summary = train_toy(cfg)
    assert summary["finished"] is False and 0 < summary["dit_steps_done"] < 100
    assert (tmp_path / CHECKPOINT_FILE).is_file() and has_toy_weights(tmp_path)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "Clock", StepClock)
    kw = dict(seed=1, vae_steps=4, dit_steps=6, save_every_s=1e9)
    whole = train_toy(TrainConfig.smoke_config(out=str(tmp_path / "whole"), **kw))
    split = tmp_path / "split"
    # a budget that ends the first invocation inside the VAE phase, the second inside the transformer's
    first = train_toy(
        TrainConfig.smoke_config(out=str(split), time_budget_s=8.0, reserve_s=5.0, **kw)
    )
    assert first["finished"] is False
    second = train_toy(
        TrainConfig.smoke_config(out=str(split), time_budget_s=17.0, reserve_s=5.0, **kw),
        resume=True,
    )
    assert second["finished"] is False and 0 < second["dit_steps_done"] < 6
    last = train_toy(TrainConfig.smoke_config(out=str(split), **kw), resume=True)
    assert whole["finished"] and last["finished"]
    for name in COMPONENTS:
        a = load_file(tmp_path / "whole" / f"{name}.safetensors")
        b = load_file(split / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "Clock", StepClock)
    cfg = TrainConfig.smoke_config(out=str(tmp_path), time_budget_s=8.0, reserve_s=5.0)
    train_toy(cfg)
    with pytest.raises(InvalidArgumentError, match="batch.*same settings"):
        train_toy(TrainConfig.smoke_config(out=str(tmp_path), batch=8), resume=True)


def test_smoke_weights_load_with_trained_vae_statistics(smoke_weights, smoke_pipe):
    out, summary = smoke_weights
    pipe, spec = smoke_pipe
    assert spec.name == "flux-toy" and spec.guidance is None
    assert pipe.vae.config.shift_factor == pytest.approx(summary["vae_shift_factor"])
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["vae_scaling_factor"])
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert len(pipe.transformer.transformer_blocks) >= 1
    assert len(pipe.transformer.single_transformer_blocks) >= 1


def test_smoke_weights_generate_through_capture(smoke_pipe):
    pipe, spec = smoke_pipe
    opts = CaptureOptions.from_spec(
        spec,
        seed=1,
        prompt="a red circle on a blue background",
        width=SMOKE_SIZE,
        height=SMOKE_SIZE,
    )
    images, cap = run_capture(pipe, opts, model_name=spec.name)
    again, _ = run_capture(pipe, opts, model_name=spec.name)
    assert images[0].size == (SMOKE_SIZE, SMOKE_SIZE)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    assert cap.metadata["num_single_blocks"] == len(pipe.transformer.single_transformer_blocks)


def test_phase_grid_reports_shares_and_lipschitz(smoke_pipe):
    pipe, spec = smoke_pipe
    opts = SamplingOptions.from_spec(spec, width=SMOKE_SIZE, height=SMOKE_SIZE, num_steps=1)
    res = phase_grid(pipe, opts, 3, batch=9)
    assert sum(res["class_share"].values()) == pytest.approx(1.0)
    assert len(res["class_grid"]) == 3 and len(res["class_grid"][0]) == 3


def test_lens_convergence_ends_at_the_image_itself(smoke_pipe):
    pipe, spec = smoke_pipe
    opts = SamplingOptions.from_spec(spec, width=SMOKE_SIZE, height=SMOKE_SIZE, num_steps=2)
    res = lens_convergence(pipe, opts, ["a red circle"])
    (dist,) = res["lens_distances"]
    n_blocks = len(pipe.transformer.transformer_blocks) + len(
        pipe.transformer.single_transformer_blocks
    )
    assert len(dist) == n_blocks
    # the last block's x0 at the last step is the final latent: its decode is the image (a batch of
    # six decodes may round a few values one level away from the pipeline's batch of one)
    assert dist[-1] < 1e-4 and dist[-1] == min(dist)
    assert res["lens_spearman"] == pytest.approx(
        -spearman(torch.arange(n_blocks).float(), torch.tensor(dist))
    )


def test_boundary_ratio_compares_cells_next_to_another_class():
    classes = torch.tensor([[0, 0, 1, 1]] * 4)
    lip = torch.tensor([[1.0, 3.0, 3.0, 1.0]] * 4)
    res = boundary_ratio(lip, classes)
    assert res["boundary_share"] == pytest.approx(0.5)
    assert res["lipschitz_ratio"] == pytest.approx(3.0)


def test_spearman_of_monotone_sequences():
    x = torch.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- loading errors


def test_missing_toy_weights_name_the_training_script(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="train_toy.py"):
        load_pipeline("flux-toy", device="cpu")


def test_train_cli_rejects_a_budget_below_the_reserve(tmp_path, capsys):
    from flux_ir.toy.cli import train

    assert run_fire(train, ["--out", str(tmp_path), "--time_budget_s", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --time_budget_s must exceed the 25 s kept for the export")
    assert not any(tmp_path.iterdir())  # refused before any work


# ----------------------------------------------------------------------------- shipped weights

shipped = pytest.mark.skipif(
    not has_toy_weights(),
    reason=f"no trained flux-toy weights in {toy_weights_dir()}: run train_toy.py on a GPU",
)


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("flux-toy", device="cpu")


@shipped
def test_shipped_vae_reconstructs_held_out_scenes(toy):
    from flux_ir.toy.train import vae_psnr

    pipe, _ = toy
    assert vae_psnr(pipe, 32, 128, seed=999, device=torch.device("cpu")) >= BARS["vae_psnr_db"]


@shipped
def test_shipped_model_draws_the_asked_colour_and_shape(toy):
    from flux_ir.toy.quality import prompt_adherence

    pipe, spec = toy
    res = prompt_adherence(pipe, SamplingOptions.from_spec(spec), 24, batch=24, seed=5)
    # a small sample: a few points of slack under the 200-sample bars
    assert res["colour_accuracy"] >= BARS["colour_accuracy"] - 0.1
    assert res["shape_accuracy"] >= BARS["shape_accuracy"] - 0.1


@shipped
def test_shipped_lens_converges_over_depth(toy):
    from flux_ir.toy.quality import lens_convergence

    pipe, spec = toy
    prompts = ["a red circle on a blue background", "a white triangle on a green background"]
    res = lens_convergence(pipe, SamplingOptions.from_spec(spec), prompts)
    assert res["lens_spearman"] >= BARS["lens_spearman"] - 0.15  # two prompts, a little slack
