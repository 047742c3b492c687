"""The latent grid, its normalisations, 1-D paths and sweep settings (no model needed)."""

import math

import pytest
import torch

from flux_ir.errors import InvalidArgumentError
from flux_ir.models import resolve_model
from flux_ir.sweep import (
    GridSpec,
    SweepConfig,
    grid_latents,
    lerp_path,
    normalise,
    slerp_path,
    vertex_latents,
)


@pytest.fixture(scope="module")
def vertices():
    return vertex_latents((0, 123, 200), height=64, width=64)


def test_vertices_have_flux_latent_shape_and_depend_only_on_seed():
    v = vertex_latents((0, 123, 200), height=64, width=96)
    assert v.shape == (3, 16, 8, 12) and v.dtype == torch.float32
    again = vertex_latents((5, 123, 7), height=64, width=96)
    assert torch.equal(v[1], again[1]) and not torch.equal(v[0], again[0])


def test_unnormalised_grid_corners_are_the_vertices(vertices):
    spec = GridSpec(n_alpha=2, n_beta=2, normalisation="none")
    z, before, after = grid_latents(vertices, spec, spec.points())
    z0, z1, z2 = vertices
    assert torch.equal(z[0], z0)
    assert torch.allclose(z[2], z1, atol=1e-6) and torch.allclose(z[1], z2, atol=1e-6)
    assert torch.allclose(z[3], z1 + z2 - z0, atol=1e-6)
    assert torch.equal(before, after)


def test_annulus_puts_every_point_at_radius_sqrt_d_even_far_outside(vertices):
    spec = GridSpec(alpha=(-1000, 1000), beta=(-10, 10), n_alpha=3, n_beta=3)
    z, before, after = grid_latents(vertices, spec, spec.points())
    d = 16 * 8 * 8
    assert torch.allclose(after, torch.full_like(after, math.sqrt(d)), rtol=1e-5)
    assert before.max() > 1000 * math.sqrt(d) * 0.5  # the recorded norm is the raw one


def test_std_normalisation_divides_by_the_standard_deviation(vertices):
    spec = GridSpec(n_alpha=3, n_beta=3, normalisation="std")
    z, _, _ = grid_latents(vertices, spec, spec.points())
    assert torch.allclose(z.flatten(1).std(dim=1), torch.ones(9), atol=1e-5)


def test_vertex_normalisation_uses_the_mean_vertex_norm(vertices):
    spec = GridSpec(n_alpha=3, n_beta=3, normalisation="vertex")
    _, _, after = grid_latents(vertices, spec, spec.points())
    target = vertices.flatten(1).norm(dim=1).mean()
    assert torch.allclose(after, target.expand(9), rtol=1e-5)


def test_zooming_into_a_sub_interval_reproduces_the_full_grid_points(vertices):
    full = GridSpec(alpha=(0, 1), beta=(0, 1), n_alpha=5, n_beta=5)
    zoom = GridSpec(alpha=(0.5, 1), beta=(0.25, 0.5), n_alpha=3, n_beta=2)
    zf, _, _ = grid_latents(vertices, full, full.points())
    zz, _, _ = grid_latents(vertices, zoom, zoom.points())
    # zoom row 0 col 0 is (alpha 0.5, beta 0.25) = full row 2 col 1; zoom (2, 1) = full (4, 2)
    assert torch.allclose(zz[0], zf[2 * 5 + 1], atol=1e-6)
    assert torch.allclose(zz[2 * 2 + 1], zf[4 * 5 + 2], atol=1e-6)


def test_points_enumerate_rows_of_alpha_and_name_files_by_index():
    spec = GridSpec(alpha=(0, 2), beta=(-1, 1), n_alpha=3, n_beta=2)
    pts = spec.points()
    assert [(p.row, p.col) for p in pts] == [(r, c) for r in range(3) for c in range(2)]
    assert [p.index for p in pts] == list(range(6))
    assert pts[5].file == "a002_b001.png" and (pts[5].alpha, pts[5].beta) == (2.0, 1.0)
    assert spec.spacing == (1.0, 2.0)


