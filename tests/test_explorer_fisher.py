"""The explorer's Fisher overlay and geodesics: a flux-tiny sweep with geometry files written by hand
(known values, NaN, zero and negative determinants, a dense field to resample) and by
`fisher_geometry`, read back through the sweep view."""

import json
import shutil

import numpy as np
import pytest

from flux_ir.analysis import PixelEmbedder, fisher_geometry
from flux_ir.explorer import Explorer
from flux_ir.explorer.views import log10_det
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep

SIZE = dict(width=32, height=32, num_steps=2)


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):
    """A 2 x 3 flux-tiny sweep (alpha 0, 1; beta 0, 0.5, 1), made once."""
    pipe, spec = tiny
    root = tmp_path_factory.mktemp("fisher-made")
    cfg = SweepConfig.from_spec(spec, **SIZE, grid=GridSpec(n_alpha=2, n_beta=3))
    run_sweep(pipe, cfg, root / "sweep", batch_size=6, progress=False)
    return root / "sweep"


@pytest.fixture
def served(made, tmp_path):
    """A fresh copy of the sweep in a served folder: (root, analysis folder)."""
    root = tmp_path / "served"
    shutil.copytree(made, root / "sweep")
    analysis = root / "sweep" / "analysis"
    analysis.mkdir(exist_ok=True)
    return root.resolve(), analysis


def sweep_view(root):
    explorer = Explorer(root, device="cpu")
    try:
        view = explorer.sweep("sweep")
    finally:
        explorer.close()
    json.dumps(view, allow_nan=False)  # what the server sends: no NaN, no infinity
    return view


GEO0 = np.array([[0.0, 0.0], [0.3, 0.2], [0.7, 0.6], [1.0, 1.0]])
CURVE0 = np.array([[0.0, 0.0], [0.1, 0.05], [0.3, 0.2], [0.5, 0.4], [0.7, 0.6], [1.0, 1.0]])
LINE0 = np.array([[0.0, 0.0], [1 / 3, 1 / 3], [2 / 3, 2 / 3], [1.0, 1.0]])
GEO1 = np.array([[1.0, 0.0], [0.5, 0.6], [0.0, 1.0]])
LINE1 = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
POINT_DET = np.array([[np.nan, 0.0, -2.0], [100.0, 1e-3, np.inf]])


def write_geometry(analysis, name, **arrays):
    with open(analysis / f"{name}.npz", "wb") as fh:
        np.savez(fh, **arrays)


def test_the_overlay_is_log10_of_point_det_with_none_where_it_is_not_positive(served):
    root, analysis = served
    dense = np.full((5, 5), 7.0)
    write_geometry(
        analysis,
        "fisher_pixel8",
        alphas=np.linspace(0, 1, 5),
        betas=np.linspace(0, 1, 5),
        det=dense,
        eig_max=dense,
        sweep_alphas=np.array([0.0, 1.0]),
        sweep_betas=np.array([0.0, 0.5, 1.0]),
        point_det=POINT_DET,
        geodesic_0_points=GEO0,
        geodesic_0_curve=CURVE0,
        line_0_points=LINE0,
        geodesic_1_points=GEO1,
        line_1_points=LINE1,
    )
    summary = {
        "geodesics": [
            {"start": [0.0, 0.0], "end": [1.0, 1.0], "length": 2.5, "line_length": 3.0,
             "deviation": 0.12, "relative_deviation": 0.085},
            {"start": [1.0, 0.0], "end": [0.0, 1.0], "length": 1.25, "line_length": 1.5,
             "deviation": 0.07, "relative_deviation": 0.05},
        ]
    }  # fmt: skip
    (analysis / "fisher_pixel8.json").write_text(json.dumps(summary))

    view = sweep_view(root)
    f = view["fisher"]["fisher_pixel8"]
    assert f["embedder"] == "pixel8" and f["source"] == "points"
    assert f["field"] == [[None, None, None], [2.0, pytest.approx(-3.0), None]]
    assert view["overlays"] == {}  # the Lipschitz overlays are apart

    g0, g1 = f["geodesics"]
    np.testing.assert_array_equal(g0["points"], GEO0)
    np.testing.assert_array_equal(g0["curve"], CURVE0)
    np.testing.assert_array_equal(g0["line"], LINE0)
    np.testing.assert_array_equal(g1["points"], GEO1)
    np.testing.assert_array_equal(g1["line"], LINE1)
    assert g1["curve"] is None
    assert (g0["length"], g0["line_length"], g0["deviation"]) == (2.5, 3.0, 0.12)
    assert (g1["start"], g1["end"], g1["length"]) == ([1.0, 0.0], [0.0, 1.0], 1.25)


