"""Joint-attention recording: images bit-identical with and without it, maps equal to explicit
softmax rows of the processor's own q and k, hooks always removed, errors naming their parameter,
and what flux-toy's maps show about "circle" and "background"."""

import shutil

import diffusers.models.transformers.transformer_flux as transformer_flux
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flux_ir.capture import (
    AttentionOptions,
    AttentionTrace,
    load_attention,
    save_attention,
    token_indices,
)
from flux_ir.errors import CaptureFileError, InvalidArgumentError
from flux_ir.models import load_pipeline
from flux_ir.plots import attention_overlay
from flux_ir.sampling import SamplingOptions, generate
from flux_ir.store import load_capture
from flux_ir.toy.checker import FOREGROUND_DISTANCE

from .conftest import small_sampling

CFG = dict(negative_prompt="blurry", true_cfg_scale=4.0)
TOY_PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def toy():
    from flux_ir.models.toy import has_toy_weights

    if not has_toy_weights():
        pytest.skip("flux-toy weights are not installed")
    return load_pipeline("flux-toy")


def latents(pipe, opts, seed=0):
    return generate(pipe, opts, seed=seed, output_type="latent").images


def hook_count(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in module.modules()
    )


# -- (1) recording changes nothing ------------------------------------------------------------------
@pytest.mark.parametrize("model, cfg", [("tiny", False), ("tiny", True), ("toy", True)])
def test_recording_leaves_the_generated_latents_bit_identical(model, cfg, tiny, request):
    if model == "tiny":
        pipe, opts = tiny[0], small_sampling(**(CFG if cfg else {}))
        words = token_indices(pipe, opts.prompt, ["photo", "cat"])
    else:
        pipe, spec = request.getfixturevalue("toy")
        opts = SamplingOptions.from_spec(spec, prompt=TOY_PROMPT, num_steps=4)
        words = token_indices(pipe, opts.prompt, ["circle", "background"])
    assert opts.true_cfg == cfg
    plain = latents(pipe, opts)
    with AttentionTrace(pipe.transformer, tokens=words, direction="both", passes="both") as trace:
        traced = latents(pipe, opts)
    assert torch.equal(plain, traced)
    n_blocks = len(pipe.transformer.transformer_blocks) + len(
        pipe.transformer.single_transformer_blocks
    )
    assert set(trace.passes) == {"cond", "uncond"}
    assert len(trace.maps.tensors) == 2 * n_blocks * opts.num_steps
    assert len(trace.passes["uncond"].tensors) == (len(trace.maps.tensors) if cfg else 0)


# -- (2) the maps are softmax rows of the processor's q and k ----------------------------------------
@pytest.mark.parametrize(
    "heads, max_scores, logsumexp",
    [("mean", 1 << 26, "auto"), ([1], 1 << 26, "auto"), ("mean", 64, "exact")],
)  # "auto": img->txt normalised by the kernel's logsumexp; "exact", max_scores=64: on the side,
# one query per chunk
def test_maps_are_the_rows_of_an_explicit_softmax(tiny, monkeypatch, heads, max_scores, logsumexp):
    pipe = tiny[0]
    opts = small_sampling(num_steps=2, **CFG)
    rotated = []  # q then k of each attention call, as the processor rotates them for the kernel
    rotate = transformer_flux.apply_rotary_emb

    def spy(x, *args, **kw):
        rotated.append(rotate(x, *args, **kw).clone())
        return rotated[-1]

    monkeypatch.setattr(transformer_flux, "apply_rotary_emb", spy)
    words = token_indices(pipe, opts.prompt, ["photo", "cat"])
    tokens = [*words.values(), 12]  # two words and the end-of-text token
    with AttentionTrace(
        pipe.transformer,
        tokens=tokens,
        steps=(-1,),
        num_steps=2,
        heads=heads,
        direction="both",
        passes="both",
        max_scores=max_scores,
        logsumexp=logsumexp,
    ) as trace:  # passes told apart by the timestep (passes_per_step=None)
        generate(pipe, opts, seed=3)
    assert trace.normalised["exact" if logsumexp == "exact" else "kernel"] == 2 * 6
    t = pipe.transformer
    blocks = [("double", i) for i in range(len(t.transformer_blocks))]
    blocks += [("single", i) for i in range(len(t.single_transformer_blocks))]
    calls = list(zip(rotated[::2], rotated[1::2]))  # (q, k) [B, S, heads, d]
    assert len(calls) == 2 * 2 * len(blocks)  # steps x (cond, uncond) x blocks
    n_txt, grid = opts.max_sequence_length, opts.token_grid
    for p, name in enumerate(("cond", "uncond")):
        maps = trace.passes[name]
        assert maps.steps == [1] and maps.grid == grid
        for (kind, index), (q, k) in zip(blocks, calls[(2 + p) * len(blocks) :]):
            scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
            probs = scores.softmax(-1)
            probs = probs.mean(1) if heads == "mean" else probs[:, heads].mean(1)  # [B, S, S]
            rows = probs[:, tokens]
            txt_img = maps[kind, index, -1, "txt->img"]
            torch.testing.assert_close(txt_img, rows[:, :, n_txt:].reshape(1, 3, *grid).float())
            torch.testing.assert_close(maps.to_text[kind, index, 1], rows[:, :, :n_txt].float())
            # a row of a softmax: image part + text part = 1
            total = txt_img.sum((-2, -1)) + maps.to_text[kind, index, 1].sum(-1)
            torch.testing.assert_close(total, torch.ones(1, 3), atol=1e-5, rtol=0)
            img_txt = probs[:, n_txt:, tokens].transpose(1, 2).reshape(1, 3, *grid).float()
            torch.testing.assert_close(maps[kind, index, -1, "img->txt"], img_txt)


