"""`fisher_geometry` and `flux-ir geometry` on a flux-tiny sweep: files, reuse of a fitted network,
determinism, geodesic images, and the command's errors before anything heavy runs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flux_ir.analysis import PixelEmbedder, fisher_geometry, load_free_energy
from flux_ir.cli import main
from flux_ir.errors import InvalidArgumentError

TINY = ["--model", "flux-tiny", "--width", "32", "--height", "32", "--num_steps", "2"]
SMALL = dict(width=8, depth=2, steps=6, metric_resolution=6, progress=False, device="cpu")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fisher") / "s"
    args = ["sweep", *TINY, "--n_alpha", "4", "--alpha", "-1,1", "--batch_size", "16"]
    assert main([*args, "--output_dir", str(out), "--progress=False", "--device", "cpu"]) == 0
    return out


def test_fisher_geometry_writes_its_files_and_reuses_the_fitted_network(sweep_dir):
    pairs = [((-1.0, 0.0), (1.0, 1.0))]
    first = fisher_geometry(
        sweep_dir, PixelEmbedder(8), geodesics=pairs, geodesic_iterations=3, **SMALL
    )
    assert not first.reused and first.resolution == 4  # a 4 x 4 sweep: 4 posterior cells a side
    analysis = sweep_dir / "analysis"
    with np.load(analysis / "fisher_pixel8.npz", allow_pickle=False) as data:
        assert data["metric"].shape == (6, 6, 2, 2) and data["det"].shape == (6, 6)
        assert data["alphas"][0] == -1.0 and data["alphas"][-1] == 1.0
        assert data["point_metric"].shape == (4, 4, 2, 2)
        np.testing.assert_allclose(data["point_det"], first.point_det)
        assert data["geodesic_0_points"].shape == (10, 2)
    summary = json.loads((analysis / "fisher_pixel8.json").read_text())
    geo = summary["geodesics"][0]
    assert geo["start"] == [-1.0, 0.0] and geo["end"] == [1.0, 1.0]
    np.testing.assert_allclose(first.geodesics[0].points[[0, -1]], [[-1.0, 0.0], [1.0, 1.0]])
    net, meta = load_free_energy(analysis / "fisher_pixel8.safetensors")
    assert json.loads(meta["settings"])["n_points"] == 16

    again = fisher_geometry(sweep_dir, PixelEmbedder(8), **SMALL)
    assert again.reused and again.n_samples == first.n_samples
    np.testing.assert_array_equal(again.point_metric, first.point_metric)
    refit = fisher_geometry(sweep_dir, PixelEmbedder(8), refit=True, **SMALL)
    assert not refit.reused  # fitted again, and deterministically so
    np.testing.assert_array_equal(refit.point_metric, first.point_metric)
    other = fisher_geometry(sweep_dir, PixelEmbedder(8), **{**SMALL, "steps": 7})
    assert not other.reused


def test_geodesics_added_later_are_saved_into_the_files(sweep_dir, tmp_path):
    result = fisher_geometry(sweep_dir, PixelEmbedder(8), **SMALL)
    analysis = sweep_dir / "analysis"
    with np.load(analysis / "fisher_pixel8.npz", allow_pickle=False) as data:
        assert "geodesic_0_points" not in data
    (geo,) = result.add_geodesics([((-1.0, 0.0), (1.0, 1.0))], iterations=3)
    with np.load(analysis / "fisher_pixel8.npz", allow_pickle=False) as data:
        assert "geodesic_0_points" not in data  # add_geodesics writes nothing
    assert result.save()["npz"] == analysis / "fisher_pixel8.npz"
    with np.load(analysis / "fisher_pixel8.npz", allow_pickle=False) as data:
        np.testing.assert_array_equal(data["geodesic_0_points"], geo.points)
        np.testing.assert_array_equal(data["point_det"], result.point_det)
    summary = json.loads((analysis / "fisher_pixel8.json").read_text())
    assert [g["start"] for g in summary["geodesics"]] == [[-1.0, 0.0]]
    assert summary["settings"] == result.settings and summary["settings"]["steps"] == 6


def test_fisher_geometry_refuses_points_outside_the_box(sweep_dir):
    with pytest.raises(InvalidArgumentError, match=r"endpoint \(2, 0\) lies outside"):
        fisher_geometry(sweep_dir, PixelEmbedder(8), geodesics=[((0, 0), (2, 0))], **SMALL)


COMMAND = ["--embedder", "pixel", "--width", "8", "--depth", "2", "--steps", "6"]
COMMAND += ["--metric_resolution", "6", "--device", "cpu", "--progress=False"]


def test_geometry_command_draws_the_metric_and_the_geodesic(sweep_dir, capsys):
    geo = ["--geodesic", "-0.5,0.2:0.5,0.8;-1,0:1,1", "--geodesic_iterations", "3"]
    assert main(["geometry", str(sweep_dir), *COMMAND, *geo, "--images=False"]) == 0
    out = capsys.readouterr().out
    assert "geodesic 0: (-0.5, 0.2) -> (0.5, 0.8)" in out
    assert "geodesic 1: (-1.0, 0.0) -> (1.0, 1.0)" in out
    analysis = sweep_dir / "analysis"
    for name in ("fisher_det_pixel32.png", "fisher_eig_pixel32.png"):
        assert Image.open(analysis / name).size[0] > 100
    assert (analysis / "fisher_geodesics_pixel32.png").is_file()
    assert not (analysis / "geodesic_pixel32_0").exists()  # --images=False: no model loaded


@pytest.mark.slow
def test_geometry_command_generates_the_images_along_a_geodesic_and_the_line(sweep_dir, capsys):
    """Between two grid points, the first and last images are the sweep's own (same weights, same
    latents), up to one level of float rounding."""
    geo = ["--geodesic", "-1,0:1,1", "--geodesic_points", "3", "--geodesic_iterations", "3"]
    assert main(["geometry", str(sweep_dir), *COMMAND, *geo]) == 0
    analysis = sweep_dir / "analysis"
    assert (analysis / "fisher_geodesic_pixel32_0.png").is_file()
    folder = analysis / "geodesic_pixel32_0"
    images = sorted(p.name for p in folder.glob("*.png"))
    assert images == [f"{k}_{i:02d}.png" for k in ("geodesic", "line") for i in range(3)]
    for name, grid_image in (("geodesic_00", "a000_b000"), ("line_02", "a003_b003")):
        got = np.asarray(Image.open(folder / f"{name}.png")).astype(int)
        assert (
            np.abs(got - np.asarray(Image.open(sweep_dir / "images" / f"{grid_image}.png"))).max()
            <= 1
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--geodesic", "0,0-1,1"], "--geodesic must look like 0.2,0.3:0.8,0.7"),
        (["--geodesic", "0,0:5,1"], "--geodesic endpoint (5, 1) lies outside the sweep's box"),
        (["--embedder", "dino"], "--embedder 'dino' is unknown"),
        (["--width", "0"], "--width must be a positive integer"),
    ],
)
def test_geometry_command_refuses_bad_input(sweep_dir, extra, message, capsys):
    args = ["geometry", str(sweep_dir), "--embedder", "pixel", "--device", "cpu", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_geometry_command_refuses_a_directory_without_a_sweep(tmp_path, capsys):
    assert main(["geometry", str(tmp_path), "--embedder", "pixel"]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err


def test_the_fit_runs_on_gpu_and_cpu_alike():
    """(Only where CUDA exists.) The posteriors agree across devices."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from flux_ir.analysis.fisher import kernel_posteriors

    e = torch.nn.functional.normalize(
        torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=1
    )
    u = torch.rand(50, 2, generator=torch.Generator().manual_seed(1))
    cpu = kernel_posteriors(e, u, 16)
    gpu = kernel_posteriors(e, u, 16, device="cuda").cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-7)
