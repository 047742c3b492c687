"""The sampling core: one call site for the pipeline, model defaults from the spec, the same images
from Python as from the command line, and FLUX's geometry."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

import flux_ir
from flux_ir.capture import CaptureOptions, run_capture
from flux_ir.cli import main
from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import latent_shape, pack_latents, token_grid, unpack_latents
from flux_ir.models import load_pipeline, resolve_model
from flux_ir.models.toy import has_toy_weights
from flux_ir.sampling import SamplingOptions, encode_prompt, generate
from flux_ir.store import load_capture
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep

PACKAGE = Path(flux_ir.__file__).parent
shipped = pytest.mark.skipif(not has_toy_weights(), reason="no flux-toy weights in the package")


def pipeline_calls(path: Path) -> list[int]:
    """Lines where `path` calls an object named `pipe` (a diffusers pipeline)."""
    tree = ast.parse(path.read_text())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipe"
    ]


def test_the_pipeline_is_called_in_one_place_only():
    calls = {
        str(p.relative_to(PACKAGE)): lines
        for p in sorted(PACKAGE.rglob("*.py"))
        if (lines := pipeline_calls(p))
    }
    assert list(calls) == ["sampling.py"] and len(calls["sampling.py"]) == 1


def test_options_from_a_spec_take_the_models_defaults_and_overrides():
    toy = SamplingOptions.from_spec(resolve_model("flux-toy"))
    assert (toy.width, toy.height, toy.num_steps, toy.max_sequence_length) == (128, 128, 16, 16)
    assert toy.true_cfg and toy.negative_prompt == "" and toy.guidance is None
    dev = SamplingOptions.from_spec(resolve_model("flux-dev"), num_steps=8, guidance=None)
    assert (dev.width, dev.num_steps, dev.guidance, dev.max_sequence_length) == (256, 8, 3.5, 512)
    assert not dev.true_cfg
    with pytest.raises(InvalidArgumentError, match="^unknown sampling option\\(s\\) steps") as err:
        SamplingOptions.from_spec(resolve_model("flux-toy"), steps=4)
    assert err.value.param == "steps"


def test_a_flux_toy_sweep_from_its_spec_samples_at_its_size_with_its_cfg():
    cfg = SweepConfig.from_spec(resolve_model("flux-toy"), grid=GridSpec(n_alpha=2))
    assert (cfg.sampling.width, cfg.sampling.num_steps, cfg.sampling.true_cfg) == (128, 16, True)
    assert cfg.sampling.max_sequence_length == 16 and cfg.model == "flux-toy"
    real = SweepConfig.from_spec(resolve_model("flux-schnell"))
    assert real.sampling.width == 512 and real.sampling.prompt.startswith("High quality picture")


def test_prompt_embeddings_give_the_same_images_as_the_prompt(tiny):
    pipe, spec = tiny
    opts = SamplingOptions.from_spec(spec, width=32, height=32, num_steps=2, prompt="a red circle")
    noise = pack_latents(
        torch.randn(2, *opts.latent_shape, generator=torch.Generator().manual_seed(0))
    )
    by_text = generate(pipe, opts, latents=noise, output_type="latent").images
    by_text_again = generate(pipe, opts, latents=noise, output_type="latent").images
    emb = encode_prompt(pipe, opts)
    by_embeddings = generate(pipe, opts, latents=noise, embeddings=emb, output_type="latent").images
    assert by_text.shape == (2, 4, 64)
    assert torch.equal(by_text, by_text_again) and torch.equal(by_text, by_embeddings)


def test_one_seed_per_image_gives_each_image_its_own_noise(tiny):
    pipe, spec = tiny
    opts = SamplingOptions.from_spec(spec, width=32, height=32, num_steps=1)
    pair = generate(pipe, opts, prompts=["a", "a"], seed=[4, 5], output_type="latent").images
    alone = generate(pipe, opts, prompts=["a"], seed=[5], output_type="latent").images
    assert torch.allclose(pair[1], alone[0], atol=1e-6) and not torch.allclose(pair[0], pair[1])


def test_output_type_is_checked(tiny):
    pipe, spec = tiny
    with pytest.raises(InvalidArgumentError, match="^output_type must be one of pil, pt"):
        generate(pipe, SamplingOptions.from_spec(spec), seed=0, output_type="png")


@shipped
def test_python_reproduces_the_command_lines_flux_toy_image_bit_for_bit(tmp_path):
    prompt = "a green triangle on a white background"
    args = ["capture", "--model", "flux-toy", "--prompt", prompt, "--seed", "3"]
    args += ["--output_dir", str(tmp_path), "--should_decode_intermediates", "False"]
    assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    (path,) = (run_dir / "intermediates").glob("capture_*.pt")
    cli_cap = load_capture(path)

    pipe, spec = load_pipeline("flux-toy")
    opts = CaptureOptions.from_spec(spec, seed=3, prompt=prompt)
    images, cap = run_capture(pipe, opts, model_name=spec.name)
    assert cap.has_uncond and cap.metadata["width"] == 128 and cap.metadata["num_steps"] == 16
    for key in ("width", "height", "num_steps", "seed", "true_cfg_scale", "negative_prompt"):
        assert cap.metadata[key] == cli_cap.metadata[key], key
    final = cap.denoising_context["final_latents"]
    assert torch.equal(final, cli_cap.denoising_context["final_latents"])
    ours = tmp_path / "ours.jpg"
    images[0].save(ours, quality=95)
    theirs = np.asarray(Image.open(run_dir / "img_0.jpg"))
    assert np.array_equal(np.asarray(Image.open(ours)), theirs)  # same pixels, same JPEG coder


@shipped
def test_python_and_the_command_line_make_the_same_flux_toy_sweep(tmp_path):
    cli_dir, py_dir = tmp_path / "cli", tmp_path / "py"
    args = ["sweep", "--model", "flux-toy", "--n_alpha", "1", "--n_beta", "2"]
    assert main([*args, "--output_dir", str(cli_dir), "--progress", "False"]) == 0
    pipe, spec = load_pipeline("flux-toy")
    cfg = SweepConfig.from_spec(spec, grid=GridSpec(n_alpha=1, n_beta=2), dtype="float32")
    run_sweep(pipe, cfg, py_dir, batch_size=2, progress=False)
    cli_meta = json.loads((cli_dir / "metadata.json").read_text())
    assert cli_meta["sweep"] == json.loads((py_dir / "metadata.json").read_text())["sweep"]
    assert cli_meta["sweep"]["width"] == 128 and cli_meta["true_cfg"] is True
    for name in ("a000_b000.png", "a000_b001.png"):
        a = np.asarray(Image.open(cli_dir / "images" / name))
        assert a.shape == (128, 128, 3)
        assert np.array_equal(a, np.asarray(Image.open(py_dir / "images" / name)))


def test_packing_is_diffusers_packing():
    z = torch.randn(2, 16, 8, 12)
    packed = pack_latents(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 64, 96), z)
    assert torch.equal(
        unpack_latents(packed, 64, 96), FluxPipeline._unpack_latents(packed, 64, 96, 8)
    )
    assert latent_shape(64, 96) == (16, 8, 12) and token_grid(64, 96) == (4, 6)
