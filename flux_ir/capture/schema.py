"""The capture schema: `Capture` (one run's block outputs, denoising context and metadata, in the
original tool's schema) and how it is assembled from a trace's per-pass records.

    cap = load_capture(path)   # e.g. a flux-tiny capture: 2 double and 4 single blocks
    cap["single", 3]           # list over steps of [B, L + N, D] tensors ([txt; img])
    cap["double", 1, 0]        # (img [B, N, D], txt [B, L, D]) at step 0
    cap.image_tokens("double", 1, step=0)   # [B, N, D]
    cap.text_tokens("single", 0, step=0)    # [B, L, D]

`cap.to_dict()` is exactly what `torch.load(path)` returns: `double_blocks`, `single_blocks`,
`denoising_context`, `metadata` (plus `double_blocks_uncond` / `single_blocks_uncond` when true
CFG ran). Keys are `block_{i}`; the stored lists run over the captured steps, and
`metadata["captured_steps"]` maps their positions to denoising steps. The accessors take denoising
steps and model block indices, negative ones counting from the end: `cap["single", -1, -1]` is the last
single block at the last denoising step, and a step or block that was not captured is a KeyError
saying which were. `cap.stack("single")` gives [blocks, steps, B, tokens, D] in one tensor.

Attention maps recorded with the capture (`run_capture(..., attention=AttentionOptions(...))`, see
`flux_ir.capture.attention`) are `cap.attention` (the conditional pass; `cap.attention_uncond` for
true CFG's unconditional one, when asked for), indexed like the blocks:
    cap.attention["double", 0, -1]                # [B, T, H/16, W/16]: T chosen text tokens' maps
    cap.attention["single", 3, 5, "img->txt"]     # naming the direction when both were recorded
    cap.attention.to_text["single", 3, 5]         # [B, T, L]: the txt->img rows' text part
    cap.attention.tokens                          # ("circle", "background"): the names of T
They are saved in the capture's own files (`to_dict()["attention"]` in a `.pt` file, covered by its
sha256; `attention.safetensors` in a shard directory, with its checksums in the manifest) and read
by the same loader, a map only when it is indexed. Captures without maps have `attention` None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from flux_ir.capture.attention import AttentionMaps
from flux_ir.errors import CaptureFileError
from flux_ir.io.atomic import human_bytes

if TYPE_CHECKING:
    from flux_ir.capture.trace import PassRecord

KINDS = ("double", "single")


@dataclass
class Capture:
    double_blocks: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    single_blocks: dict[str, list[torch.Tensor]]
    denoising_context: dict[str, Any]
    metadata: dict[str, Any]
    double_blocks_uncond: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )
    single_blocks_uncond: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    attention: AttentionMaps | None = None
    attention_uncond: AttentionMaps | None = None

    # -- schema ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {
            "double_blocks": self.double_blocks,
            "single_blocks": self.single_blocks,
            "denoising_context": self.denoising_context,
            "metadata": self.metadata,
        }
        if self.double_blocks_uncond or self.single_blocks_uncond:
            out["double_blocks_uncond"] = self.double_blocks_uncond
            out["single_blocks_uncond"] = self.single_blocks_uncond
        attention = self.attention_passes
        if attention:
            out["attention"] = {
                name: {"metadata": maps.metadata(), "tensors": maps.to_tensors()}
                for name, maps in attention.items()
            }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capture:
        return cls(
            double_blocks=data["double_blocks"],
            single_blocks=data["single_blocks"],
            denoising_context=data["denoising_context"],
            metadata=data["metadata"],
            double_blocks_uncond=data.get("double_blocks_uncond", {}),
            single_blocks_uncond=data.get("single_blocks_uncond", {}),
            **attention_fields(_attention_from_dict(data.get("attention", {}))),
        )

    @property
    def attention_passes(self) -> dict[str, AttentionMaps]:
        """The recorded attention maps by pass ("cond", "uncond"); empty without maps."""
        both = {"cond": self.attention, "uncond": self.attention_uncond}
        return {name: maps for name, maps in both.items() if maps is not None}

    # -- guessable access ------------------------------------------------------------------------
    def blocks(self, kind: str, uncond: bool = False) -> dict:
        if kind not in KINDS:
            raise KeyError(f"block kind must be one of {KINDS}, not {kind!r}")
        if kind == "double":
            return self.double_blocks_uncond if uncond else self.double_blocks
        return self.single_blocks_uncond if uncond else self.single_blocks

    def __getitem__(self, key: tuple):
        """`cap[kind, block]`: the block's outputs over the captured steps (a list);
        `cap[kind, block, step]`: its output at denoising step `step`. Negative blocks and steps count
        from the end of the model and of the run; what was not captured is a KeyError saying so."""
        kind, index, *rest = key
        per_step = self.blocks(kind)[self.block_key(kind, index)]
        return per_step[self.step_position(rest[0])] if rest else per_step

    def block_key(self, kind: str, index: int) -> str:
        """`"block_{i}"` for block `index` of `kind` (negative: from the end of the model)."""
        n = self.metadata.get(f"num_{kind}_blocks")
        i = index + n if index < 0 and n is not None else index
        captured = self.block_indices[kind]
        if i not in captured:
            model = f"; the model has {n}" if n is not None else ""
            raise KeyError(
                f"{kind} block {index} was not captured (captured {kind} blocks: "
                f"{_ranges(captured)}{model})"
            )
        return f"block_{i}"

    def __repr__(self) -> str:
        md = self.metadata
        prompt = md.get("prompt", "")
        prompt = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        idx = self.block_indices
        blocks = ", ".join(f"{k} {_ranges(v)}" for k, v in idx.items() if v) or "none"
        lazy = any(not isinstance(v, list) for kind in KINDS for v in self.blocks(kind).values())
        size = "lazy, on disk" if lazy else human_bytes(self.nbytes)
        steps = self.captured_steps
        maps = next(iter(self.attention_passes.values()), None)
        attention = "" if maps is None else f", attention of {list(maps.tokens)}"
        return (
            f"Capture({md.get('model')!s}, {prompt!r}, {md.get('width')}x{md.get('height')}, "
            f"steps {_ranges(steps)} of {md.get('num_steps')}, blocks {blocks}, "
            f"streams {self.streams}{', reduce ' + self.reduction if self.reduction else ''}"
            f"{', true CFG' if self.has_uncond else ''}, {md.get('store_dtype') or md.get('dtype')}, "
            f"{size}{attention})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the block tensors held in memory (both passes)."""
        total = 0
        for kind in KINDS:
            for uncond in (False, True):
                for per_step in self.blocks(kind, uncond).values():
                    for value in per_step:
                        for t in value if isinstance(value, tuple) else (value,):
                            total += 0 if t is None else t.numel() * t.element_size()
        return total

    def stack(self, kind: str, stream: str = "img", uncond: bool = False) -> torch.Tensor:
        """Every captured block of `kind` at every captured step as one tensor
        [blocks, steps, B, tokens, D] (`stream` "img" or "txt"; blocks in depth order, steps as
        `captured_steps`). It is materialised: its size is blocks x steps x one block's output."""
        if stream not in ("img", "txt"):
            raise KeyError(f"stream must be 'img' or 'txt', not {stream!r}")
        get = self.image_tokens if stream == "img" else self.text_tokens
        return torch.stack(
            [
                torch.stack([get(kind, i, s, uncond) for s in self.captured_steps])
                for i in self.block_indices[kind]
            ]
        )

    @property
    def block_indices(self) -> dict[str, list[int]]:
        """Captured block indices per kind, in depth order."""
        return {kind: sorted(int(k.split("_")[1]) for k in self.blocks(kind)) for kind in KINDS}

    @property
    def captured_steps(self) -> list[int]:
        return list(self.metadata.get("captured_steps", range(self.metadata["num_steps"])))

    @property
    def has_uncond(self) -> bool:
        return bool(self.double_blocks_uncond or self.single_blocks_uncond)

    @property
    def streams(self) -> str:
        """Token streams held: "both", "img" or "txt" (captures without the field hold both)."""
        return self.metadata.get("streams", "both")

    @property
    def reduction(self) -> str | None:
        return self.metadata.get("reduce")

    def check_image_tokens(self) -> None:
        """Raise unless every image token of each captured block is held (what the lens needs)."""
        if self.streams == "txt" or self.reduction is not None:
            raise CaptureFileError(
                f"this capture holds {self.streams} streams with reduction {self.reduction!r}; the "
                "lens needs every image token. Re-capture with --streams both or img and no --reduce."
            )

    def image_tokens(self, kind: str, index: int, step: int, uncond: bool = False) -> torch.Tensor:
        """Image-token hidden states [B, N, D] of a block at denoising step `step`.

        (With a reduction, the reduced image tokens; raises when only text was captured.)
        """
        if self.streams == "txt":
            raise CaptureFileError("this capture holds only text tokens (--streams txt)")
        step = self.denoising_step(step)
        out = self.blocks(kind, uncond)[self.block_key(kind, index)][self.step_position(step)]
        if kind == "double":
            return out[0]
        if self.streams == "img":
            return out
        key = "txt_seq_len_uncond" if uncond else "txt_seq_len"
        txt_len = 1 if self.reduction == "mean" else self.denoising_context[key][step]
        return out[:, txt_len:]

    def text_tokens(self, kind: str, index: int, step: int, uncond: bool = False) -> torch.Tensor:
        """Text-token hidden states [B, L, D] of a block at step `step` (raises for img-only)."""
        if self.streams == "img":
            raise CaptureFileError("this capture holds only image tokens (--streams img)")
        step = self.denoising_step(step)
        out = self.blocks(kind, uncond)[self.block_key(kind, index)][self.step_position(step)]
        if kind == "double":
            return out[1]
        if self.streams == "txt":
            return out
        key = "txt_seq_len_uncond" if uncond else "txt_seq_len"
        txt_len = 1 if self.reduction == "mean" else self.denoising_context[key][step]
        return out[:, :txt_len]

    def denoising_step(self, step: int) -> int:
        """`step` as a denoising step index (negative: from the end of the run)."""
        return step + self.metadata["num_steps"] if step < 0 else step

    def step_position(self, step: int) -> int:
        """Position among the captured steps of denoising step `step` (negative: from the end)."""
        steps = self.captured_steps
        k = self.denoising_step(step)
        if k not in steps:
            raise KeyError(
                f"denoising step {step} was not captured (captured steps: {_ranges(steps)} of "
                f"{self.metadata['num_steps']})"
            )
        return steps.index(k)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts, run = [], []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts) or "none"


