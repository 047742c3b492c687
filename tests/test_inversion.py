"""Inversion (image -> noise), image vertices in sweeps, stochastic grids and direction paths."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from flux_ir.cli import main
from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import pack_latents, unpack_latents
from flux_ir.inversion import (
    encode_images,
    flow_schedule,
    invert_latents,
    invert_renders,
    invert_to_vertices,
    prompt_direction,
)
from flux_ir.models import resolve_model
from flux_ir.sampling import SamplingOptions, encode_prompt, generate
from flux_ir.sweep import (
    GridSpec,
    SweepConfig,
    direction_at,
    direction_path,
    grid_latents,
    normalise,
    path_latents,
    vertex_latents,
)
from flux_ir.sweep.grid import combine, point_noise_seed

SIZE = 32  # 32x32 pixels: 4x4 latents, 4 tokens
TINY = ["--model", "flux-tiny", "--width", "32", "--height", "32", "--num_steps", "2"]


def tiny_opts(**kw) -> SamplingOptions:
    base = dict(prompt="a cat", width=SIZE, height=SIZE, num_steps=4, max_sequence_length=16)
    return SamplingOptions(**{**base, **kw})


def sample(pipe, opts, noise, emb=None):
    out = generate(pipe, opts, latents=noise, embeddings=emb, output_type="latent", progress=False)
    return out.images.float()


# -- the sampler's schedule and its inverse -------------------------------------------------------
@pytest.mark.parametrize("static_shift", [False, True])
def test_the_schedule_is_the_pipelines_own(tiny, static_shift, monkeypatch):
    pipe, _ = tiny
    if static_shift:  # flux-toy's kind of scheduler: a fixed shift, no resolution dependence
        monkeypatch.setattr(pipe, "scheduler", FlowMatchEulerDiscreteScheduler(shift=2.0))
    opts = tiny_opts(num_steps=3)
    seen = {}

    def record(p, i, t, kwargs):
        seen.setdefault("t", []).append(t)
        seen["sigmas"] = p.scheduler.sigmas.clone()
        return {}

    generate(pipe, opts, seed=0, output_type="latent", callback=record, progress=False)
    sigmas, timesteps = flow_schedule(pipe, 3, 4)
    assert torch.equal(sigmas.cpu(), seen["sigmas"].cpu())
    assert torch.equal(timesteps.cpu(), torch.stack(seen["t"]).cpu())
    assert sigmas[0] == 1 and sigmas[-1] == 0


class ExactVelocity:
    """A transformer stand-in whose velocity field is known: v(x, t) = a(t) + c x (t in [0, 1])."""

    def __init__(self, c: float):
        self.c = c

    def __call__(self, hidden_states, timestep, **kwargs):
        t = timestep.float().view(-1, 1, 1)
        return (torch.sin(3 * t) + self.c * hidden_states.float(),)


def test_with_a_velocity_that_ignores_x_inversion_is_exactly_undone(tiny, monkeypatch):
    pipe, _ = tiny
    monkeypatch.setattr(pipe.transformer, "forward", ExactVelocity(0.0))
    opts = tiny_opts()
    clean = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
    noise = invert_latents(pipe, opts, clean, progress=False)
    assert torch.allclose(sample(pipe, opts, noise), clean, atol=1e-5)


def test_fixed_point_passes_converge_to_the_exact_inverse(tiny, monkeypatch):
    pipe, _ = tiny
    monkeypatch.setattr(pipe.transformer, "forward", ExactVelocity(0.5))
    opts = tiny_opts()
    emb = encode_prompt(pipe, opts)
    clean = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))
    errors = []
    for r in (0, 2, 8):  # measured: 0.15, 4e-3, 4e-7
        noise = invert_latents(pipe, opts, clean, embeddings=emb, refine=r, progress=False)
        errors.append((sample(pipe, opts, noise, emb) - clean).abs().max().item())
    assert errors[0] > 10 * errors[1] > 100 * errors[2] and errors[2] < 1e-5


def test_flux_tiny_round_trip_reproduces_the_latent(tiny):
    """Invert a flux-tiny sample on 4 steps, sample again: the latent comes back (max abs error
    < 0.01 of values up to ~4 with 3 fixed-point passes; one pass per step is ~10x worse)."""
    pipe, _ = tiny
    opts = tiny_opts()
    emb = encode_prompt(pipe, opts)
    clean = sample(pipe, opts, pack_latents(vertex_latents((1,), SIZE, SIZE)), emb)
    plain = sample(
        pipe, opts, invert_latents(pipe, opts, clean, embeddings=emb, progress=False), emb
    )
    noise = invert_latents(pipe, opts, clean, embeddings=emb, refine=3, progress=False)
    refined = sample(pipe, opts, noise, emb)
    assert (refined - clean).abs().max() < 0.01 < (plain - clean).abs().max()


def test_true_cfg_inverts_the_guided_velocity(tiny):
    """With true CFG the sampler steps with neg + scale (cond - neg); inversion uses the same
    (measured on 4 steps: max error 0.1 with one pass per step, 1e-3 with 3 fixed-point passes)."""
    pipe, _ = tiny
    opts = tiny_opts(negative_prompt="blurry", true_cfg_scale=3.0)
    emb = encode_prompt(pipe, opts)
    clean = sample(pipe, opts, pack_latents(vertex_latents((2,), SIZE, SIZE)), emb)
    plain = sample(
        pipe, opts, invert_latents(pipe, opts, clean, embeddings=emb, progress=False), emb
    )
    noise = invert_latents(pipe, opts, clean, embeddings=emb, refine=3, progress=False)
    assert (
        (sample(pipe, opts, noise, emb) - clean).abs().max() < 0.005 < (plain - clean).abs().max()
    )


def test_encoding_packs_the_shifted_scaled_vae_mode(tiny):
    pipe, _ = tiny
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    clean = encode_images(pipe, images)
    assert clean.shape == (2, 4, 64) and clean.dtype == torch.float32
    with torch.no_grad():
        mode = pipe.vae.encode(images * 2 - 1).latent_dist.mode()
    cfg = pipe.vae.config
    back = unpack_latents(clean, SIZE, SIZE) / cfg.scaling_factor + cfg.shift_factor
    assert torch.allclose(back, mode, atol=1e-5)
    pil = [
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images
    ]
    assert torch.allclose(encode_images(pipe, pil), clean, atol=0.05)


def test_bad_inversion_input_is_refused(tiny):
    pipe, _ = tiny
    with pytest.raises(InvalidArgumentError, match=r"packed latents \[B, 4, 64\] of a 32x32"):
        invert_latents(pipe, tiny_opts(), torch.zeros(1, 16, 64), progress=False)
    with pytest.raises(InvalidArgumentError, match="refine must be a non-negative integer"):
        invert_latents(pipe, tiny_opts(), torch.zeros(1, 4, 64), refine=-1)


# -- image vertices -----------------------------------------------------------------------------
def write_images(folder, n, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        path = folder / f"v{k}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def image_cfg(paths, **kw):
    return SweepConfig.from_spec(
        resolve_model("flux-tiny"), width=SIZE, height=SIZE, num_steps=2, vertex_images=paths, **kw
    )


def test_vertex_images_sha256_are_the_sweeps_identity(tmp_path):
    paths = write_images(tmp_path, 3)
    cfg = image_cfg(",".join(paths))
    sig = cfg.signature()
    assert sig["seeds"] == [] and len(sig["vertex_images_sha256"]) == 3
    assert sig["inversion_refine"] == 0 and "vertex_images" not in sig  # files may move
    assert SweepConfig.from_signature(sig).signature() == sig
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(paths[1])
    changed = image_cfg(paths).signature()["vertex_images_sha256"]
    assert (
        changed[0] == sig["vertex_images_sha256"][0]
        and changed[1] != sig["vertex_images_sha256"][1]
    )
    assert (
        "vertex_images_sha256" not in SweepConfig.from_spec(resolve_model("flux-tiny")).signature()
    )


@pytest.mark.parametrize(
    "make, kw, message",
    [
        (lambda d: write_images(d, 3, size=48), {}, r"is 48x48 pixels but the sampling size is 32x32; resize it to 32x32 or pass --width 48 --height 48"),
        (lambda d: write_images(d, 3, size=40), {}, "is 40x40 pixels .* crop or resize it to a multiple of 16"),
        (lambda d: write_images(d, 2), {}, r"must be three \(z0, z1, z2\) image file\(s\) for this sweep, got 2"),
        (lambda d: [*write_images(d, 2), str(d / "missing.png")], {}, "missing.png does not exist"),
        (lambda d: write_images(d, 3), {"seeds": (1, 2, 3)}, "replace the seeds"),
    ],
)  # fmt: skip
def test_bad_vertex_images_are_refused_with_one_line(tmp_path, make, kw, message):
    with pytest.raises(InvalidArgumentError, match=message) as err:
        image_cfg(make(tmp_path), **kw)
    assert "\n" not in str(err.value) and err.value.param == "vertex_images"


def test_an_image_sweep_inverts_once_resumes_and_refuses_a_changed_image(
    tiny, tmp_path, capsys, monkeypatch
):
    paths = write_images(tmp_path, 3)
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, "--n_alpha", "2", "--normalisation", "none", "--progress=False"]
    args += ["--vertex_images", ",".join(paths), "--output_dir", str(out)]
    assert main(args) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert len(meta["sweep"]["vertex_images_sha256"]) == 3 and meta["complete"]
    from safetensors.torch import load_file

    # the vertices are the images inverted under the sweep's own sampling (flux-tiny's weights
    # are built from a fixed seed, so the fixture's pipeline is the command's)
    vertices = load_file(out / "vertices.safetensors")["vertices"]
    cfg = SweepConfig.from_signature(meta["sweep"])
    expected = invert_to_vertices(tiny[0], cfg.sampling, paths, progress=False)
    assert vertices.shape == (3, 16, 4, 4) and torch.allclose(vertices, expected, atol=1e-5)
    # corner (0, 0) of an unnormalised grid is vertex 0
    table = pd.read_csv(out / "points.csv")
    assert table.loc[0, "norm_before"] == pytest.approx(float(vertices[0].norm()), rel=1e-5)

    (out / "images" / "a001_b001.png").unlink()
    capsys.readouterr()
    monkeypatch.setattr("flux_ir.sweep.run.invert_to_vertices", lambda *a, **k: pytest.fail())
    assert main(args) == 0  # resumes from the kept vertices, without inverting again
    assert "3 point(s) already done; generated 1 here" in capsys.readouterr().out

    Image.new("RGB", (SIZE, SIZE), (200, 10, 10)).save(paths[2])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a different sweep (differs in: vertex_images_sha256)" in err


# -- stochastic grids -----------------------------------------------------------------------------
def test_noise_is_seeded_per_point_and_added_before_normalising():
    v = vertex_latents((0, 123, 200), SIZE, SIZE)
    spec = GridSpec(n_alpha=3, n_beta=3, normalisation="std", noise_level=0.1, repeats=2)
    points = spec.points()
    z, before, _ = grid_latents(v, spec, points)
    # any batch, any order: the same latent per point
    again, _, _ = grid_latents(v, spec, points[::-1][:5])
    assert torch.equal(again[0], z[-1]) and torch.equal(again[4], z[-5])
    # the paper's formula with this point's generator: (combine + noise * randn) / std
    p = points[7]
    g = torch.Generator().manual_seed(point_noise_seed(0, p.row, p.col, p.repeat))
    manual = combine(v, torch.tensor([p.alpha]), torch.tensor([p.beta]))[0]
    manual = manual + 0.1 * torch.randn(manual.shape, generator=g)
    assert torch.allclose(z[7], manual / manual.std(), atol=1e-6)
    # repeats of one location differ by their noise only; another noise seed changes every point
    assert not torch.equal(z[0], z[1]) and (z[0] - z[1]).std() < 0.2
    other, _, _ = grid_latents(
        v, GridSpec(**{**spec.to_dict(), "noise_seed": 1, "alpha": (0, 1), "beta": (0, 1)}), points
    )
    assert not torch.equal(other[0], z[0])
    quiet, _, _ = grid_latents(v, GridSpec(n_alpha=3, n_beta=3, normalisation="std"), points[::2])
    assert not torch.equal(quiet[0], z[0])  # fmt: skip


def test_repeats_name_files_and_a_quiet_grid_keeps_its_signature():
    spec = GridSpec(n_alpha=2, n_beta=2, noise_level=0.05, repeats=3)
    points = spec.points()
    assert len(points) == spec.n_points == 12 and [p.index for p in points] == list(range(12))
    assert points[4].file == "a000_b001_r01.png" and (points[4].row, points[4].col) == (0, 1)
    assert spec.to_dict()["noise_level"] == 0.05 and spec.to_dict()["repeats"] == 3
    assert (
        "noise_level" not in GridSpec().to_dict() and GridSpec().points()[0].file == "a000_b000.png"
    )


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"repeats": 2}, "repeats 2 needs --noise_level > 0"),
        ({"noise_level": -0.1}, "noise_level must be a number >= 0"),
        ({"noise_level": math.inf}, "noise_level must be finite"),
        ({"noise_level": 0.1, "repeats": 0}, "repeats must be an integer from 1"),
    ],
)
def test_bad_noise_settings_are_refused(kw, message):
    with pytest.raises(InvalidArgumentError, match=message):
        GridSpec(**kw)


def test_a_stochastic_sweep_records_its_noise_and_writes_every_repeat(tmp_path, capsys):
    out = tmp_path / "noisy"
    args = ["sweep", *TINY, "--n_alpha", "2", "--n_beta", "1", "--noise_level", "0.2"]
    args += ["--repeats", "2", "--batch_size", "3", "--progress=False", "--output_dir", str(out)]
    assert main(args) == 0
    meta = json.loads((out / "metadata.json").read_text())
    grid = meta["sweep"]["grid"]
    assert (grid["noise_level"], grid["repeats"], grid["noise_seed"]) == (0.2, 2, 0)
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [
        "a000_b000_r00.png",
        "a000_b000_r01.png",
        "a001_b000_r00.png",
        "a001_b000_r01.png",
    ]
    table = pd.read_csv(out / "points.csv")
    assert list(table["repeat"]) == [0, 1, 0, 1] and table["done"].all()
    capsys.readouterr()
    assert main(args) == 0  # the same noise resumes
    assert "4 point(s) already done; generated 0 here" in capsys.readouterr().out
    assert main([*args[:-2], "--noise_seed", "1", "--output_dir", str(out)]) == 2
    assert "differs in: grid" in capsys.readouterr().err  # fmt: skip


# -- direction paths ------------------------------------------------------------------------------
def test_direction_steps_are_in_annulus_radii():
    z0, z1, z2 = vertex_latents((0, 123, 200), SIZE, SIZE)
    d = z2 - z1
    zs = direction_at(z0, d, torch.tensor([0.0, 0.5, 1.0]))
    radius = math.sqrt(z0.numel())
    assert torch.equal(zs[0], z0)
    assert (zs[2] - z0).norm() == pytest.approx(radius, rel=1e-5)
    assert torch.allclose((zs[1] - z0) / (zs[1] - z0).norm(), d / d.norm(), atol=1e-5)
    path = direction_path(z0, d, [0.0, 0.25])
    assert torch.allclose(path.flatten(1).norm(dim=1), torch.full((2,), radius))
    with pytest.raises(InvalidArgumentError, match="direction is zero"):
        direction_at(z0, torch.zeros_like(z0), torch.tensor([1.0]))


def test_a_direction_sweep_walks_from_z0_along_z2_minus_z1():
    cfg = SweepConfig.from_spec(
        resolve_model("flux-tiny"),
        width=SIZE,
        height=SIZE,
        grid=GridSpec(alpha=(0, 0.5), n_alpha=3, n_beta=1, path="direction", normalisation="none"),
    )
    v = cfg.vertex_latents()
    assert cfg.seeds == (0, 123, 200) and v.shape == (3, 16, 4, 4)
    z, _, _ = path_latents(v, cfg.grid, cfg.grid.points())
    assert torch.allclose(z, direction_at(v[0], v[2] - v[1], torch.tensor([0.0, 0.25, 0.5])))
    annulus, _, _ = path_latents(
        v, GridSpec(alpha=(0, 0.5), n_alpha=3, n_beta=1, path="direction"), cfg.grid.points()
    )
    assert torch.allclose(annulus, normalise(z, "annulus"))  # fmt: skip


def test_direction_prompts_need_a_direction_path_and_one_start(tmp_path):
    tiny = resolve_model("flux-tiny")
    grid = GridSpec(n_alpha=3, n_beta=1, path="direction")
    cfg = SweepConfig.from_spec(tiny, grid=grid, direction_prompts=("a cat", "a dog"))
    assert cfg.seeds == (0,) and cfg.needs_pipeline
    assert cfg.signature()["direction_prompts"] == ["a cat", "a dog"]
    with pytest.raises(InvalidArgumentError, match="use path='direction'"):
        SweepConfig.from_spec(tiny, direction_prompts=("a cat", "a dog"))
    with pytest.raises(InvalidArgumentError, match=r"one integer \(the start z0\)"):
        SweepConfig.from_spec(tiny, grid=grid, direction_prompts=("a", "b"), seeds=(1, 2, 3))
    with pytest.raises(InvalidArgumentError, match="come from inverting"):
        cfg.vertex_latents()
    one = write_images(tmp_path, 1)
    start = SweepConfig.from_spec(
        tiny, width=SIZE, height=SIZE, grid=grid, direction_prompts=("a", "b"), vertex_images=one
    )
    assert len(start.vertex_images_sha256) == 1


def test_a_direction_sweep_from_two_prompts_keeps_the_start_and_both_inverted_renders(
    tiny, tmp_path
):
    out = tmp_path / "dir"
    args = ["sweep", *TINY, "--path", "direction", "--points", "2", "--alpha", "0,0.5"]
    args += ["--direction_from", "a cat", "--direction_to", "a dog", "--progress=False"]
    assert main([*args, "--seeds", "7", "--output_dir", str(out)]) == 0
    from safetensors.torch import load_file

    vertices = load_file(out / "vertices.safetensors")["vertices"]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sweep"]["direction_prompts"] == ["a cat", "a dog"] and meta["sweep"]["seeds"] == [
        7
    ]
    start = vertex_latents((7,), SIZE, SIZE)
    cfg = SweepConfig.from_signature(meta["sweep"])
    renders = invert_renders(tiny[0], cfg.sampling, start[0], ("a cat", "a dog"), progress=False)
    assert torch.equal(vertices[0], start[0]) and torch.allclose(vertices[1:], renders, atol=1e-5)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a000_b000.png", "a001_b000.png"]


def test_a_prompt_direction_is_the_difference_of_two_inverted_renders(tiny):
    pipe, _ = tiny
    opts = tiny_opts(num_steps=2)
    start = vertex_latents((5,), SIZE, SIZE)[0]
    d = prompt_direction(pipe, opts, start, ("a cat", "a dog"), progress=False)
    assert d.shape == start.shape and d.norm() > 0
    same = prompt_direction(pipe, opts, start, ("a cat", "a dog"), progress=False)
    assert torch.equal(d, same)


# -- the benchmark scripts, in their CPU smoke mode (numbers meaningless) ------------------------
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_inversion_speed_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    result = __import__("bench_inversion").main(["--smoke", "--out", str(tmp_path)])
    assert [r["config"] for r in result["rows"]] == ["generate", "invert", "invert_refine1"]
    assert json.loads((tmp_path / "inversion_speed.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_inversion_quality_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    picture = tmp_path / "pic.png"
    args = ["--smoke", "--out", str(tmp_path), "--picture", str(picture)]
    result = __import__("inversion_quality").main(args)
    assert set(result["modes"]) == {"caption", "empty", "caption+cfg"}
    assert len(result["grid"]["corners"]) == 9 and picture.is_file()
    assert "## Grid corners" in (tmp_path / "inversion_quality.md").read_text()
