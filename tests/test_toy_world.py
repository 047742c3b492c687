"""flux-toy-2: the world of several objects, its checker (clean and noisy renders), the grown model,
its training and resume, the quality bars; and flux-toy's checker against stray pixels."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline

from flux_ir.cli import run_fire
from flux_ir.errors import InvalidArgumentError, ModelUnavailableError
from flux_ir.models import LoadOptions, load_pipeline
from flux_ir.models.toy import (
    SMOKE_ARCH,
    SMOKE_ARCH_2,
    WORDS_2,
    build_t5_word_tokenizer,
    build_toy_pipeline,
    has_toy_weights,
)
from flux_ir.sampling import SamplingOptions
from flux_ir.toy import train2 as train2_module
from flux_ir.toy.checker import check_images
from flux_ir.toy.quality2 import FIGURES, adherence2, score_prompt
from flux_ir.toy.scenes import make_scenes
from flux_ir.toy.train import CHECKPOINT_FILE
from flux_ir.toy.train2 import (
    OPTIMIZER_FILE,
    CaptionTokens,
    TrainConfig2,
    caption_words,
    train_toy2,
    warm_start,
)
from flux_ir.toy.world import (
    COLOURS,
    KINDS,
    SHAPES,
    WORDS,
    caption,
    make_world,
    partial_caption,
)
from flux_ir.toy.world_checker import (
    REJECT,
    checker_accuracy,
    read_world,
    relation_of,
    truth_objects,
)

SMALL = 64


# ----------------------------------------------------------------------------- world


def test_world_is_deterministic_per_seed():
    a, b, c = (make_world(8, SMALL, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)


def test_world_layout_matches_its_pixels_and_captions():
    w = make_world(48, SMALL, seed=3)
    lay = w.layout
    assert w.images.shape == (48, 3, SMALL, SMALL)
    assert w.images.min() >= 0 and w.images.max() <= 1
    assert set(lay.kind.tolist()) == set(range(len(KINDS)))  # every kind drawn
    for i, rec in enumerate(lay.records()):
        objs = rec["objects"]
        n = len(objs)
        assert n == int(lay.count[i]) == (1, 2, 2, 3)[rec["kind"]]
        assert all(o["colour"] != rec["background"] for o in objs)
        masks = w.masks[i, :n]
        assert (masks.flatten(1).sum(1) > 0).all()  # every object is visible
        assert masks.sum(0).max() <= 1  # and none overlaps another
        assert not w.masks[i, n:].any()
        if KINDS[rec["kind"]] in ("two", "three"):
            assert all(o == objs[0] for o in objs)
        if KINDS[rec["kind"]] == "pair":
            assert objs[0]["shape"] != objs[1]["shape"] or objs[0]["colour"] != objs[1]["colour"]
            a, b = truth_objects(w, i)
            assert relation_of(a, b) == rec["relation"]
        text = caption(rec)
        assert text == w.captions[i]
        assert COLOURS[rec["background"]] + " background" in text
        assert set(text.split()) <= set(WORDS)


def test_partial_captions_stay_true():
    w = make_world(64, 16, seed=5)
    rng = random.Random(0)
    allowed = {"a", "an", "and", "shape", "shapes"}
    for rec, full in zip(w.layout.records(), w.captions):
        for _ in range(4):
            part = partial_caption(rec, rng)
            assert set(part.split()) <= set(full.split()) | allowed, (part, full)


def test_caption_words_are_single_t5_tokens():
    tok = build_t5_word_tokenizer(24, WORDS_2)
    for word in WORDS:
        assert tok.tokenize(word) == ["\u2581" + word], word


def test_caption_tokens_match_the_pipelines_tokenisation():
    pipe = build_toy_pipeline(SMOKE_ARCH_2)
    tokens = CaptionTokens(pipe, 24, torch.device("cpu"))
    w = make_world(32, 16, seed=0)
    texts = [t for row in caption_words(w.layout.records(), random.Random(1), 3) for t in row]
    texts.append("")
    clip, t5 = tokens.encode(tokens.words(texts))
    ref_clip = pipe.tokenizer(
        texts, padding="max_length", max_length=pipe.tokenizer_max_length, return_tensors="pt"
    ).input_ids
    ref_t5 = pipe.tokenizer_2(
        texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(clip, ref_clip) and torch.equal(t5, ref_t5)


# ----------------------------------------------------------------------------- checker


def noisy(images: torch.Tensor, seed: int = 0, sigma: float = 0.04, strays: int = 10):
    """A 3x3 blur, Gaussian noise and `strays` 2x2 specks of random colour per image."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, _ = images.shape
    x = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x + sigma * torch.randn(x.shape, generator=g)
    pos = torch.randint(0, h - 2, (b, strays, 2), generator=g)
    colour = torch.rand(b, strays, 3, generator=g)
    for i in range(b):
        for j in range(strays):
            y0, x0 = pos[i, j].tolist()
            x[i, :, y0 : y0 + 2, x0 : x0 + 2] = colour[i, j][:, None, None]
    return x.clamp(0, 1)


