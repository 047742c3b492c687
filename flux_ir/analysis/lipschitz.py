"""The Lipschitz field of a sweep: how fast the embedding changes between neighbouring grid points.

    vectors = np.random.default_rng(0).random((6, 8))       # embeddings of a 2 x 3 grid's points, [n, D]
    E = embedding_grid(vectors, [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2], 2, 3)  # [2, 3, D], nan where missing
    edges = lipschitz_edges(E, 1.0, 0.5)                    # per edge, over d_alpha and d_beta
    field = lipschitz_field(edges)                          # [2, 3]: mean over each cell's neighbours

Along alpha, the edge between (i, j) and (i+1, j) is ||E[i+1, j] - E[i, j]|| / d_alpha; along beta,
||E[i, j+1] - E[i, j]|| / d_beta. A cell's value is the mean over its (up to four) edges, as in the
grid-sweep notes; missing points give nan edges, which are left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Edges:
    """alpha: [n_alpha - 1, n_beta] and beta: [n_alpha, n_beta - 1] finite-difference quotients."""

    alpha: np.ndarray
    beta: np.ndarray


def embedding_grid(
    vectors: np.ndarray, rows: Sequence[int], cols: Sequence[int], n_alpha: int, n_beta: int
) -> np.ndarray:
    """Place vectors [n, D] at (rows[k], cols[k]) of an [n_alpha, n_beta, D] array (nan elsewhere)."""
    grid = np.full((n_alpha, n_beta, vectors.shape[1]), np.nan, dtype=np.float64)
    grid[np.asarray(rows), np.asarray(cols)] = vectors
    return grid


def lipschitz_edges(grid: np.ndarray, d_alpha: float, d_beta: float) -> Edges:
    """Finite-difference quotients between neighbours of grid [n_alpha, n_beta, D]."""
    along_alpha = np.linalg.norm(np.diff(grid, axis=0), axis=-1) / abs(d_alpha)
    along_beta = np.linalg.norm(np.diff(grid, axis=1), axis=-1) / abs(d_beta)
    return Edges(along_alpha, along_beta)


def lipschitz_field(edges: Edges) -> np.ndarray:
    """Per-cell mean of the adjacent edge values: [n_alpha, n_beta] (nan where a cell has none)."""
    n_alpha, n_beta = edges.alpha.shape[0] + 1, edges.beta.shape[1] + 1
    total = np.zeros((n_alpha, n_beta))
    count = np.zeros((n_alpha, n_beta))
    for values, sl_lo, sl_hi in (
        (edges.alpha, np.s_[:-1, :], np.s_[1:, :]),
        (edges.beta, np.s_[:, :-1], np.s_[:, 1:]),
    ):
        ok = np.isfinite(values)
        v = np.where(ok, values, 0.0)
        for sl in (sl_lo, sl_hi):
            total[sl] += v
            count[sl] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