def test_concept_maps_are_a_softmax_over_tokens_of_attention_outputs(tiny, monkeypatch):
    pipe = tiny[0]
    opts = small_sampling(num_steps=2)
    outputs = []  # each attention call's output [B, S, heads, d], as the processor gets it
    dispatch = transformer_flux.dispatch_attention_fn

    def spy(query, key, value, *args, **kw):
        outputs.append(dispatch(query, key, value, *args, **kw))
        return outputs[-1]

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", spy)
    tokens = [*token_indices(pipe, opts.prompt, ["photo", "cat"]).values(), 12]
    with AttentionTrace(
        pipe.transformer, tokens=tokens, steps=(-1,), num_steps=2, direction="txt->img, concept"
    ) as trace:
        generate(pipe, opts, seed=3)
    maps = trace.maps
    assert maps.directions == ("txt->img", "concept")
    t = pipe.transformer
    blocks = [("double", i) for i in range(len(t.transformer_blocks))]
    blocks += [("single", i) for i in range(len(t.single_transformer_blocks))]
    n_txt, grid = opts.max_sequence_length, opts.token_grid
    for (kind, index), out in zip(blocks, outputs[len(blocks) :], strict=True):
        o = out.double().flatten(2)  # [B, S, heads * d]
        sim = o[:, n_txt:] @ o[:, tokens].transpose(1, 2)  # [B, N, T]
        expected = sim.softmax(-1).transpose(1, 2).reshape(1, 3, *grid).float()
        torch.testing.assert_close(maps[kind, index, -1, "concept"], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="both directions"):
        maps["single", 0, -1]


# -- (3) hooks never outlive the context --------------------------------------------------------------
def test_hooks_are_removed_after_an_exception(tiny):
    pipe = tiny[0]
    opts = small_sampling()
    before = hook_count(pipe.transformer)
    dispatch = transformer_flux.dispatch_attention_fn
    processors = {
        n: id(m.processor) for n, m in pipe.transformer.named_modules() if n.endswith("attn")
    }
    reference = latents(pipe, opts)

    def stop(pipe_, step, timestep, kwargs):
        if step == 1:
            raise RuntimeError("interrupted")
        return {}

    with pytest.raises(RuntimeError, match="interrupted"):
        with AttentionTrace(pipe.transformer, tokens=[1]) as trace:
            assert hook_count(pipe.transformer) > before
            generate(pipe, opts, seed=0, callback=stop)
    assert hook_count(pipe.transformer) == before
    # the trace's own error (a position past the text) also leaves nothing behind
    with pytest.raises(InvalidArgumentError) as err:
        with AttentionTrace(pipe.transformer, tokens=[40]):
            generate(pipe, opts, seed=0)
    assert err.value.param == "tokens" and "32 T5 tokens" in str(err.value)
    assert hook_count(pipe.transformer) == before
    after = {n: id(m.processor) for n, m in pipe.transformer.named_modules() if n.endswith("attn")}
    assert after == processors
    assert (
        transformer_flux.dispatch_attention_fn is dispatch
    )  # the attention call is diffusers' again
    assert torch.equal(latents(pipe, opts), reference)
    assert trace.maps.steps == [0, 1]  # what was recorded before the interruption stays


