"""What a notebook user meets: short reprs, denoising-step and negative-block indexing, stacked
tensors, the lens mosaic as an image, and no change of matplotlib's backend on import."""

import subprocess
import sys

import pytest
import torch

from flux_ir.capture import Selection, run_capture

from .conftest import small_opts


@pytest.fixture(scope="module")
def partial(tiny):
    pipe, spec = tiny
    sel = Selection(double_blocks=(1,), single_blocks=(0, -1), steps=(1, 3))
    return run_capture(pipe, small_opts(), model_name=spec.name, selection=sel)[1]


def test_a_capture_shows_itself_in_one_short_line(tiny_capture, partial):
    text = repr(partial)
    assert "\n" not in text and len(text) < 300
    assert text.startswith("Capture(flux-tiny, 'a photo of a cat', 64x64, steps 1,3 of 4")
    assert "double 1, single 0,3" in text and "KiB" in text
    assert len(repr(tiny_capture[1])) < 300  # not 315,000 characters of tensors


def test_steps_are_denoising_steps_and_blocks_may_count_from_the_end(tiny_capture, partial):
    full = tiny_capture[1]
    assert torch.equal(partial["single", 3, 3], full["single", 3, 3])
    assert torch.equal(partial["single", -1, -1], full["single", 3, 3])
    assert torch.equal(partial.image_tokens("double", -1, 1), full.image_tokens("double", 1, 1))
    with pytest.raises(
        KeyError, match="denoising step 2 was not captured \\(captured steps: 1,3 of 4\\)"
    ):
        partial["single", 0, 2]
    with pytest.raises(KeyError, match="single block 2 was not captured .* the model has 4"):
        partial["single", 2]


def test_stack_gives_blocks_by_steps_of_one_stream(tiny_capture, partial):
    full = tiny_capture[1]
    img = partial.stack("single", "img")
    assert img.shape == (2, 2, 1, 16, 32)
    assert torch.equal(img[1, 0], full.image_tokens("single", 3, 1))
    txt = full.stack("double", "txt")
    assert txt.shape == (2, 4, 1, 32, 32)
    assert torch.equal(txt[0, 2], full.text_tokens("double", 0, 2))


def test_importing_the_plots_leaves_matplotlibs_backend_alone():
    code = (
        "import matplotlib; matplotlib.use('svg'); import flux_ir.plots.sweep, flux_ir.plots; "
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"


def test_the_lens_mosaic_comes_back_as_an_image_equal_to_the_written_one(
    tiny, tiny_capture, tmp_path
):
    from PIL import Image

    from flux_ir.plots import lens_mosaic
    from flux_ir.workflows import decode_to_dir

    pipe, _ = tiny
    cap = tiny_capture[1]
    mosaic = lens_mosaic(pipe, cap, progress=False)
    assert not list(tmp_path.iterdir())
    assert mosaic.size[1] > 6 * 96 and mosaic.size[0] > 4 * 96  # 6 blocks x 4 steps of 96 px
    path = decode_to_dir(pipe, cap, tmp_path, progress=False)
    written = Image.open(path).convert("RGB")
    assert written.size == mosaic.size


def test_a_capture_shows_a_denoising_progress_bar_and_leaves_the_pipelines_setting(tiny, capsys):
    pipe, spec = tiny
    before = dict(pipe._progress_bar_config)
    run_capture(pipe, small_opts(num_steps=2), model_name=spec.name)
    assert "denoising" in capsys.readouterr().err
    run_capture(pipe, small_opts(num_steps=2), model_name=spec.name, progress=False)
    assert "denoising" not in capsys.readouterr().err
    assert pipe._progress_bar_config == before


def test_importing_diffusers_through_flux_ir_prints_no_torchvision_notes():
    code = "import flux_ir.models; from diffusers import FluxPipeline"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torchvision" not in out.stderr


def test_flux_toys_default_prompt_is_one_it_knows():
    from flux_ir.models import resolve_model
    from flux_ir.sampling import SamplingOptions

    assert SamplingOptions.from_spec(resolve_model("flux-toy")).prompt == (
        "a red circle on a blue background"
    )
    assert SamplingOptions.from_spec(resolve_model("flux-dev")).prompt == "a beautiful landscape"


def test_a_sweep_result_and_its_store_show_themselves_in_one_line(tiny, tmp_path):
    from flux_ir.sweep import GridSpec, SweepConfig, SweepStore, run_sweep

    pipe, spec = tiny
    cfg = SweepConfig.from_spec(
        spec, width=32, height=32, num_steps=1, grid=GridSpec(n_alpha=2, n_beta=2)
    )
    assert repr(SweepStore(tmp_path / "s")).endswith("no sweep yet)")
    result = run_sweep(pipe, cfg, tmp_path / "s", batch_size=4, progress=False)
    assert repr(result).startswith(
        f"SweepResult({tmp_path / 's'}: 4 point(s) generated here, 0 already"
    )
    assert repr(result.store).endswith("flux-tiny, 2x2 points, 4 image(s), complete True)")


def test_a_truncated_prompt_is_named_in_words_once(toy_pipe, recwarn, caplog):
    from flux_ir.sampling import SamplingOptions, generate

    pipe, spec = toy_pipe
    opts = SamplingOptions.from_spec(spec, prompt="a beautiful landscape", num_steps=1)
    generate(pipe, opts, seed=0, output_type="latent")
    generate(pipe, opts, seed=1, output_type="latent")
    notes = [str(w.message) for w in recwarn if "T5 tokens" in str(w.message)]
    assert notes == [
        "the prompt is longer than the 16 T5 tokens the model reads: it sees 'a beautiful lands' "
        "(words outside the tokenizer's vocabulary take one token per letter)"
    ]
    assert "truncated because" not in caplog.text