def test_normalise_is_per_latent_and_independent_of_batch_companions(vertices):
    z = torch.stack([vertices[0] * 3, vertices[1] * 0.1])
    alone = normalise(z[:1], "annulus")
    together = normalise(z, "annulus")
    assert torch.equal(alone[0], together[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=(1, 1)), "^alpha interval 1.0,1.0 is empty"),
        (dict(beta="2,1"), "^beta interval 2.0,1.0 is empty"),
        (dict(alpha="0"), "^alpha must be two numbers"),
        (dict(n_alpha=0), "^n_alpha must be a positive integer"),
        (dict(n_beta=2.5), "^n_beta must be a positive integer"),
        (dict(normalisation="sphere"), "^normalisation 'sphere' is unknown"),
    ],
)
def test_bad_grid_settings_are_refused(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        GridSpec(**kwargs)


def test_sweep_settings_round_trip_through_their_signature():
    cfg = SweepConfig.from_spec(
        resolve_model("flux-tiny"),
        preset="hessian-paper",
        width=64,
        height=64,
        grid=GridSpec(n_alpha=3),
    )
    assert cfg.sampling.true_cfg and cfg.sampling.negative_prompt == "blurry, ugly, stock photo"
    assert SweepConfig.from_signature(cfg.signature()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=100), "^width must be a positive multiple of 16"),
        (dict(seeds=(1, 2)), "^seeds must be three integers"),
        (dict(num_steps=0), "^num_steps must be a positive integer"),
        (dict(true_cfg_scale=0.5), "^true_cfg_scale must be >= 1"),
        (dict(preset="paper"), "^preset 'paper' is unknown"),
    ],
)
def test_bad_sweep_settings_are_refused(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message) as err:
        SweepConfig.from_spec(resolve_model("flux-tiny"), **kwargs)
    assert err.value.param == next(iter(kwargs))


def test_lerp_path_ends_at_the_latents_directions_on_the_annulus(vertices):
    z0, z1 = vertices[0], vertices[1]
    path = lerp_path(z0, z1, 5)
    assert path.shape == (5, *z0.shape)
    assert torch.allclose(
        path.flatten(1).norm(dim=1), torch.full((5,), math.sqrt(z0.numel())), rtol=1e-5
    )
    cos = torch.nn.functional.cosine_similarity(path[-1].flatten(), z1.flatten(), dim=0)
    assert cos > 0.9999


def test_slerp_path_hits_both_ends_and_interpolates_norms_linearly(vertices):
    z0, z1 = vertices[0] * 2, vertices[1]
    path = slerp_path(z0, z1, 5)
    assert torch.allclose(path[0], z0, atol=1e-5) and torch.allclose(path[-1], z1, atol=1e-5)
    norms = path.flatten(1).norm(dim=1).double()
    expected = torch.linspace(float(z0.norm()), float(z1.norm()), 5, dtype=torch.float64)
    assert torch.allclose(norms, expected, rtol=1e-5)


def test_paths_need_two_points(vertices):
    with pytest.raises(InvalidArgumentError, match="at least 2 points"):
        slerp_path(vertices[0], vertices[1], 1)


def test_vertices_from_a_file_replace_the_seeded_ones(vertices, tmp_path):
    import numpy as np

    path = tmp_path / "v.npy"
    np.save(path, (vertices * 2).numpy())
    cfg = SweepConfig.from_spec(resolve_model("flux-tiny"), width=64, height=64, vertices=str(path))
    assert torch.equal(cfg.vertex_latents(), vertices * 2)
    assert cfg.signature()["vertices_sha256"] and "vertices" not in cfg.signature()


def test_vertices_of_the_wrong_shape_are_refused(vertices, tmp_path):
    import numpy as np

    path = tmp_path / "v.npy"
    np.save(path, vertices.numpy())
    with pytest.raises(InvalidArgumentError, match="a 128x128 sweep needs \\(3, 16, 16, 16\\)"):
        SweepConfig.from_spec(resolve_model("flux-tiny"), width=128, height=128, vertices=str(path))