# -- (4) errors name their parameter ---------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(tokens=[]), "tokens"),
        (dict(tokens="cat"), "tokens"),
        (dict(tokens=[-1]), "tokens"),
        (dict(tokens=[2, 2]), "tokens"),
        (dict(tokens=[1], double_blocks=[5]), "double_blocks"),
        (dict(tokens=[1], single_blocks="0-9"), "single_blocks"),
        (dict(tokens=[1], single_blocks="x"), "single_blocks"),
        (dict(tokens=[1], steps=(-1,)), "steps"),
        (dict(tokens=[1], steps=(7,), num_steps=4), "steps"),
        (dict(tokens=[1], heads=[2]), "heads"),
        (dict(tokens=[1], heads="max"), "heads"),
        (dict(tokens=[1], direction="img->img"), "direction"),
        (dict(tokens=[1], passes="negative"), "passes"),
        (dict(tokens=[1], max_scores=0), "max_scores"),
        (dict(tokens=[1], logsumexp="lse"), "logsumexp"),
        (dict(tokens=[1], passes_per_step=3), "passes_per_step"),
        (dict(options=AttentionOptions(tokens=[1]), tokens=[2]), "options"),
    ],
)
def test_selection_errors_name_the_parameter(tiny, kwargs, param):
    with pytest.raises(InvalidArgumentError) as err:
        AttentionTrace(tiny[0].transformer, **kwargs)
    assert err.value.param == param
    assert str(err.value).startswith(param)


def test_token_indices_find_the_words(tiny, toy):
    assert token_indices(toy[0], TOY_PROMPT, ["circle", "Background"]) == {
        "circle": 2,
        "Background": 6,
    }
    assert token_indices(toy[0], TOY_PROMPT, "a") == {"a": 0}  # first occurrence
    assert token_indices(tiny[0], "a photo of a cat.", ["cat"]) == {"cat": 9}  # first of 3 pieces
    with pytest.raises(InvalidArgumentError) as err:
        token_indices(toy[0], TOY_PROMPT, ["circle", "dog"])
    assert err.value.param == "words" and "dog" in str(err.value)


# -- files and pictures -----------------------------------------------------------------------------
def test_maps_save_and_load(tiny, tmp_path):
    pipe = tiny[0]
    opts = small_sampling()
    words = token_indices(pipe, opts.prompt, ["photo", "cat"])
    with AttentionTrace(pipe.transformer, tokens=words, single_blocks="-1", direction="both") as tr:
        generate(pipe, opts, seed=0)
    maps = tr.maps
    assert maps.tokens == ("photo", "cat") and maps.num_steps == 4
    assert maps["single", -1, -1, "img->txt"].shape == (1, 2, 4, 4)
    assert ("single", 0, 0, "txt->img") not in maps and ("double", 1, 3, "txt->img") in maps
    with pytest.raises(KeyError, match="both directions"):
        maps["double", 0, 0]
    assert maps.stack("txt->img").shape == (2 + 1, 4, 1, 2, 4, 4)
    path = save_attention(maps, tmp_path / "attention.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["attention.safetensors"]
    back = load_attention(path)
    assert back.metadata() == maps.metadata()
    assert back.tensors.keys() == maps.tensors.keys() and back.to_text.keys() == maps.to_text.keys()
    assert all(torch.equal(back.tensors[k], v) for k, v in maps.tensors.items())
    assert all(torch.equal(back.to_text[k], v) for k, v in maps.to_text.items())
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CaptureFileError):
        load_attention(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CaptureFileError, match="not a flux-ir attention file"):
        load_attention(tmp_path / "other.safetensors")


def test_overlay_is_a_labelled_grid(tiny):
    pipe = tiny[0]
    opts = small_sampling()
    words = token_indices(pipe, opts.prompt, ["photo", "cat"])
    with AttentionTrace(pipe.transformer, tokens=words, steps="0,-1", num_steps=4) as trace:
        image = generate(pipe, opts, seed=0).images[0]
    grid = attention_overlay(image, trace.maps, cell=32)
    assert isinstance(grid, Image.Image)
    rows, cols = 6, 2 * 2  # blocks; tokens x steps
    assert grid.height > rows * 32 and grid.width > cols * 32
    one = attention_overlay(image, trace.maps, "cat", blocks=[("single", -1)], steps=[-1], cell=32)
    assert one.width < grid.width and one.height < grid.height
    with pytest.raises(InvalidArgumentError) as err:
        attention_overlay(image, trace.maps, normalise="row")
    assert err.value.param == "normalise"


