"""The Fisher metric of a latent plane: kernel posteriors, the free-energy fit against an exponential
family whose Fisher metric is known in closed form, the metric, geodesics, files and the command."""

import math

import numpy as np
import pytest
import torch

from flux_ir.analysis.fisher import (
    FreeEnergyNet,
    UnitBox,
    fit_free_energy,
    kernel_posteriors,
    load_free_energy,
    metric_field,
    metric_tensor,
    save_free_energy,
    unit_grid,
)
from flux_ir.analysis.fisher_sweep import (
    boundary_contrast,
    class_boundaries,
    line_cells,
    line_pairs,
)
from flux_ir.analysis.geodesic import geodesic, geodesics, positive_part
from flux_ir.errors import InvalidArgumentError


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster on a shared CPU and makes the sums reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- posteriors ----------------------------------------------------------------------------------------
def reference_posteriors(e: np.ndarray, u: np.ndarray, r: int) -> np.ndarray:
    """The kernel posterior written as plainly as possible: one sample, one neighbour at a time."""
    out = np.zeros((len(u), r, r))
    for i in range(len(u)):
        grid = np.zeros((r, r))
        for j in range(len(u)):
            w = math.exp(-10 * math.sqrt(max(2 * (1.00001 - e[i] @ e[j]), 0.0)))
            x, y = u[j] * (r - 1)
            a, b = min(int(x), r - 2), min(int(y), r - 2)
            fa, fb = x - a, y - b
            grid[a, b] += w * (1 - fa) * (1 - fb)
            grid[a + 1, b] += w * fa * (1 - fb)
            grid[a, b + 1] += w * (1 - fa) * fb
            grid[a + 1, b + 1] += w * fa * fb
        grid = np.minimum(grid, 1.0)
        out[i] = grid / grid.sum()
    return out


