"""Compiled sweeps: the blocks and the VAE decoder compile without graph breaks, and the images
match the eager sweep's."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from flux_ir.errors import InvalidArgumentError
from flux_ir.models import load_pipeline
from flux_ir.models.compile import COMPILED, compile_pipeline
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep
from flux_ir.sweep.run import SweepRunOptions


def small_cfg(spec) -> SweepConfig:
    return SweepConfig.from_spec(
        spec, width=64, height=64, num_steps=2, grid=GridSpec(n_alpha=2, n_beta=2)
    )


def pixels(root) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((root / "images").glob("*.png"))])


@pytest.mark.slow  # dynamo traces the blocks and the VAE decoder: tens of seconds
def test_compiled_sweep_matches_the_eager_one(tiny, tmp_path):
    torch._dynamo.reset()
    eager_pipe, spec = tiny
    cfg = small_cfg(spec)
    run_sweep(eager_pipe, cfg, tmp_path / "eager", batch_size=4, progress=False)
    pipe, _ = load_pipeline("flux-tiny", device="cpu")
    # fullgraph graph capture without code generation: a graph break would raise
    compile_pipeline(pipe, backend="eager")
    forward = pipe.transformer.transformer_blocks[0].forward
    result = run_sweep(pipe, cfg, tmp_path / "compiled", batch_size=4, progress=False, compile=True)
    assert pipe.transformer.transformer_blocks[0].forward is forward  # compiled once
    graphs = counters["stats"]["unique_graphs"]
    run_sweep(pipe, cfg, tmp_path / "again", batch_size=4, progress=False, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation per block or sweep
    assert getattr(pipe.vae.decoder, COMPILED) == {"backend": "eager"}
    assert result.store.read_metadata()["compile"] == "default"
    a, b = pixels(tmp_path / "eager"), pixels(tmp_path / "compiled")
    assert a.shape == b.shape == (4, 64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    torch._dynamo.reset()


def test_unknown_compile_modes_are_refused_before_anything_runs(tiny):
    cfg = small_cfg(tiny[1])
    with pytest.raises(InvalidArgumentError, match="^compile 'fast': choose one of default"):
        SweepRunOptions(cfg, compile="fast")
    assert SweepRunOptions(cfg, compile=True).compile == "default"
    assert SweepRunOptions(cfg).compile is None
