"""Forward hooks that record every FLUX block's output at every denoising step.

    opts = SamplingOptions.from_spec(spec, prompt="a cat", width=64, height=64)
    with BlockTrace(pipe.transformer, Selection(single_blocks=(-1,))) as trace:
        generate(pipe, opts, seed=1)
    records = trace.records        # {"cond": PassRecord, "uncond": PassRecord (true CFG only)}

Hooks are registered on `transformer_blocks[i]` and `single_transformer_blocks[i]` when the context is
entered and always removed when it exits (also on exceptions and Ctrl-C). Each transformer call is one
*pass*; with true CFG diffusers makes two per step, the conditional first, so pass k of a run belongs to
step `k // passes_per_step` and is `"cond"` or `"uncond"` by `k % passes_per_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from flux_ir.capture.copy import HostCopier, SyncCopier
from flux_ir.capture.select import Selection
from flux_ir.errors import InvalidArgumentError

PASS_NAMES = ("cond", "uncond")


@dataclass
class PassRecord:
    """Everything recorded for one kind of transformer pass ("cond" or "uncond"), step by step.

    double[i][k] = (img [B, N, D], txt [B, L, D]); single[i][k] = [B, L + N, D] ([txt; img], one copy
    of the block's own output buffer), or a (txt, img) pair when streams or reductions are selected
    (a stream not captured is None; reduced streams have fewer tokens).
    img_state[k]: packed latents fed to the model [B, N, 64]; y[k]: pooled CLIP [B, P];
    temb[k]: conditioning embedding [B, D]; txt_seq_len[k]: L; steps: captured step indices.
    """

    double: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    single: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    img_state: list[torch.Tensor] = field(default_factory=list)
    y: list[torch.Tensor] = field(default_factory=list)
    temb: list[torch.Tensor] = field(default_factory=list)
    txt_seq_len: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


class BlockTrace:
    """Context manager recording block outputs and the denoising context of a FLUX transformer.

    Args:
        transformer: a diffusers `FluxTransformer2DModel`.
        selection: blocks, steps, streams, storage dtype and reduction to record (default: every
            block at every step, both streams); resolved against the transformer's blocks here, and
            its steps must be concrete (`Selection.resolve` with the run's step count). Context
            (latents, embeddings) is recorded for every step.
        passes_per_step: 2 when the pipeline runs true CFG (cond + uncond), else 1.
        copier: how tensors reach the host (default: synchronous copy to CPU).
        image_grid: latent token grid (H/16, W/16), needed only for pooling reductions.
        sink: called as `sink(pass_name, step, items, fence)` when a pass ends, with that pass's
            block tensors `{(kind, index): tensor or pair}` (valid once `fence` is set); they are then
            not kept in `records` (streaming: host memory bounded by what the sink holds).
    """

    def __init__(
        self,
        transformer: nn.Module,
        selection: Selection | None = None,
        *,
        passes_per_step: int = 1,
        copier: HostCopier | None = None,
        image_grid: tuple[int, int] | None = None,
        sink=None,
    ):
        self.transformer = transformer
        sel = (selection or Selection()).resolve(
            len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
        )
        self.selection = sel
        self.image_grid = image_grid
        self.sink = sink
        self.double_idx = list(sel.double_blocks)
        self.single_idx = list(sel.single_blocks)
        self.steps = None if sel.steps is None else set(sel.steps)
        if passes_per_step not in (1, 2):
            raise InvalidArgumentError(
                f"{{param}} must be 1 or 2, got {passes_per_step!r}", "passes_per_step"
            )
        self.passes_per_step = passes_per_step
        self.copier = copier or SyncCopier()
        self.records: dict[str, PassRecord] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls = 0
        self._current: PassRecord | None = None
        self._recording_blocks = False
        self._pass: tuple[str, int] | None = None
        self._items: dict[tuple[str, int], object] = {}

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> BlockTrace:
        t = self.transformer
        self._handles.append(t.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._handles.append(t.time_text_embed.register_forward_hook(self._on_temb))
        for i in self.double_idx:
            self._handles.append(
                t.transformer_blocks[i].register_forward_hook(self._block_hook("double", i))
            )
        for i in self.single_idx:
            self._handles.append(
                t.single_transformer_blocks[i].register_forward_hook(self._block_hook("single", i))
            )
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc[0] is None:
            self._end_pass()
        self.copier.synchronize()

    # -- hooks -----------------------------------------------------------------------------------
    def _end_pass(self) -> None:
        """Hand the finished pass's copies to the device; give its block tensors to the sink."""
        self.copier.flush()
        if self.sink is not None and self._pass is not None and self._items:
            items, self._items = self._items, {}
            self.sink(*self._pass, items, self.copier.fence())

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._end_pass()
        step, which = divmod(self._calls, self.passes_per_step)
        self._pass = (PASS_NAMES[which], step)
        self._calls += 1
        rec = self.records.setdefault(PASS_NAMES[which], PassRecord())
        self._current = rec
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        enc = kwargs.get("encoder_hidden_states")
        copy = self.copier.copy
        rec.img_state.append(copy(hidden))
        rec.y.append(copy(kwargs["pooled_projections"]))
        rec.txt_seq_len.append(int(enc.shape[1]))
        self._recording_blocks = self.steps is None or step in self.steps
        if self._recording_blocks:
            rec.steps.append(step)

    def _on_temb(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._current.temb.append(self.copier.copy(output))

    def _block_hook(self, kind: str, index: int):
        """The hook of one block, specialised once for the selection (the hot path does no parsing)."""
        sel = self.selection
        want_img, want_txt = sel.streams != "txt", sel.streams != "img"
        dtype = sel.torch_dtype
        copy = self.copier.copy
        if dtype is not None:
            plain_copy = copy

            def copy(t: torch.Tensor) -> torch.Tensor:
                return plain_copy(t if t.dtype == dtype else t.to(dtype))

        key = (kind, index)
        double = kind == "double"
        joint = sel.full and not double
        reduce_img = None if sel.reduce is None else sel.reduce_img
        reduce_txt = None if sel.reduce is None else sel.reduce_txt
        grid = self.image_grid

        def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            if not self._recording_blocks:
                return
            txt, img = output  # diffusers blocks return (encoder_hidden_states, hidden_states)
            if joint and (parent := _joint_parent(txt, img)) is not None:
                value = copy(parent)  # [txt; img]: one copy of the block's own buffer, no cat
            else:
                i = t = None
                if want_img:
                    i = copy(img if reduce_img is None else reduce_img(img, grid))
                if want_txt:
                    t = copy(txt if reduce_txt is None else reduce_txt(txt))
                value = (i, t) if double else (t, i)
            if self.sink is not None:
                self._items[key] = value
            else:
                store = self._current.double if double else self._current.single
                store.setdefault(index, []).append(value)

        return hook


def _joint_parent(txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor | None:
    """The contiguous [B, L + N, D] buffer whose slices a single block returns as (txt, img), if so.

    (Views made under inference mode do not keep `_base`, so adjacency is checked on the storage.)
    """
    b, n_txt, d = txt.shape if txt.dim() == 3 else (0, 0, 0)
    size = txt.element_size()
    # most selective test first: img starts where txt ends
    if not b or img.data_ptr() != txt.data_ptr() + n_txt * d * size:
        return None
    n_all = n_txt + img.shape[1]
    if (
        img.dim() != 3
        or txt.stride() != (n_all * d, d, 1)
        or img.stride() != txt.stride()
        or img.shape[0] != b
        or img.shape[2] != d
        # the joint view must stay inside txt's allocation (then img lies inside it too)
        or txt.untyped_storage().nbytes() < (txt.storage_offset() + b * n_all * d) * size
    ):
        return None
    return txt.as_strided((b, n_all, d), (n_all * d, d, 1))
