"""Per-block metrics of a capture: the DataFrame's identities, the lens columns, CSV and heatmaps."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flux_ir.analysis.block_metrics import (
    COLUMNS,
    block_metrics,
    metric_grid,
    read_metrics_csv,
    save_metrics_csv,
)
from flux_ir.analysis.clip_score import ClipPromptScorer
from flux_ir.lens import BlockStep, decode_capture
from flux_ir.lens.decode import decode_packed
from flux_ir.plots.block_metrics import save_metric_heatmaps
from flux_ir.workflows.metrics_run import capture_metrics

BLOCKS = ["double 0", "double 1", "single 0", "single 1", "single 2", "single 3"]


@pytest.fixture(scope="module")
def lens(tiny, tiny_capture):
    """Every (block, step)'s "next" lens decode and the final image of the flux-tiny capture."""
    pipe, _ = tiny
    _, cap = tiny_capture
    images = {item: ims[0] for item, ims in decode_capture(pipe, cap, None, "next", progress=False)}
    md = cap.metadata
    final = decode_packed(pipe, cap.denoising_context["final_latents"], md["height"], md["width"])
    return images, final[0]


def test_one_row_per_block_step_and_stream_in_depth_order(tiny_capture):
    _, cap = tiny_capture
    df = block_metrics(cap)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 6 * 4 * 2
    assert list(df.drop_duplicates("depth")["name"]) == BLOCKS
    assert set(df["stream"]) == {"img", "txt"} and set(df["step"]) == {0, 1, 2, 3}
    assert (df["norm"] > 0).all()
    assert df["lens_distance"].isna().all() and df["clip_to_prompt"].isna().all()
    assert df.attrs["last_block"] == "single 3"


def test_the_last_block_is_its_own_cosine_one_and_others_are_below(tiny_capture):
    _, cap = tiny_capture
    df = block_metrics(cap)
    last = df[df["name"] == "single 3"]
    assert np.allclose(last["cosine_to_last"], 1.0, atol=1e-5)
    assert (df["cosine_to_last"].between(-1 - 1e-6, 1 + 1e-6)).all()
    assert (df[df["name"] == "double 0"]["cosine_to_last"] < 0.999).all()
    img = cap.image_tokens("double", 1, 2)[0].float()  # the norm is the mean token norm
    row = df[(df["name"] == "double 1") & (df["step"] == 2) & (df["stream"] == "img")]
    assert row["norm"].item() == pytest.approx(float(img.norm(dim=-1).mean()), rel=1e-6)


def test_the_last_blocks_next_lens_at_the_last_step_is_the_final_image(tiny_capture, lens):
    _, cap = tiny_capture
    images, final = lens
    df = block_metrics(cap, lens_images=images, final_image=final)
    img = df[df["stream"] == "img"]
    assert img["lens_distance"].notna().all()
    assert df[df["stream"] == "txt"]["lens_distance"].isna().all()
    end = img[(img["name"] == "single 3") & (img["step"] == 3)]["lens_distance"].item()
    assert end < 1 / 255  # the pipeline's own last latent, decoded alike
    assert img[img["step"] == 0]["lens_distance"].min() > end


def test_clip_similarity_to_the_prompt_with_a_scorer(tiny_capture, lens):
    _, cap = tiny_capture
    images, final = lens
    scorer = ClipPromptScorer.tiny()
    df = block_metrics(cap, lens_images=images, final_image=final, scorer=scorer)
    img = df[df["stream"] == "img"]
    assert img["clip_to_prompt"].between(-1, 1).all()
    assert df[df["stream"] == "txt"]["clip_to_prompt"].isna().all()
    item = BlockStep("single", 1, 2)
    expected = scorer([images[item]], cap.metadata["prompt"])[0]
    row = img[(img["name"] == "single 1") & (img["step"] == 2)]
    assert row["clip_to_prompt"].item() == pytest.approx(float(expected), abs=1e-6)
    assert df.attrs["scorer"] == "clip-tiny"


def test_csv_round_trip_metric_grid_and_heatmaps(tiny_capture, tmp_path):
    _, cap = tiny_capture
    df = block_metrics(cap)
    back = read_metrics_csv(save_metrics_csv(df, tmp_path / "m.csv"))
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    grid = metric_grid(df, "cosine_to_last", "txt")
    assert list(grid.index) == BLOCKS and list(grid.columns) == [0, 1, 2, 3]
    paths = save_metric_heatmaps(df, tmp_path / "heat")
    assert set(paths) == {"norm_img", "norm_txt", "cosine_to_last_img", "cosine_to_last_txt"}
    assert all(Image.open(p).format == "PNG" for p in paths.values())


def test_capture_metrics_reads_the_runs_decodes_and_writes_the_csv(tiny, tmp_path):
    from flux_ir.workflows import capture_to_dir

    from .conftest import small_opts

    pipe, spec = tiny
    run_dir = capture_to_dir(pipe, spec, small_opts(num_steps=2), tmp_path)
    df = capture_metrics(run_dir, heatmaps=False)  # no model: every decode is on disk
    csv = run_dir / "intermediates" / "block_metrics.csv"
    assert csv.is_file() and len(read_metrics_csv(csv)) == len(df) == 6 * 2 * 2
    assert df[df["stream"] == "img"]["lens_distance"].notna().all()
