"""Regional compilation that keeps capture hooks outside the compiled code.

    compile_blocks(pipe.transformer)              # torch.compile each block's forward, fullgraph

diffusers' `compile_repeated_blocks` compiles each block's `_call_impl`, so forward hooks (the
capture's) would be traced into the graph: a graph break, or an error with `fullgraph=True`. Here the
blocks' `forward` methods are compiled instead; `nn.Module.__call__` stays eager and runs the hooks
around the compiled forward. All blocks of a class share one compiled graph (dynamo treats the module
as an input, `inline_inbuilt_nn_modules`), so a run compiles once per block class and shape, not per
step.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(transformer: nn.Module, **compile_kwargs) -> nn.Module:
    """Replace each double/single block's `forward` with `torch.compile(forward)`; returns the model.

    `compile_kwargs` go to `torch.compile` (default `fullgraph=True`).
    """
    compile_kwargs.setdefault("fullgraph", True)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.forward = torch.compile(block.forward, **compile_kwargs)
    return transformer
