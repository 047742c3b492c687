"""Regional compilation that keeps capture hooks outside the compiled code.

    compile_blocks(pipe.transformer)              # torch.compile each block's forward, fullgraph
    # compile_pipeline(pipe, "max-autotune-no-cudagraphs")  # the blocks and the VAE decoder (sweeps)

diffusers' `compile_repeated_blocks` compiles each block's `_call_impl`, so forward hooks (the
capture's) would be traced into the graph: a graph break, or an error with `fullgraph=True`. Here the
blocks' `forward` methods are compiled instead; `nn.Module.__call__` stays eager and runs the hooks
around the compiled forward. All blocks of a class share one compiled graph (dynamo treats the module
as an input, `inline_inbuilt_nn_modules`), so a run compiles once per block class and shape, not per
step. A batch of another size compiles once more (then with dynamic shapes).

`compile_pipeline` (the sweep's `compile=`) adds the VAE decoder's forward. Its `mode` is
torch.compile's: "default", "max-autotune-no-cudagraphs" (inductor also times its own matrix
multiplication kernels against cuBLAS: longer compilation) or "reduce-overhead" (CUDA graphs:
each block call replays a recorded graph; with regional compilation every block position of the
step records its own graph). A 512² batch of 8 is compute-bound (a FLUX step takes hundreds of
milliseconds against a few of kernel launches), so CUDA graphs have little to remove there.
"""

from __future__ import annotations

import torch
from torch import nn

from flux_ir.errors import InvalidArgumentError

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
COMPILED = "_flux_ir_compiled"  # attribute of a compiled transformer / VAE decoder: its settings


def compile_blocks(transformer: nn.Module, **compile_kwargs) -> nn.Module:
    """Replace each double/single block's `forward` with `torch.compile(forward)`; returns the model.

    `compile_kwargs` go to `torch.compile` (default `fullgraph=True`). A transformer compiled
    already is left as it is.
    """
    if getattr(transformer, COMPILED, None) is not None:
        return transformer
    compile_kwargs.setdefault("fullgraph", True)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.forward = torch.compile(block.forward, **compile_kwargs)
    setattr(transformer, COMPILED, dict(compile_kwargs))
    return transformer


def check_compile_mode(mode: str | None, param: str = "compile") -> str | None:
    """`mode` (None: off; True: "default") as one of COMPILE_MODES, or InvalidArgumentError."""
    if mode is None or mode is False:
        return None
    if mode is True:
        return "default"
    if mode not in COMPILE_MODES:
        raise InvalidArgumentError(
            f"{{param}} {mode!r}: choose one of {', '.join(COMPILE_MODES)} (or leave it off)", param
        )
    return mode


def compile_pipeline(
    pipe, mode: str = "default", *, vae: bool = True, eager_casts: bool = False, **compile_kwargs
):
    """Compile `pipe`'s transformer blocks (`compile_blocks`) and, with `vae`, its VAE decoder's
    forward, in torch.compile's `mode` (COMPILE_MODES); `compile_kwargs` go to torch.compile
    (`backend="eager"` checks graph capture without code generation). Parts compiled already are
    left as they are. Compilation itself happens at the first call of each part. Returns `pipe`.

    `eager_casts`: inductor rounds to the tensors' dtype (bfloat16) where eager PyTorch does, between
    the operations it fuses (its `emulate_precision_casts`), instead of keeping float32 through a
    fused kernel: images closer to eager's, at some cost in speed (benchmarks/bench_sweep_compiled.py
    measures both)."""
    mode = check_compile_mode(mode, "mode")
    if eager_casts:
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), "emulate_precision_casts": True}
        kwargs = {**compile_kwargs, "options": options}
    else:
        kwargs = {**compile_kwargs, **({} if mode == "default" else {"mode": mode})}
    compile_blocks(pipe.transformer, **kwargs)
    decoder = pipe.vae.decoder
    if vae and getattr(decoder, COMPILED, None) is None:
        decoder.forward = torch.compile(decoder.forward, **kwargs)
        setattr(decoder, COMPILED, dict(kwargs))
    return pipe