# -- assembling a capture ----------------------------------------------------------------------
def build_capture(
    records: dict[str, PassRecord],
    sigmas: list[float],
    guidance: float | None,
    final_latents: torch.Tensor,
    metadata: dict,
    attention: dict[str, AttentionMaps] | None = None,
) -> Capture:
    """Assemble the original tool's schema from a trace's per-pass records ("cond", "uncond"), with
    the attention maps recorded beside them (by pass name, as `AttentionTrace.passes`)."""
    cond = records["cond"]
    n = len(cond.img_state)
    context = {
        "y": cond.y,
        "img_state": cond.img_state,
        "timestep_pairs": [(sigmas[k], sigmas[k + 1]) for k in range(n)],
        "txt_seq_len": cond.txt_seq_len,
        "guidance": guidance,
        "temb": cond.temb,
        "final_latents": final_latents.detach().to("cpu", copy=True),
        "true_cfg_scale": metadata["true_cfg_scale"],
    }
    cap = Capture(
        double_blocks=_double(cond),
        single_blocks=_single(cond),
        denoising_context=context,
        metadata=plain(metadata),
        **attention_fields(attention or {}),
    )
    if "uncond" in records:
        unc = records["uncond"]
        context.update(y_uncond=unc.y, temb_uncond=unc.temb, txt_seq_len_uncond=unc.txt_seq_len)
        cap.double_blocks_uncond = _double(unc)
        cap.single_blocks_uncond = _single(unc)
    return cap


