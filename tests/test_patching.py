"""The causal map: each site's effect is what patching that site alone does; its files; and on
flux-toy, patching a block's image tokens from an early step on carries the source's colour."""

import csv
import json

import numpy as np
import pytest

from flux_ir.capture import CaptureOptions, Selection, run_capture
from flux_ir.errors import InvalidArgumentError
from flux_ir.intervene import Intervention, Site, patch_edits
from flux_ir.models.toy import has_toy_weights
from flux_ir.sampling import generate
from flux_ir.workflows.ablation import block_importance
from flux_ir.workflows.patching import causal_map

from .conftest import small_opts


def test_each_sites_effect_is_that_of_patching_it_alone(tiny):
    pipe, _ = tiny
    target, source = small_opts(prompt="a red circle"), small_opts(prompt="a green square", seed=5)
    sel = Selection(double_blocks=(1,), single_blocks=(0, -1), steps=(0, 2))
    cmap = causal_map(pipe, target, source, selection=sel, batch_size=4, progress=False)
    assert cmap.rows == [("double", 1), ("single", 0), ("single", 3)] and cmap.steps == [0, 2]
    assert cmap.effect.shape == (3, 2) and np.isfinite(cmap.effect).all()

    _, cap = run_capture(pipe, source, progress=False)
    plain = generate(pipe, target.sampling, seed=target.seed, output_type="pt").images
    other = generate(pipe, source.sampling, seed=source.seed, output_type="pt").images
    with Intervention(pipe.transformer, patch_edits(cap, [Site("single", 3, steps=(2,))])):
        alone = generate(pipe, target.sampling, seed=target.seed, output_type="pt").images
    expected = float((alone - plain).abs().mean() / (other - plain).abs().mean())
    assert cmap.effect[2, 1] == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_a_causal_map_writes_its_table_heatmap_and_grid(tiny, tmp_path):
    pipe, _ = tiny
    sel = Selection(double_blocks=(0,), single_blocks=(), steps=(0, 1, 2))
    cmap = causal_map(
        pipe, small_opts(), small_opts(prompt="blue"), selection=sel, batch_size=2, progress=False
    )
    paths = cmap.save(tmp_path)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and [int(r["step"]) for r in rows] == [0, 1, 2]
    assert json.loads(paths["json"].read_text())["effect"] == cmap.effect.tolist()
    assert paths["heatmap"].stat().st_size > 1000 and paths["grid"].is_file()
    assert repr(cmap).startswith("CausalMap(1 blocks x 3 steps")


def test_mismatched_runs_and_spans_are_refused(tiny):
    pipe, _ = tiny
    with pytest.raises(
        InvalidArgumentError, match="^source: the source must have the target's size"
    ):
        causal_map(pipe, small_opts(), small_opts(num_steps=2), progress=False)
    with pytest.raises(InvalidArgumentError, match="^span 'all': choose one of step, from, until"):
        causal_map(pipe, small_opts(), small_opts(), span="all", progress=False)


def test_zeroing_a_block_is_measured_per_block(tiny):
    pipe, _ = tiny
    table = block_importance(pipe, small_opts(num_steps=2), batch_size=4, progress=False)
    assert list(table["kind"]) == ["double"] * 2 + ["single"] * 4
    assert (table["effect"] > 0).all()


@pytest.mark.skipif(not has_toy_weights(), reason="no flux-toy weights")
def test_patching_image_tokens_from_the_first_step_on_carries_the_sources_colour(toy_pipe):
    from flux_ir.toy.checker import check_images
    from flux_ir.toy.scenes import COLOURS

    pipe, spec = toy_pipe
    target = CaptureOptions.from_spec(spec, seed=0, prompt="a red circle on a blue background")
    source = CaptureOptions.from_spec(spec, seed=0, prompt="a green circle on a blue background")

    def classify(images):
        return {"colour": check_images(images).colour}

    sel = Selection(double_blocks=(), single_blocks=(3,), steps=(0, 15))
    cmap = causal_map(
        pipe, target, source, selection=sel, span="from", classify=classify, progress=False
    )
    red, green = COLOURS.index("red"), COLOURS.index("green")
    assert cmap.target_readings["colour"] == red and cmap.source_readings["colour"] == green
    assert cmap.readings["colour"].tolist() == [
        [green, red]
    ]  # from step 0: green; last step only: red