@pytest.fixture(scope="module")
def world128():
    return make_world(24, 128, seed=11)


def test_checker_reads_clean_renders(world128):
    acc = checker_accuracy(world128, read_world(world128.images))
    for key in ("background", "count", "shape", "colour", "texture", "size", "relation"):
        assert acc[key] >= 0.95, (key, acc)
    assert acc["scene"] >= 0.9 and acc["rejected"] == 0


def test_checker_reads_noisy_renders_with_stray_pixels(world128):
    acc = checker_accuracy(world128, read_world(noisy(world128.images)))
    for key in ("background", "count", "shape", "colour", "size", "relation"):
        assert acc[key] >= 0.95, (key, acc)
    assert acc["texture"] >= 0.9 and acc["scene"] >= 0.8, acc


def test_checker_rejects_blobs_that_fit_no_shape():
    axis = (torch.arange(128) + 0.5) / 128 * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    ellipse = (x / 0.6) ** 2 + (y / 0.2) ** 2 < 1
    crescent = (x**2 + y**2 < 0.25) & ((x - 0.25) ** 2 + y**2 > 0.2)
    bg = torch.tensor([0.16, 0.27, 0.86])[:, None, None]
    fg = torch.tensor([0.92, 0.82, 0.16])[:, None, None]
    images = torch.stack([bg + (fg - bg) * m.float() for m in (ellipse, crescent)])
    reading = read_world(images)
    assert reading.count.tolist() == [1, 1]
    assert reading.shape[:, 0].tolist() == [REJECT, REJECT]
    assert COLOURS[int(reading.colour[0, 0])] == "yellow"


def test_checker_accuracy_notices_a_wrong_reading(world128):
    reading = read_world(world128.images)
    reading.shape[:, 0] = (reading.shape[:, 0] + 1) % len(SHAPES)  # misread every largest object
    acc = checker_accuracy(world128, reading)
    assert acc["shape"] < 0.8 and acc["scene"] < 0.1


def test_v1_checker_ignores_stray_pixels():
    s = make_scenes(40, 128, seed=7)
    x = s.images.clone()
    x[:, :, 1, 1] = 1 - x[:, :, 1, 1]  # one stray pixel in two corners stretches no box
    x[:, :, 126, 2] = 1 - x[:, :, 126, 2]
    found = check_images(x)
    assert torch.equal(found.shape, s.shape) and torch.equal(found.colour, s.colour)


# ----------------------------------------------------------------------------- quality scoring


def _read(obj: dict, x: float, y: float) -> dict:
    return dict(obj, x=x, y=y, iou=1.0)


def test_binding_and_relation_scores():
    red_circle = dict(shape=0, colour=0, texture=0, size=1)
    blue_square = dict(shape=1, colour=2, texture=1, size=0)
    rec = dict(kind=1, relation=0, background=5, objects=[red_circle, blue_square])
    right = [_read(red_circle, -0.5, 0.0), _read(blue_square, 0.5, 0.0)]
    s = score_prompt(rec, right, 5)
    assert all(s[k] for k in FIGURES if k != "binding_swapped") and not s["binding_swapped"]
    swapped = [
        _read(dict(red_circle, colour=2), -0.5, 0.0),
        _read(dict(blue_square, colour=0), 0.5, 0.0),
    ]
    s = score_prompt(rec, swapped, 5)
    assert s["binding_swapped"] and not s["binding"] and not s["colour"] and s["shape"]
    s = score_prompt(rec, right[::-1] and [right[0]], 3)  # one object read, wrong background
    assert not s["count"] and not s["background"] and not s["relation"] and not s["binding"]


# ----------------------------------------------------------------------------- model and training


def test_grown_model_computes_what_flux_toy_computes():
    old = build_toy_pipeline(SMOKE_ARCH, seed=1)
    new = build_toy_pipeline(SMOKE_ARCH_2, seed=2)
    warm_start(new, old)
    assert len(new.transformer.transformer_blocks) > len(old.transformer.transformer_blocks)
    g = torch.Generator().manual_seed(0)
    b = 2
    kw = dict(
        hidden_states=torch.randn(b, 16, 64, generator=g),
        timestep=torch.rand(b, generator=g),
        pooled_projections=torch.randn(b, 64, generator=g),
        encoder_hidden_states=torch.randn(b, 24, 64, generator=g),
        txt_ids=torch.zeros(24, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, 4, 4, "cpu", torch.float32),
        return_dict=False,
    )
    texts = ["", "a red circle on a blue background"]
    with torch.no_grad():
        assert torch.equal(old.transformer(**kw)[0], new.transformer(**kw)[0])
        a = old.encode_prompt(texts, None, device="cpu", max_sequence_length=16)
        c = new.encode_prompt(texts, None, device="cpu", max_sequence_length=16)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


