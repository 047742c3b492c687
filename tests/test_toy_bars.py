"""flux-toy's science bars (`flux_ir.toy.bars`): the lens against decoding x_k, the neutral grid's
phases read twice, settling over denoising; on the shipped weights, in cheap versions."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from flux_ir.cli import run_fire
from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import unpack_latents
from flux_ir.models import load_pipeline
from flux_ir.models.toy import has_toy_weights
from flux_ir.plots.toy import plot_lens_baseline, plot_settling
from flux_ir.sampling import SamplingOptions, generate
from flux_ir.toy.bars import (
    ATTRIBUTES,
    LatentReader,
    boundary_ratio,
    class_shares,
    labelled_renders,
    lens_prompts,
    measure_lens,
    measure_phases,
    measure_settling,
    resolve_steps,
    settling_summary,
    spearman,
    train_latent_reader,
)
from flux_ir.toy.checker import NO_SHAPE
from flux_ir.toy.cli import quality
from flux_ir.toy.scenes import COLOURS, SHAPES

needs_weights = pytest.mark.skipif(not has_toy_weights(), reason="flux-toy weights not shipped")
MID, LAST = 2, 3  # the lens test samples 4 steps (middle: steps 1 and 2)


# ----------------------------------------------------------------------------- no model


def test_spearman_is_rank_correlation_with_average_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 1, 0, -5]) == pytest.approx(-1.0)
    # ranks x 1..4, y (1.5, 1.5, 3, 4): Pearson of the ranks
    assert spearman([1, 2, 3, 4], [5, 5, 6, 7]) == pytest.approx(
        np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 3, 4])[0, 1]
    )
    assert np.isnan(spearman([1, 2, 3], [2, 2, 2]))


def test_boundary_ratio_of_two_halves():
    classes = np.zeros((4, 4), dtype=int)
    classes[:, 2:] = 1  # columns 1 and 2 touch the other class
    lip = np.ones((4, 4))
    lip[:, 1:3] = 5.0
    r = boundary_ratio(lip, classes)
    assert r["boundary_share"] == 0.5
    assert r["ratio"] == pytest.approx(5.0)
    assert np.isnan(boundary_ratio(lip, np.zeros((4, 4)))["ratio"])  # no boundary at all


def test_class_shares_list_every_class_and_sum_to_one():
    shares = class_shares([NO_SHAPE, 0, 0, 2], {NO_SHAPE: "none", **dict(enumerate(SHAPES))})
    assert list(shares) == ["none", *SHAPES]
    assert shares["circle"] == 0.5 and shares["square"] == 0.0
    assert sum(shares.values()) == pytest.approx(1.0)


def test_resolve_steps_refuses_steps_outside_the_run():
    assert resolve_steps([-1, 4, 4], 16) == [4, 15]
    with pytest.raises(InvalidArgumentError, match="lens_steps must lie in"):
        resolve_steps("3,16", 16, "lens_steps")


def test_quality_refuses_a_lens_step_before_loading_a_model(capsys):
    argv = ["--science_only", "--lens_steps", "3,16"]
    assert run_fire(quality, argv, name="toy_quality.py") == 2
    assert "--lens_steps must lie in [-16, 16) for 16 steps, got 16" in capsys.readouterr().err


def test_labelled_renders_mix_plain_backgrounds_without_a_colour():
    images, labels = labelled_renders(64, 32, seed=3)
    plain = labels["shape"] == len(SHAPES)
    assert 0 < plain.sum() < 64
    assert (labels["colour"][plain] == -100).all() and (labels["colour"][~plain] >= 0).all()
    flat = images[plain].flatten(2)
    assert (flat.std(-1) == 0).all()  # one colour per plain image
    assert (labels["background"] < len(COLOURS)).all()


def test_plots_write_pngs(tmp_path):
    rows = [
        dict(
            reader=r, attribute=a, step=s, same=min(1, 0.3 * s), settled=min(1, 0.25 * s), points=4
        )
        for r in ("checker", "latent")
        for a in ATTRIBUTES
        for s in range(5)
    ]
    plot_settling(pd.DataFrame(rows), tmp_path / "settling.png", title="t")
    lens = pd.DataFrame(
        [
            dict(block=f"single {d}", depth=d, step=s, relative=0.5 - d * s / 10)
            for d in range(3)
            for s in (4, 8)
        ]
    )
    plot_lens_baseline(lens, tmp_path / "lens.png")
    for name in ("settling.png", "lens.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the shipped weights


@pytest.fixture(scope="module")
def toy():
    if not has_toy_weights():
        pytest.skip("flux-toy weights not shipped")
    pipe, spec = load_pipeline("flux-toy")
    return pipe, spec, SamplingOptions.from_spec(spec, num_steps=4)  # true CFG 2, 128²


@pytest.fixture(scope="module")
def lens(toy):
    pipe, spec, opts = toy
    return measure_lens(
        pipe, opts, lens_prompts(1), steps=(MID, LAST), seed=5, model_name=spec.name,
        double_blocks=(0,), single_blocks=(-1,),
    )  # fmt: skip


def decode(pipe, packed, size):
    """Packed latents -> images [B, 3, H, W] in [0, 1], straight through the VAE (no flux_ir code)."""
    z = unpack_latents(packed.float(), size, size)
    cfg = pipe.vae.config
    with torch.inference_mode():
        x = pipe.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample
    return (x / 2 + 0.5).clamp(0, 1)


@needs_weights
def test_the_baseline_is_decoding_x_k_and_the_target_the_final_image(toy, lens):
    """Sampled again outside the capture: x_k from the sampler's own callback, decoded directly."""
    pipe, _, opts = toy
    kept = {}

    def keep(p, i, t, kwargs):
        kept[i + 1] = kwargs["latents"].clone()  # the latents after step i are x_{i+1}
        return {}

    sampling = replace(opts, prompt=lens_prompts(1)[0])
    out = generate(pipe, sampling, seed=5, callback=keep, output_type="latent")
    size = opts.height
    final = decode(pipe, out.images, size)
    for k in (MID, LAST):
        want = (decode(pipe, kept[k], size) - final).pow(2).mean().item()
        got = lens.per_prompt[lens.per_prompt.step == k].latent_mse.unique()
        assert len(got) == 1 and got[0] == pytest.approx(want, rel=1e-4)
    # the previous step's x0, from the same two latents
    s = pipe.scheduler.sigmas
    v = (kept[LAST] - kept[LAST - 1]) / (s[LAST] - s[LAST - 1])
    want = (decode(pipe, kept[LAST - 1] - s[LAST - 1] * v, size) - final).pow(2).mean().item()
    assert lens.table[lens.table.step == LAST].prev_x0_mse.iloc[0] == pytest.approx(want, rel=1e-3)