# -- (5) what flux-toy's maps show ----------------------------------------------------------------
LATE_STEPS = (12, 13, 14, 15)  # the last quarter of flux-toy's 16 steps


def shape_mask(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The checker's shape mask (pixels far from the median border colour), as the fraction of each
    image token's 16x16 pixels inside it: [B, H/16, W/16]."""
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1
    )
    bg = border.median(dim=-1).values
    mask = (images - bg[:, :, None, None]).norm(dim=1) > FOREGROUND_DISTANCE
    return F.adaptive_avg_pool2d(mask[:, None].float(), grid)[:, 0]


def test_flux_toy_circle_attends_inside_the_shape_more_than_background(toy):
    """Seed 0, default sampling: at the last four steps (maps averaged), the share of each map's mass
    inside the shape is larger for "circle" than for "background" in 10 of the 12 blocks, in both
    directions (double 0 and 2 are the exceptions for txt->img, double 1 and single 4 for img->txt)."""
    pipe, spec = toy
    opts = SamplingOptions.from_spec(spec, prompt=TOY_PROMPT)
    words = token_indices(pipe, TOY_PROMPT, ["circle", "background"])
    with AttentionTrace(pipe.transformer, tokens=words, steps=LATE_STEPS, direction="both") as tr:
        images = generate(pipe, opts, seed=0, output_type="pt").images
    mask = shape_mask(images, opts.token_grid)[0]
    assert 0.1 < mask.mean() < 0.5  # a shape was drawn
    maps = tr.maps
    report, wins = [], {}
    for direction in ("txt->img", "img->txt"):
        wins[direction] = 0
        for kind, idx in maps.blocks.items():
            for i in idx:
                m = torch.stack([maps[kind, i, s, direction][0] for s in LATE_STEPS]).mean(0)
                inside = (m * mask).sum((-2, -1)) / m.sum((-2, -1))  # [T]: circle, background
                wins[direction] += int(inside[0] > inside[1])
                report.append(f"{direction} {kind} {i}: {inside[0]:.3f} vs {inside[1]:.3f}")
    print("\n".join(report))
    assert min(wins.values()) >= 9, "\n".join(report)  # measured: 10 and 10 of 12


# -- (6) maps recorded with a capture live in its files -------------------------------------------
def test_kernel_logsumexp_is_used_and_matches_the_exact_one(tiny):
    """On the CPU SDPA runs the flash kernel, whose logsumexp normalises img->txt; the side
    computation ("exact") gives the same maps."""
    pipe = tiny[0]
    opts = small_sampling(num_steps=2, **CFG)
    runs = {}
    for mode in ("auto", "exact"):
        with AttentionTrace(
            pipe.transformer, tokens=[1, 3], direction="img->txt", passes="both", logsumexp=mode
        ) as trace:
            runs[mode] = latents(pipe, opts)
        runs[mode, "maps"], runs[mode, "count"] = trace.passes, dict(trace.normalised)
    n = 2 * 2 * 6  # steps x passes x blocks
    assert runs["auto", "count"] == {"kernel": n, "exact": 0}
    assert runs["exact", "count"] == {"kernel": 0, "exact": n}
    assert torch.equal(runs["auto"], runs["exact"])
    for name in ("cond", "uncond"):
        kernel, exact = runs["auto", "maps"][name], runs["exact", "maps"][name]
        assert kernel.tensors.keys() == exact.tensors.keys()
        for key, value in exact.tensors.items():
            torch.testing.assert_close(kernel.tensors[key], value)