def _attention_from_dict(entries: dict) -> dict[str, AttentionMaps]:
    """Maps by pass from `to_dict()["attention"]`; CaptureFileError when it is not flux-ir's."""
    try:
        return {
            name: AttentionMaps.from_tensors(entry["metadata"], entry["tensors"])
            for name, entry in entries.items()
            if name in ("cond", "uncond")
        }
    except (KeyError, TypeError, AttributeError) as err:
        raise CaptureFileError(
            f"its 'attention' entry is not flux-ir attention maps ({err})"
        ) from err


def attention_fields(passes: dict[str, AttentionMaps]) -> dict[str, AttentionMaps]:
    """`Capture` keyword arguments for maps by pass name: {"attention": cond, "attention_uncond": ...}."""
    names = {"cond": "attention", "uncond": "attention_uncond"}
    return {names[name]: maps for name, maps in passes.items()}


def _double(rec: PassRecord) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    return {f"block_{i}": list(v) for i, v in sorted(rec.double.items())}


def _single(rec: PassRecord) -> dict[str, list[torch.Tensor]]:
    """Single-block outputs as the original tool stored them: `[txt; img]` along the sequence."""
    return {f"block_{i}": [joint_single(x) for x in v] for i, v in sorted(rec.single.items())}


def joint_single(value: torch.Tensor | tuple) -> torch.Tensor:
    """A single block's record as one tensor: `[txt; img]` [B, L + N, D] (or the one stream captured)."""
    if isinstance(value, torch.Tensor):
        return value
    parts = [p for p in value if p is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def plain(obj):
    """Builtin types only (str subclasses such as torch's version become str), for weights_only loads."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return (
            type(obj)(plain(v) for v in obj)
            if type(obj) in (list, tuple)
            else list(map(plain, obj))
        )
    if isinstance(obj, bool) or obj is None:
        return obj
    for t in (int, float, str):
        if isinstance(obj, t):
            return t(obj)
    raise TypeError(f"metadata value {obj!r} of type {type(obj).__name__} is not a plain type")