def test_kernel_posteriors_match_the_plain_sum_and_do_not_depend_on_the_chunk():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(23, 5))
    e[5] = e[4]  # two identical samples: a cell may exceed 1 and be clipped
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    u = rng.random((23, 2))
    u[0] = (1.0, 1.0)  # the upper corner lands on the last cell
    u[4] = u[5] = (0.5, 0.5)
    expected = reference_posteriors(e, u, 9)
    got = kernel_posteriors(torch.tensor(e), torch.tensor(u), 9).double().numpy()
    # float32 similarities: a sample's weight on itself, exp(-10 sqrt(2 (1e-5 + rounding))), is
    # only good to ~3e-4
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-7)
    one = kernel_posteriors(torch.tensor(e), torch.tensor(u), 9, chunk=1).double().numpy()
    np.testing.assert_allclose(one, got, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    assert got[0, -1, -1] > 0.3  # its own weight (0.94 of itself) at the corner cell


def test_kernel_posteriors_refuse_mismatched_inputs():
    with pytest.raises(InvalidArgumentError, match="embeddings must be"):
        kernel_posteriors(torch.zeros(3, 4), torch.zeros(2, 2))
    with pytest.raises(InvalidArgumentError, match="coords must be"):
        kernel_posteriors(torch.zeros(3, 4), torch.zeros(3, 3))
    with pytest.raises(InvalidArgumentError, match="resolution must be"):
        kernel_posteriors(torch.zeros(3, 4), torch.zeros(3, 2), resolution=1)


# -- an exponential family with a known log-partition function --------------------------------------
class BernoulliFamily:
    """Independent Bernoulli variables x_k with natural parameters theta = S A t + b, linear in
    t = (alpha, beta): log Z(t) = sum_k log(1 + exp(theta_k)), Fisher metric S^2 A^T diag(v) A with
    v = sigmoid(theta) (1 - sigmoid(theta)); every entry is positive, so relative errors are
    meaningful everywhere."""

    A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    S = 4.0
    B = np.array([-2.0, -2.0, -4.0])

    def theta(self, t):
        return self.S * np.asarray(t) @ self.A.T + self.B

    def log_z(self, t):
        return np.logaddexp(0.0, self.theta(t)).sum(-1)

    def fisher(self, t):
        s = 1 / (1 + np.exp(-self.theta(t)))
        return self.S**2 * np.einsum("ki,...k,kj->...ij", self.A, s * (1 - s), self.A)

    def posteriors(self, points, draws: int, k: float, r: int, rng) -> np.ndarray:
        """Posteriors (flat prior) on the r x r grid after `draws` draws at each point, raised to the
        power k / draws: k (t . T - log Z(t)) with T the mean sufficient statistic S A^T x.

        The 1/draws-th power of the posterior converges to exp(-D_F(t, t')) (t' the true point;
        the paper's Theorem 3.1); the k-th power of that is what Q ~ exp(-k D_F(t, t')) models.
        The posterior itself is centred on the draws' estimate of t', as far from t' as it is wide,
        so fitting it directly (k = draws) would take that scatter for width: g comes out ~40% low."""
        grid = unit_grid(r).double().numpy()
        lz = self.log_z(grid)
        out = []
        for t in points:
            p = 1 / (1 + np.exp(-self.theta(t)))
            stat = self.S * self.A.T @ (rng.binomial(draws, p) / draws)
            lp = k * (grid @ stat - lz)
            q = np.exp(lp - lp.max())
            out.append((q / q.sum()).reshape(r, r))
        return np.stack(out)


def interior_error(net, family, lo=0.2, hi=0.8, m=13) -> float:
    """Median relative error of the metric's entries (g11, g12, g22) over the interior."""
    ax = np.linspace(lo, hi, m)
    pts = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    got = metric_tensor(net, pts).double().numpy()
    exact = family.fisher(pts)
    rel = np.abs(got - exact) / np.abs(exact)
    return float(np.median(rel[:, [0, 0, 1], [0, 1, 1]]))


def test_the_fitted_metric_matches_an_exact_fisher_metric_within_15_percent():
    """225 points (15 x 15) with 2,500 draws each, posteriors to the power 25/2500 on a 32 x 32
    grid, a 32-wide network, 600 steps: the metric's entries are within 15% of the exact Fisher
    metric (median over the interior [0.2, 0.8]^2; about 8% here, 2% with width 64 and 1500 steps)."""
    family = BernoulliFamily()
    ax = np.linspace(0, 1, 15)
    points = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    post = family.posteriors(points, 2500, 25, 32, np.random.default_rng(0))
    fit = fit_free_energy(
        torch.tensor(post), torch.tensor(points), n_samples=25, width=32, steps=600,
        eval_every=100, progress=False,
    )  # fmt: skip
    assert fit.val_loss[-1] < fit.val_loss[0]
    assert interior_error(fit.net, family) < 0.15


def test_the_whole_pipeline_recovers_the_shape_of_a_known_metric():
    """Embeddings e(t) = (cos 2a, sin 2a, cos b, sin b) / sqrt(2) on a 20 x 20 grid: |e(t) - e(t')|
    is sqrt(4 da^2 + db^2) / sqrt(2) to first order, so the kernel posteriors are elliptical and
    the fitted metric must be proportional to diag(4, 1): g_aa / g_bb = 4, no cross term (the
    kernel is exp(-10 distance), not the exponential family's, so only the shape is known)."""
    ax = np.linspace(0, 1, 20)
    points = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    a, b = 2 * points[:, 0], points[:, 1]
    emb = np.stack([np.cos(a), np.sin(a), np.cos(b), np.sin(b)], 1) / np.sqrt(2)
    post = kernel_posteriors(torch.tensor(emb), torch.tensor(points), 20)
    fit = fit_free_energy(post, torch.tensor(points), width=32, steps=600, progress=False)
    inner = np.linspace(0.25, 0.75, 7)
    pts = np.stack(np.meshgrid(inner, inner, indexing="ij"), -1).reshape(-1, 2)
    g = metric_tensor(fit.net, pts).double().numpy()
    assert abs(np.median(g[:, 0, 0] / g[:, 1, 1]) / 4 - 1) < 0.15  # 3.69 here
    assert np.median(np.abs(g[:, 0, 1]) / np.sqrt(g[:, 0, 0] * g[:, 1, 1])) < 0.1


def test_the_fit_is_deterministic_and_its_split_is_80_20():
    rng = np.random.default_rng(1)
    post = rng.random((20, 6, 6))
    post /= post.sum(axis=(1, 2), keepdims=True)
    coords = rng.random((20, 2))
    runs = [
        fit_free_energy(post, coords, width=8, depth=2, steps=6, eval_every=3, progress=False)
        for _ in range(2)
    ]
    a, b = (r.net.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(runs[0].val_index) == 4 and len(runs[0].train_index) == 16
    assert set(runs[0].val_index).isdisjoint(runs[0].train_index)
    with pytest.raises(InvalidArgumentError, match="n_samples must be a positive number"):
        fit_free_energy(post, coords, n_samples=-1.0, steps=1, progress=False)


# -- the metric and geodesics of known functions ---------------------------------------------------
class Analytic(FreeEnergyNet):
    """A free energy given in closed form (the layers are kept only for `.parameters()`)."""

    def __init__(self, fn):
        super().__init__(width=1, depth=1)
        self.fn = fn

    def forward(self, u):
        return self.fn(u)


def test_metric_tensor_is_the_hessian_of_log_z():
    # log Z = u1^2 + 3 u1 u2 + 2 u2^2 + sin(u1): Hessian [[2 - sin u1, 3], [3, 4]]
    net = Analytic(
        lambda u: -(u[:, 0] ** 2 + 3 * u[:, 0] * u[:, 1] + 2 * u[:, 1] ** 2 + torch.sin(u[:, 0]))
    )
    pts = torch.rand(7, 2, generator=torch.Generator().manual_seed(0))
    g = metric_tensor(net, pts)
    expected = torch.stack(
        [torch.stack([2 - torch.sin(pts[:, 0]), torch.full((7,), 3.0)], 1), torch.tensor([[3.0, 4.0]]).expand(7, 2)],
        1,
    )  # fmt: skip
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5)
    box = UnitBox(alpha=(-2.0, 2.0), beta=(0.0, 0.5))  # t = lo + L u: g_t = g_u / (L_i L_j)
    field = metric_field(net, resolution=5, box=box)
    assert field.alphas[0] == -2.0 and field.betas[-1] == 0.5
    np.testing.assert_allclose(field.metric[2, 2, 0, 1], 3.0 / (4.0 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(field.det, np.linalg.det(field.metric), rtol=1e-6)


def test_geodesic_of_a_separable_metric_follows_the_known_curve():
    # log Z = (exp(2 u1) + exp(2 u2)) / 4: g = diag(exp(2 u1), exp(2 u2)). In v = exp(u) the metric is
    # Euclidean, so the geodesic is the straight line in v, equally spaced in metric length.
    net = Analytic(lambda u: -(torch.exp(2 * u).sum(1)) / 4)
    a, b = np.array([0.05, 0.9]), np.array([0.95, 0.1])
    geo = geodesic(net, a, b, n_points=16, iterations=400, smoothness=0.0, n_out=7, progress=False)  # fmt: skip
    s = np.linspace(0, 1, 7)[:, None]
    expected = np.log(np.exp(a) * (1 - s) + np.exp(b) * s)
    np.testing.assert_allclose(geo.points, expected, atol=0.005)
    assert geo.length < geo.line_length
    exact_length = float(np.linalg.norm(np.exp(b) - np.exp(a)))
    assert abs(geo.length - exact_length) < 0.01 * exact_length
    assert geo.deviation > 0.05  # it bends away from the straight line
    flat = geodesic(Analytic(lambda u: -(u**2).sum(1)), a, b, n_points=12, iterations=20, progress=False)  # fmt: skip
    # the straight line is optimal from the start; Adam only jitters around it by about lr
    assert flat.deviation < 0.02 and abs(flat.length / flat.line_length - 1) < 1e-3


def test_positive_part_drops_negative_eigenvalues():
    g = torch.randn(200, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = (g + g.transpose(1, 2)) / 2
    vals, vecs = torch.linalg.eigh(g)
    expected = vecs @ torch.diag_embed(vals.clamp(min=0)) @ vecs.transpose(1, 2)
    torch.testing.assert_close(positive_part(g), expected)


def test_geodesics_together_equal_geodesics_alone():
    net = Analytic(lambda u: -(torch.exp(2 * u).sum(1)) / 4)
    starts, ends = [(0.1, 0.8), (0.2, 0.2)], [(0.9, 0.3), (0.7, 0.9)]
    both = geodesics(net, starts, ends, n_points=10, iterations=30, n_out=5, progress=False)
    for k in range(2):
        alone = geodesic(
            net, starts[k], ends[k], n_points=10, iterations=30, n_out=5, progress=False
        )
        np.testing.assert_allclose(both[k].points, alone.points, atol=1e-5)
        np.testing.assert_allclose(both[k].energy, alone.energy, rtol=1e-5)


def test_geodesic_refuses_points_outside_the_square():
    with pytest.raises(InvalidArgumentError, match="end .* outside"):
        geodesic(FreeEnergyNet(4, 1), (0.1, 0.1), (1.2, 0.5), iterations=1, progress=False)


# -- files and boundaries ----------------------------------------------------------------------------
def test_free_energy_round_trips_through_safetensors(tmp_path):
    net = FreeEnergyNet(width=6, depth=2)
    path = tmp_path / "f.safetensors"
    save_free_energy(net, path, {"note": "x"})
    loaded, meta = load_free_energy(path)
    u = torch.rand(5, 2)
    torch.testing.assert_close(loaded(u), net(u))
    assert meta["note"] == "x" and meta["width"] == "6"
    assert path.read_bytes()[:8] != b"PK\x03\x04"  # not a zip (torch.save) archive
    (tmp_path / "g.safetensors").write_bytes(
        path.read_bytes().replace(b"free energy", b"other thing")
    )
    with pytest.raises(InvalidArgumentError, match="not a flux-ir free-energy file"):
        load_free_energy(tmp_path / "g.safetensors")


def test_class_boundaries_and_contrast():
    classes = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 1]])
    edge = class_boundaries(classes)
    assert edge.tolist() == [[False, True, True]] * 3
    c = boundary_contrast(np.where(edge, 4.0, 1.0), classes)
    assert (c.boundary_mean, c.interior_mean, c.ratio) == (4.0, 1.0, 4.0)
    assert (c.boundary_cells, c.interior_cells) == (6, 3)


def test_line_pairs_stay_inside_a_class_or_cross_a_boundary():
    # three regions: a diagonal band of class 2 between class 0 (upper left) and class 1
    r, c = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    classes = np.where(np.abs(r - c) <= 2, 2, np.where(r < c, 0, 1))
    pairs = line_pairs(classes, 3, min_cells=4, max_cells=7, min_gap=2)
    assert len(pairs.same) == 3 and len(pairs.crossing) == 3
    edge = class_boundaries(classes)
    # one same-class pair per class before any class is used twice
    assert {int(classes[a]) for a, _ in pairs.same} == {0, 1, 2}
    for a, b in pairs.same + pairs.crossing:
        assert 4 <= pairs.chord((a, b)) <= 7
        assert not edge[a] and not edge[b]
        assert min(a + b) >= 1 and max(a + b) <= 14  # a margin of one cell
    for a, b in pairs.same:
        cells = line_cells(a, b)
        assert (classes[cells[:, 0], cells[:, 1]] == classes[a]).all()
    for a, b in pairs.crossing:
        assert classes[a] != classes[b]
    assert len({frozenset(p) for p in pairs.same + pairs.crossing}) == 6
    assert line_pairs(classes, 3, min_cells=4, max_cells=7, min_gap=2) == pairs  # deterministic
    one = line_pairs(np.zeros((10, 10), dtype=int), 2, min_cells=3, max_cells=5)
    assert one.crossing == [] and len(one.same) == 2
    np.testing.assert_array_equal(line_cells((0, 0), (0, 3))[[0, -1]], [[0, 0], [0, 3]])
    with pytest.raises(InvalidArgumentError, match="min_cells"):
        line_pairs(classes, 1, min_cells=5, max_cells=4)


def test_boundary_segments_lie_between_cells_of_different_classes():
    from flux_ir.plots.fisher import boundary_segments

    classes = np.array([[0, 0, 1], [0, 0, 1], [2, 2, 1]])
    segs = boundary_segments(classes, np.array([0.0, 1.0, 2.0]), np.array([10.0, 12.0, 14.0]))
    assert segs.shape == (2 + 3, 2, 2)  # rows 1|2 at columns 0, 1; columns 1|2 at rows 0, 1, 2
    horizontal = segs[segs[:, 0, 1] == segs[:, 1, 1]]
    np.testing.assert_allclose(sorted(horizontal[:, :, 0].ravel()), [9, 11, 11, 13])
    assert (horizontal[:, :, 1] == 1.5).all()  # x = beta, y = alpha halfway between rows 1 and 2
    vertical = segs[segs[:, 0, 0] == segs[:, 1, 0]]
    assert (vertical[:, :, 0] == 13.0).all() and len(vertical) == 3


@pytest.mark.slow
def test_a_wider_network_recovers_the_exact_fisher_metric_within_10_percent():
    """As the fast test, with a 64-wide network and 1500 steps: about 6% (2% with the exact
    limiting posteriors, no draws; 7% with 1,000 draws, 9% with 250)."""
    family = BernoulliFamily()
    ax = np.linspace(0, 1, 15)
    points = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    post = family.posteriors(points, 2500, 25, 32, np.random.default_rng(0))
    fit = fit_free_energy(
        torch.tensor(post), torch.tensor(points), n_samples=25, width=64, steps=1500,
        eval_every=150, progress=False,
    )  # fmt: skip
    assert interior_error(fit.net, family) < 0.10
