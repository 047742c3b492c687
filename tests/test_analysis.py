"""Embeddings and the Lipschitz field: exact finite differences, caching, embedders."""

import numpy as np
import pytest
import torch
from PIL import Image

from flux_ir.analysis import (
    ClipEmbedder,
    PixelEmbedder,
    embed_files,
    embedding_grid,
    lipschitz_edges,
    lipschitz_field,
)


def linear_embeddings(n_alpha, n_beta, d_alpha, d_beta, u, w):
    """E[i, j] = (i d_alpha) u + (j d_beta) w: a field whose Lipschitz quotients are |u| and |w|."""
    i, j = np.meshgrid(np.arange(n_alpha), np.arange(n_beta), indexing="ij")
    return (i * d_alpha)[..., None] * u + (j * d_beta)[..., None] * w


def test_edges_of_a_linear_field_are_the_directional_slopes():
    u, w = np.array([3.0, 4.0]), np.array([0.0, 1.0])
    emb = linear_embeddings(4, 5, 0.25, 0.1, u, w)
    edges = lipschitz_edges(emb, 0.25, 0.1)
    assert edges.alpha.shape == (3, 5) and edges.beta.shape == (4, 4)
    assert np.allclose(edges.alpha, 5.0) and np.allclose(edges.beta, 1.0)


def test_cell_value_is_the_mean_over_its_neighbour_edges():
    emb = linear_embeddings(3, 3, 1.0, 1.0, np.array([2.0]), np.array([0.0]))
    field = lipschitz_field(lipschitz_edges(emb, 1.0, 1.0))
    # corner: one alpha edge (2) + one beta edge (0) -> 1; centre: two of each -> 1; edge middle (0, 1):
    # one alpha edge and two beta edges -> 2/3
    assert field[0, 0] == pytest.approx(1.0) and field[1, 1] == pytest.approx(1.0)
    assert field[0, 1] == pytest.approx(2 / 3)


def test_a_jump_shows_up_only_in_the_cells_beside_it():
    emb = np.zeros((4, 4, 1))
    emb[2:, :, 0] = 1.0  # a phase boundary between alpha rows 1 and 2
    field = lipschitz_field(lipschitz_edges(emb, 1.0, 1.0))
    assert (field[1:3] > 0).all() and (field[[0, 3]] == 0).all()


def test_missing_points_are_left_out_not_counted_as_zero():
    vectors = np.array([[0.0], [1.0], [5.0]])
    emb = embedding_grid(vectors, rows=[0, 0, 1], cols=[0, 1, 0], n_alpha=2, n_beta=2)
    assert np.isnan(emb[1, 1]).all()
    field = lipschitz_field(lipschitz_edges(emb, 1.0, 1.0))
    assert field[0, 0] == pytest.approx((1 + 5) / 2)
    assert np.isnan(field[1, 1])  # no finished neighbour


def make_images(tmp_path, n=3, size=16):
    paths = []
    for k in range(n):
        arr = np.full((size, size, 3), 40 * k, dtype=np.uint8)
        path = tmp_path / f"img{k}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def test_pixel_embedder_is_the_resized_image_in_unit_range(tmp_path):
    (path,) = make_images(tmp_path, n=1)
    vec = PixelEmbedder(size=8)([Image.open(path)])
    assert vec.shape == (1, 3 * 8 * 8) and torch.all(vec == 0.0)


def test_tiny_clip_gives_unit_length_embeddings_through_the_pil_processor(tmp_path):
    emb = ClipEmbedder.tiny()
    vec = emb([Image.open(p) for p in make_images(tmp_path, n=2, size=40)])
    assert vec.shape == (2, 16)
    assert torch.allclose(vec.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(vec[0], vec[1])


def test_embeddings_are_cached_and_only_new_files_are_embedded(tmp_path):
    paths = make_images(tmp_path, n=3)
    cache = tmp_path / "emb.npz"
    seen = []

    class Counting(PixelEmbedder):
        def __call__(self, images):
            seen.append(len(images))
            return super().__call__(images)

    first = embed_files(Counting(8), paths[:2], cache=cache)
    both = embed_files(Counting(8), paths, cache=cache)
    assert seen == [2, 1]
    assert np.array_equal(both[:2], first)
    assert np.array_equal(embed_files(Counting(8), paths, cache=cache), both) and seen == [2, 1]