class StepClock:
    """A clock that advances one second per reading: time budgets become step counts."""

    def __init__(self) -> None:
        self.now = 0.0

    def elapsed(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture(scope="module")
def toy2_weights(tmp_path_factory):
    """A smoke run split in two by its time budget, then resumed to the end."""
    out = tmp_path_factory.mktemp("toy2")
    mp = pytest.MonkeyPatch()
    mp.setattr(train2_module, "Clock", StepClock)
    try:
        kw = dict(out=str(out), vae_steps=3, dit_steps=5, save_every_s=1e9)
        first = train_toy2(TrainConfig2.smoke_config(time_budget_s=17.0, reserve_s=5.0, **kw))
        sizes = {p.name: p.stat().st_size for p in out.iterdir()}
        last = train_toy2(TrainConfig2.smoke_config(**kw), resume=True)
    finally:
        mp.undo()
    return out, first, sizes, last


def test_toy2_training_stops_and_resumes_in_small_files(toy2_weights):
    out, first, sizes, last = toy2_weights
    assert first["finished"] is False and 0 < first["dit_steps_done"] < 5
    assert {CHECKPOINT_FILE, OPTIMIZER_FILE, "transformer.safetensors"} <= set(sizes)
    assert len(sizes) <= 8 and max(sizes.values()) < 16 * 2**20
    assert last["finished"] and last["dit_steps_done"] == 5
    assert has_toy_weights(out, "flux-toy-2")


def test_toy2_resume_refuses_other_settings(toy2_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(train2_module, "Clock", StepClock)
    train_toy2(TrainConfig2.smoke_config(out=str(tmp_path), time_budget_s=8.0, reserve_s=5.0))
    with pytest.raises(InvalidArgumentError, match="variants.*same settings"):
        train_toy2(TrainConfig2.smoke_config(out=str(tmp_path), variants=2), resume=True)


def test_toy2_weights_load_and_score(toy2_weights):
    out, *_ = toy2_weights
    pipe, spec = load_pipeline(LoadOptions.create("flux-toy-2", "cpu", weights_dir=str(out)))
    assert spec.name == "flux-toy-2" and len(pipe.transformer.transformer_blocks) == 3
    opts = SamplingOptions.from_spec(spec, width=SMALL, height=SMALL, num_steps=1)
    res = adherence2(pipe, opts, 3, batch=3)
    for part in ("model", "checker_clean", "checker_vae"):
        assert res[part]["count_n"] == 3
        assert all(0 <= res[part][k] <= 1 for k in ("background", "count", "shape"))
    assert res["checker_clean"]["background"] == 1.0  # the renders themselves


def test_flux_toy_2_without_weights_names_its_training(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_IR_TOY2_WEIGHTS", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="--world 2"):
        load_pipeline("flux-toy-2", device="cpu")


def test_flux_toy_2_random_weights_have_its_architecture():
    pipe, _ = load_pipeline("flux-toy-2", device="cpu", weights="random")
    assert len(pipe.transformer.transformer_blocks) == 6
    assert len(pipe.transformer.single_transformer_blocks) == 12
    assert pipe.tokenizer_max_length == 128


def test_train_cli_refuses_an_unknown_world(tmp_path, capsys):
    from flux_ir.toy.cli import train

    assert run_fire(train, ["--out", str(tmp_path), "--world", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: --world must be 1 or 2")


@pytest.mark.parametrize("flag", ["--science", "--science_only"])
def test_quality_refuses_the_science_bars_for_world_2_before_loading(flag, capsys, monkeypatch):
    from flux_ir.toy.cli import quality

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("flux_ir.models.load_pipeline", no_loading)
    assert run_fire(quality, ["--world", "2", flag, "True"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}: the science bars read flux-toy's world")


def test_toy2_continues_its_own_weights_with_the_vae_frozen(toy2_weights, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    src, *_ = toy2_weights
    monkeypatch.setattr(train2_module, "Clock", StepClock)
    cfg = TrainConfig2.smoke_config(out=str(tmp_path), init_from=str(src), dit_steps=2)
    summary = train_toy2(cfg)
    assert summary["finished"] and summary["dit_steps_done"] == 2
    assert "vae_psnr_db" not in summary  # no VAE phase ran
    for part, same in (("vae", True), ("transformer", False)):
        a, b = (load_file(str(d / f"{part}.safetensors")) for d in (src, tmp_path))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a) is same, part
    src_cfg, new_cfg = (json.loads((d / "toy.json").read_text()) for d in (src, tmp_path))
    assert new_cfg["arch"] == src_cfg["arch"]