@pytest.fixture(scope="module")
def attention_capture(tiny, tmp_path_factory):
    """flux-tiny with true CFG: a capture with both passes' maps in both directions, saved as .pt
    and streamed to shards, and the same run without maps."""
    from flux_ir.capture import CaptureOptions, Selection, run_capture
    from flux_ir.store import ShardWriter, save_capture

    pipe, spec = tiny
    opts = CaptureOptions(small_sampling(**CFG), seed=2)
    words = token_indices(pipe, opts.sampling.prompt, ["photo", "cat"])
    att = AttentionOptions(tokens=words, direction="both", passes="both", steps="0,-1")
    sel = Selection(single_blocks=(-2, -1), steps=(0, -1))
    root = tmp_path_factory.mktemp("attention_capture")
    images, cap = run_capture(pipe, opts, model_name=spec.name, selection=sel, attention=att)
    plain_images, plain = run_capture(pipe, opts, model_name=spec.name, selection=sel)
    pt = save_capture(cap, root / "capture.pt")
    writer = ShardWriter(root / "shards")
    _, streamed = run_capture(
        pipe, opts, model_name=spec.name, selection=sel, attention=att, sink=writer, progress=False
    )
    shards = writer.finish(streamed)
    return cap, plain, images, plain_images, pt, shards


def same_maps(a, b) -> None:
    assert a.metadata() == b.metadata()
    assert a.tensors.keys() == b.tensors.keys() and a.to_text.keys() == b.to_text.keys()
    for key, value in a.tensors.items():
        assert torch.equal(b.tensors[key], value), key
    for key, value in a.to_text.items():
        assert torch.equal(b.to_text[key], value), key


def test_a_capture_holds_its_maps_and_the_run_is_unchanged(attention_capture):
    cap, plain, images, plain_images, *_ = attention_capture
    assert [i.tobytes() for i in images] == [i.tobytes() for i in plain_images]
    assert torch.equal(
        cap.denoising_context["final_latents"], plain.denoising_context["final_latents"]
    )
    assert torch.equal(cap["single", -1, -1], plain["single", -1, -1])
    assert plain.attention is None and "attention" not in plain.to_dict()
    maps = cap.attention
    assert maps.pass_name == "cond" and cap.attention_uncond.pass_name == "uncond"
    assert maps.tokens == ("photo", "cat") and maps.steps == [0, 3]
    assert maps["double", 0, -1, "txt->img"].shape == (1, 2, 4, 4)  # [B, T, H/16, W/16]
    assert maps.to_text["single", 3, 0].shape == (1, 2, 32)  # [B, T, L]
    assert "attention of ['photo', 'cat']" in repr(cap)
    assert all(t.device.type == "cpu" for t in maps.tensors.values())


@pytest.mark.parametrize("form", ["pt", "shards"])
def test_maps_round_trip_through_the_capture_files(attention_capture, form):
    cap, *_, pt, shards = attention_capture
    from flux_ir.store import verify_capture

    path = pt if form == "pt" else shards
    verify_capture(path)
    back = load_capture(path, verify=True)
    same_maps(cap.attention, back.attention)
    same_maps(cap.attention_uncond, back.attention_uncond)
    torch.testing.assert_close(back.attention.stack("img->txt"), cap.attention.stack("img->txt"))


def test_the_shards_loader_reads_maps_only_when_asked(attention_capture):
    *_, shards = attention_capture
    cap = load_capture(shards)
    cap["single", -1, -1]  # block tensors: read from their shard
    assert "attention.safetensors" not in cap.reader.opened
    assert cap.attention.tokens == ("photo", "cat")  # metadata is in the manifest
    assert "attention.safetensors" not in cap.reader.opened
    assert cap.attention["single", -1, -1, "txt->img"].shape == (1, 2, 4, 4)
    assert "attention.safetensors" in cap.reader.opened


def test_a_damaged_attention_file_is_named(attention_capture, tmp_path):
    *_, shards = attention_capture
    from flux_ir.store import verify_capture

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    f = copy / "attention.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    f.write_bytes(bytes(data))
    with pytest.raises(CaptureFileError, match=r"attention.safetensors is damaged: the bytes of"):
        verify_capture(copy)
    f.unlink()
    with pytest.raises(CaptureFileError, match="attention.safetensors is truncated or missing"):
        load_capture(copy)


def test_a_foreign_attention_entry_is_refused(tmp_path):
    data = {"double_blocks": {}, "single_blocks": {}, "denoising_context": {}, "metadata": {}}
    for entry, match in (
        ({"cond": {"metadata": {"format": "other"}, "tensors": {}}}, "format 'other'"),
        ({"cond": {"tensors": {}}}, "'attention' entry is not flux-ir attention maps"),
    ):
        torch.save({**data, "attention": entry}, tmp_path / "capture.pt")
        with pytest.raises(CaptureFileError, match=match) as err:
            load_capture(tmp_path / "capture.pt")
        assert "capture.pt" in str(err.value)
