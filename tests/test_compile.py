"""Capture through compiled blocks: hooks stay outside the compiled graphs (no graph break)."""

import torch

from flux_ir.capture import run_capture
from flux_ir.models import load_pipeline
from flux_ir.models.compile import compile_blocks

from .conftest import small_opts
from .test_fast_capture import assert_same_capture


def test_capture_with_compiled_blocks_matches_eager(tiny_capture):
    torch._dynamo.reset()
    pipe, spec = load_pipeline("flux-tiny", device="cpu")
    compile_blocks(pipe.transformer, backend="eager")  # fullgraph: a hook in the graph would raise
    _, cap = run_capture(pipe, small_opts(), model_name=spec.name)
    assert_same_capture(cap, tiny_capture[1])
    torch._dynamo.reset()