@needs_weights
def test_the_last_blocks_lens_at_the_last_step_is_the_final_image(lens):
    t = lens.table
    last = t[(t.step == LAST) & (t.block == "single 7")]
    assert last.lens_mse.item() < 1e-10
    assert last.beats.item()  # and so it beats x_k, which is still noisy
    assert set(t.depth) == {0, 11}  # depth in the model: double 0, single 7


@needs_weights
def test_lens_summary_counts_what_the_table_says(lens):
    t, s = lens.table, lens.summary
    assert (t.improvement - (t.latent_mse - t.lens_mse)).abs().max() < 1e-12
    for step in (MID, LAST):
        part = t[t.step == step]
        per = s["per_step"][step]
        assert per["blocks_beating"] == int((part.lens_mse < part.latent_mse).sum())
        assert per["share_beating"] == pytest.approx(per["blocks_beating"] / len(part))
    assert s["mid_steps"] == [MID] and s["steps"] == [MID, LAST]
    # x_k halfway is still noisy: far from the final image, and the last block beats it
    assert s["per_step"][MID]["latent_mse"] > s["per_step"][LAST]["latent_mse"]
    assert t[(t.step == MID) & (t.depth == 11)].beats.item()


@pytest.fixture(scope="module")
def phases(toy, tmp_path_factory):
    pipe, spec, opts = toy
    torch.manual_seed(0)
    reader = LatentReader()  # untrained: the plumbing, not the accuracy
    out = tmp_path_factory.mktemp("grid")
    return measure_phases(pipe, opts, out, grid=3, reader=reader, model_name=spec.name), reader


@needs_weights
def test_phase_shares_sum_to_one_per_reading_and_attribute(phases):
    report, _ = phases
    assert len(report.points) == 9
    for source in ("checker", "latent"):
        for attribute, shares in report.summary[source]["shares"].items():
            assert sum(shares.values()) == pytest.approx(1.0), (source, attribute)
        assert set(report.summary[source]["lipschitz"]) == {"scene", *ATTRIBUTES}
    assert report.points.lipschitz.notna().all()
    assert (report.points.checker_shape.isin([NO_SHAPE, 0, 1, 2])).all()


@needs_weights
def test_settling_ends_settled_and_never_unsettles(toy, phases):
    pipe, _, _ = toy
    report, reader = phases
    st = measure_settling(pipe, report, points=2, reader=reader)
    t = st.table
    assert set(t.step) == {0, 1, 2, 3}
    last = t[t.step == 3]
    assert (last.same == 1).all() and (last.settled == 1).all()
    assert (t.settled <= t.same + 1e-12).all()
    for _, part in t.groupby(["reader", "attribute"]):
        assert part.sort_values("step").settled.is_monotonic_increasing
    assert set(t[t.reader == "checker"].points) == {2} and set(t[t.reader == "latent"].points) == {
        9
    }
    summary = settling_summary(st)
    assert summary["checker"]["shape"]["settled_90%_at_step"] <= 3


@needs_weights
@pytest.mark.slow
def test_the_latent_reader_reads_held_out_renders(toy):
    pipe, _, _ = toy
    _, accuracy = train_latent_reader(pipe, n_train=384, n_test=128, seed=0)
    assert accuracy["background"] >= 0.95
    assert accuracy["colour"] >= 0.95
    assert accuracy["shape"] >= 0.75  # 85% measured on 256 renders; 96% with 1,024 to train on
