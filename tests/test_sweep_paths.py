"""1-D paths (lerp, slerp) as sweeps: latents, the command line, resuming, analysis, bad input."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from flux_ir.cli import main
from flux_ir.errors import InvalidArgumentError
from flux_ir.models import resolve_model
from flux_ir.sweep import GridSpec, SweepConfig, path_latents, slerp_path, vertex_latents

TINY = ["--model", "flux-tiny", "--width", "32", "--height", "32", "--num_steps", "2"]


def test_slerp_points_of_a_sweep_equal_slerp_path_and_end_at_the_vertices():
    v = vertex_latents((0, 123), 32, 32)
    spec = GridSpec(n_alpha=5, n_beta=1, path="slerp", normalisation="none")
    z, before, after = path_latents(v, spec, spec.points())
    assert torch.allclose(z, slerp_path(v[0], v[1], 5), atol=1e-6)
    assert torch.allclose(z[0], v[0], atol=1e-5) and torch.allclose(z[-1], v[1], atol=1e-5)
    norms = v.flatten(1).norm(dim=1)
    assert torch.allclose(before, torch.linspace(0, 1, 5) * (norms[1] - norms[0]) + norms[0])
    assert torch.equal(before, after)


def test_a_path_points_latent_does_not_depend_on_its_batch():
    v = vertex_latents((0, 123), 32, 32)
    spec = GridSpec(n_alpha=6, n_beta=1, path="lerp")
    whole, _, _ = path_latents(v, spec, spec.points())
    single, _, _ = path_latents(v, spec, spec.points()[4:5])
    assert torch.equal(whole[4], single[0])
    assert torch.allclose(whole.flatten(1).norm(dim=1), torch.tensor(16.0 * 4 * 4).sqrt())


def test_a_grid_signature_is_unchanged_by_paths():
    assert "path" not in GridSpec().to_dict()  # sweeps made before paths existed still resume
    tiny = resolve_model("flux-tiny")
    assert SweepConfig.from_spec(tiny, grid=GridSpec(n_alpha=3, n_beta=1, path="lerp")).seeds == (
        0,
        123,
    )
    assert SweepConfig.from_spec(tiny).seeds == (0, 123, 200)


def test_path_sweep_writes_a_column_of_images_resumes_and_analyses(tmp_path, capsys):
    out = tmp_path / "p"
    args = ["sweep", *TINY, "--path", "slerp", "--points", "4", "--batch_size", "3"]
    assert main([*args, "--output_dir", str(out), "--progress=False"]) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"a{k:03d}_b000.png" for k in range(4)]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sweep"]["grid"]["path"] == "slerp" and meta["sweep"]["seeds"] == [0, 123]
    assert meta["grid_size"] == [4, 1] and meta["complete"]
    table = pd.read_csv(out / "points.csv")
    assert np.allclose(table["alpha"], [0, 1 / 3, 2 / 3, 1]) and (table["beta"] == 0).all()

    (out / "images" / "a002_b000.png").unlink()
    capsys.readouterr()
    assert main([*args, "--output_dir", str(out), "--progress=False"]) == 0
    assert "3 point(s) already done; generated 1 here" in capsys.readouterr().out

    lerp = ["sweep", *TINY, "--path", "lerp", "--points", "4", "--output_dir", str(out)]
    assert main(lerp) == 2
    assert "holds a different sweep (differs in: grid)" in capsys.readouterr().err

    assert main(["analyze", str(out), "--embedder", "pixel", "--phases=False"]) == 0
    field = pd.read_csv(out / "analysis" / "lipschitz_pixel32.csv")
    assert len(field) == 4 and field["lipschitz"].notna().all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--path", "bezier"], "--path 'bezier' is unknown; choose one of lerp, slerp"),
        (["--points", "5"], "--points needs --path lerp|slerp"),
        (["--path", "lerp", "--points", "1"], "--points must be an integer >= 2"),
        (["--path", "slerp", "--n_alpha", "5"], "a path takes --points N, not --n_alpha/--n_beta"),
        (["--path", "lerp", "--beta", "0,2"], "a path has no beta axis"),
        (
            ["--path", "lerp", "--seeds", "1,2,3"],
            "--seeds must be two integers (z0, z1) for a lerp path",
        ),
        (["--path", "slerp", "--alpha", "1,0"], "--alpha interval 1.0,0.0 is empty"),
    ],
)
def test_bad_path_input_fails_before_any_model_loads(args, message, tmp_path, capsys, monkeypatch):

    monkeypatch.setattr("flux_ir.models.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["sweep", *TINY, "--output_dir", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_path_vertices_file_needs_two_latents(tmp_path):
    three = tmp_path / "v.npy"
    np.save(three, np.zeros((3, 16, 4, 4), dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match=r"needs \(2, 16, 4, 4\)"):
        SweepConfig.from_spec(
            resolve_model("flux-tiny"),
            width=32,
            height=32,
            vertices=str(three),
            grid=GridSpec(n_alpha=3, n_beta=1, path="lerp"),
        )