def test_log10_det_leaves_out_what_has_no_logarithm():
    out = log10_det(np.array([10.0, 0.0, -1.0, np.nan, np.inf, 1e-6]))
    np.testing.assert_array_equal(np.isnan(out), [False, True, True, True, True, False])
    np.testing.assert_allclose(out[[0, 5]], [1.0, -6.0])


def test_without_matching_point_det_the_dense_field_is_resampled_at_the_grid(served):
    root, analysis = served
    # dense grid: alpha 0, 1; beta 0, 0.25, 0.75, 1: beta 0.5 lies halfway between two columns
    det = np.array([[1.0, 10.0, 30.0, 1000.0], [np.nan, 4.0, 8.0, 0.01]])
    common = dict(alphas=np.array([0.0, 1.0]), betas=np.array([0.0, 0.25, 0.75, 1.0]), det=det)
    write_geometry(analysis, "fisher_b", **common, point_det=np.ones((3, 3)))  # not the grid's
    write_geometry(analysis, "fisher_a", **common)  # no point_det at all
    write_geometry(  # point_det of the grid's shape, but of other points
        analysis, "fisher_c", **common, point_det=np.ones((2, 3)), sweep_alphas=np.array([0, 2.0])
    )
    view = sweep_view(root)
    assert list(view["fisher"]) == ["fisher_a", "fisher_b", "fisher_c"]  # sorted: a is the default
    expected = [[0.0, np.log10(20.0), 3.0], [None, np.log10(6.0), -2.0]]
    for name in ("fisher_a", "fisher_b", "fisher_c"):
        f = view["fisher"][name]
        assert f["source"] == "dense" and f["geodesics"] == []
        assert f["field"][1][0] is None  # nan at a dense node stays missing
        for got, want in zip(f["field"], expected, strict=True):
            assert got == [None if w is None else pytest.approx(w) for w in want]


def test_unreadable_pickled_or_outside_files_are_left_out(served, tmp_path):
    root, analysis = served
    (analysis / "fisher_broken.npz").write_bytes(b"not a zip file")
    with open(analysis / "fisher_pickled.npz", "wb") as fh:
        np.savez(fh, det=np.array([{"x": 1}], dtype=object), alphas=np.zeros(1))
    outside = tmp_path / "fisher_out.npz"
    with open(outside, "wb") as fh:
        np.savez(fh, point_det=np.ones((2, 3)))
    (analysis / "fisher_link.npz").symlink_to(outside)
    write_geometry(analysis, "fisher_good", point_det=np.full((2, 3), 10.0))
    view = sweep_view(root)
    assert list(view["fisher"]) == ["fisher_good"]
    assert view["fisher"]["fisher_good"]["field"] == [[1.0] * 3] * 2


def test_fisher_geometry_files_come_through_the_view(served):
    root, _ = served
    result = fisher_geometry(
        root / "sweep",
        PixelEmbedder(8),
        width=8,
        depth=2,
        steps=4,
        metric_resolution=5,
        geodesics=[((0.0, 0.0), (1.0, 1.0)), ((1.0, 0.0), (0.0, 0.5))],
        geodesic_points=6,
        geodesic_iterations=2,
        device="cpu",
        progress=False,
    )
    f = sweep_view(root)["fisher"]["fisher_pixel8"]
    assert f["source"] == "points"
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.log10(result.point_det)  # nan (None in the view) where det g <= 0
    want[~np.isfinite(want)] = np.nan
    got = np.array([[np.nan if x is None else x for x in row] for row in f["field"]])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert len(f["geodesics"]) == 2
    for geo, mine in zip(result.geodesics, f["geodesics"], strict=True):
        np.testing.assert_allclose(mine["points"], geo.points)
        np.testing.assert_allclose(mine["curve"], geo.curve)
        np.testing.assert_allclose(mine["line"], geo.line_points)
        assert mine["start"] == list(geo.start) and mine["end"] == list(geo.end)
        assert mine["length"] == pytest.approx(geo.length)
        assert mine["line_length"] == pytest.approx(geo.line_length)
        assert mine["deviation"] == pytest.approx(geo.deviation)
