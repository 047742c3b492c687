"""Joint attention between chosen text tokens and the image tokens, recorded during generation.

    opts = SamplingOptions.from_spec(resolve_model("flux-tiny"), prompt="a cat", width=64, height=64)
    words = token_indices(pipe, opts.prompt, ["cat"])      # {"cat": 1}: T5 positions of the words
    with AttentionTrace(pipe.transformer, tokens=words, steps=(-1,), num_steps=opts.num_steps) as trace:
        generate(pipe, opts, seed=0)
    maps = trace.maps                       # AttentionMaps of the conditional pass
    maps["single", -1, -1].shape            # [B, T, H/16, W/16]: (1, 1, 4, 4)
    save_attention(maps, "attention.safetensors")
    maps = load_attention("attention.safetensors")

FLUX attends jointly: in a double block the text and image queries, keys and values are concatenated
(text first) into one softmax(QK^T / sqrt(d)) V; a single block does the same on its [txt; img]
sequence. For the chosen blocks and steps the trace sees the q and k [B, L + N, heads, d] that
FluxAttnProcessor hands to the attention kernel (rotated, in the model's dtype; diffusers'
`dispatch_attention_fn` is routed through the trace while it is open) and computes beside the
kernel only what the selection needs:
- "txt->img": the softmax row of each chosen text token (as query) over all L + N keys (T rows, one
  small product), split into its image part [B, T, H/16, W/16] (`maps[kind, block, step]`) and its
  text part [B, T, L] (`maps.to_text[kind, block, step]`); the two sum to 1;
- "img->txt": how much each image token (as query) attends to each chosen text token, [B, T, H/16,
  W/16]: exp(q k_t / sqrt(d) - logsumexp of the query's row) for the T chosen keys. The logsumexp
  comes from the attention kernel itself (flash / memory-efficient / cuDNN on CUDA, flash on the
  CPU: the kernel torch's SDPA picks, called with the same inputs; its output is checked bit for
  bit against SDPA's once per run and input shape, and used as the model's attention output); where
  no such kernel gives the very output, it is computed on the side in chunks of queries;
- "concept" (in the spirit of ConceptAttention): the attention outputs themselves, each image
  token's output o_n [heads * d] against each chosen text token's output o_t: softmax over the T
  chosen tokens of o_n . o_t, [B, T, H/16, W/16] (choose several tokens: the maps of one sum to 1).
Probabilities are averaged over the heads (or the chosen `heads`) on the device, kept there until
the context exits (no host sync per block), then moved to the CPU as float32. The model's attention
output is the one plain generation computes, so generated images are bit for bit those of a run
without the trace. Hooks are registered on entering the context and always removed on exit (also on
exceptions). As in `BlockTrace`, each transformer call is a pass, two per step with true CFG (the
conditional first; told apart by their shared timestep, or by `passes_per_step`); the unconditional
pass is left out unless `passes="uncond"` or `"both"`. One run per context.

Maps recorded with a capture (`run_capture(..., attention=AttentionOptions(...))`) are part of it:
`cap.attention[kind, block, step]`, saved in the capture's files and read lazily by `load_capture`
(see `flux_ir.capture.schema`). `save_attention` / `load_attention` keep maps recorded on their own.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from flux_ir.capture.select import parse_indices, resolve
from flux_ir.errors import CaptureFileError, FluxIRError, InvalidArgumentError
from flux_ir.io.atomic import atomic_path

if TYPE_CHECKING:
    from diffusers import FluxPipeline

DIRECTIONS = ("txt->img", "img->txt")
CONCEPT = "concept"  # image tokens' attention outputs projected on the chosen tokens' outputs
ALL_DIRECTIONS = (*DIRECTIONS, CONCEPT)
PASSES = ("cond", "uncond")
KINDS = ("double", "single")
LOGSUMEXP = ("auto", "exact")
MAX_SCORES = 1 << 26  # score elements materialised at once for img->txt (256 MB of float32)
FORMAT = "flux-ir attention 1"
TO_TEXT = "txt->txt"  # the name of the txt->img rows' text parts in files


@dataclass(frozen=True)
class AttentionOptions:
    """What to record; validated once here (and against the model in `resolve`).

    tokens: T5 positions of the text tokens, a list or `{name: position}` (`token_indices` gives one).
    double_blocks, single_blocks, steps: indices or ranges as in `Selection` (None: all; negative:
    from the end; steps need the run's `num_steps` for that). heads: "mean" (all heads) or head
    indices whose average is kept. direction: "txt->img", "img->txt", "both" (those two),
    "concept", or a comma-separated list of them ("txt->img,concept"). passes: "cond"
    (default), "uncond" or "both" (true CFG's unconditional pass). logsumexp: how img->txt rows are
    normalised: "auto" takes each image query's logsumexp from the attention kernel itself where
    that kernel gives the model's output bit for bit (checked once per run), else computes it;
    "exact" always computes it on the side. max_scores: score elements computed at once for that
    side computation (its memory bound).

    >>> AttentionOptions(tokens={"circle": 2}, single_blocks="-1", steps="0,-1").names
    ('circle',)
    >>> AttentionOptions(tokens=[2], direction="img->img")
    Traceback (most recent call last):
    ...
    flux_ir.errors.InvalidArgumentError: direction 'img->img': choose txt->img, img->txt, concept or both (or a comma-separated list)
    """

    tokens: tuple[int, ...] | Mapping[str, int] | Sequence[int] | int
    double_blocks: tuple[int, ...] | str | None = None
    single_blocks: tuple[int, ...] | str | None = None
    steps: tuple[int, ...] | str | None = None
    heads: str | tuple[int, ...] = "mean"
    direction: str = "txt->img"
    passes: str = "cond"
    logsumexp: str = "auto"
    max_scores: int = MAX_SCORES
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tokens = self.tokens
        names = tuple(self.names)
        if isinstance(tokens, Mapping):
            names, tokens = tuple(str(k) for k in tokens), tuple(tokens.values())
        elif isinstance(tokens, int):
            tokens = (tokens,)
        if isinstance(tokens, str) or not isinstance(tokens, Sequence) or not tokens:
            raise InvalidArgumentError(
                f"{{param}} must be T5 positions (a list or a {{name: position}} dict from "
                f"token_indices), got {self.tokens!r}",
                "tokens",
            )
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in tokens):
            raise InvalidArgumentError(
                f"{{param}} must be non-negative T5 positions, got {list(tokens)!r}", "tokens"
            )
        if len(set(tokens)) != len(tokens):
            raise InvalidArgumentError(f"{{param}} repeat a position: {list(tokens)!r}", "tokens")
        names = names or tuple(f"#{t}" for t in tokens)
        if len(names) != len(tokens):
            raise InvalidArgumentError(
                f"{{param}}: {len(names)} names for {len(tokens)} tokens", "names"
            )
        object.__setattr__(self, "tokens", tuple(tokens))
        object.__setattr__(self, "names", names)
        for name in ("double_blocks", "single_blocks", "steps"):
            value = parse_indices(getattr(self, name), name)
            object.__setattr__(self, name, None if value is None else tuple(value))
        heads = self.heads
        if isinstance(heads, int) and not isinstance(heads, bool):
            heads = (heads,)
        if heads != "mean":
            if (
                isinstance(heads, str)
                or not isinstance(heads, Sequence)
                or not heads
                or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in heads)
            ):
                raise InvalidArgumentError(
                    f"{{param}} must be 'mean' or head indices, got {self.heads!r}", "heads"
                )
            heads = tuple(sorted(set(heads)))
        object.__setattr__(self, "heads", heads)
        parts = [d.strip() for d in str(self.direction).split(",")]
        parts = [x for d in parts for x in (DIRECTIONS if d == "both" else (d,))]
        if not isinstance(self.direction, str) or any(d not in ALL_DIRECTIONS for d in parts):
            raise InvalidArgumentError(
                f"{{param}} {self.direction!r}: choose {', '.join(DIRECTIONS)}, {CONCEPT} or both "
                "(or a comma-separated list)",
                "direction",
            )
        if self.passes not in (*PASSES, "both"):
            raise InvalidArgumentError(
                f"{{param}} {self.passes!r}: choose one of {', '.join(PASSES)}, both", "passes"
            )
        if self.logsumexp not in LOGSUMEXP:
            raise InvalidArgumentError(
                f"{{param}} {self.logsumexp!r}: choose one of {', '.join(LOGSUMEXP)}", "logsumexp"
            )
        if isinstance(self.max_scores, bool) or not isinstance(self.max_scores, int):
            raise InvalidArgumentError(
                f"{{param}} must be a positive integer, got {self.max_scores!r}", "max_scores"
            )
        if self.max_scores < 1:
            raise InvalidArgumentError(
                f"{{param}} must be >= 1, got {self.max_scores}", "max_scores"
            )

    @property
    def directions(self) -> tuple[str, ...]:
        """The recorded directions, in the order of ALL_DIRECTIONS."""
        parts = [d.strip() for d in self.direction.split(",")]
        parts = [x for d in parts for x in (DIRECTIONS if d == "both" else (d,))]
        return tuple(d for d in ALL_DIRECTIONS if d in parts)

    @property
    def pass_names(self) -> tuple[str, ...]:
        return PASSES if self.passes == "both" else (self.passes,)

    def resolve(
        self, num_double: int, num_single: int, num_heads: int, num_steps: int | None = None
    ) -> AttentionOptions:
        """Concrete block (and step) indices, checked against the model (and the run's steps)."""
        steps = self.steps
        if num_steps is not None:
            steps = tuple(resolve(None if steps is None else list(steps), num_steps, "steps"))
        elif steps is not None and any(s < 0 for s in steps):
            raise InvalidArgumentError(
                "{param}: negative steps need the run's step count; pass num_steps=opts.num_steps",
                "steps",
            )
        if self.heads != "mean" and self.heads[-1] >= num_heads:
            raise InvalidArgumentError(
                f"{{param}} {list(self.heads)}: the model has {num_heads} heads (0-{num_heads - 1})",
                "heads",
            )

        def blocks(value, n, name):
            return tuple(resolve(None if value is None else list(value), n, name))

        return replace(
            self,
            double_blocks=blocks(self.double_blocks, num_double, "double_blocks"),
            single_blocks=blocks(self.single_blocks, num_single, "single_blocks"),
            steps=None if steps is None else tuple(sorted(set(steps))),
        )


@dataclass(eq=False)
class AttentionMaps:
    """Recorded maps of one kind of pass: `maps[kind, block, step]` -> [B, T, H/16, W/16] float32.

    Blocks and steps may be negative (from the end of the model and of the run). With both directions
    recorded, name one: `maps[kind, block, step, "img->txt"]`. `to_text[kind, block, step]` is the
    txt->img rows' text part [B, T, L]. `tokens`: names of the T text tokens; `token_indices`: their
    T5 positions; `grid`: (H/16, W/16); `tensors`: every map by (direction, kind, block, step), as
    recorded (non-negative indices). Maps read from a capture file are read from it when indexed.
    """

    tokens: tuple[str, ...]
    token_indices: tuple[int, ...]
    directions: tuple[str, ...]
    heads: str | tuple[int, ...]
    pass_name: str
    num_blocks: dict[str, int]
    num_steps: int = 0
    grid: tuple[int, int] | None = None
    tensors: MutableMapping[tuple[str, str, int, int], torch.Tensor] = field(default_factory=dict)
    to_text: MutableMapping[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def blocks(self) -> dict[str, list[int]]:
        """Recorded block indices {"double": [...], "single": [...]}."""
        return {k: sorted({b for _, kind, b, _ in self.tensors if kind == k}) for k in KINDS}

    @property
    def steps(self) -> list[int]:
        return sorted({s for *_, s in self.tensors})

    def token(self, token: str | int) -> int:
        """The index along T of a token name (or of a T5 position given as an int)."""
        if isinstance(token, str) and token in self.tokens:
            return self.tokens.index(token)
        if isinstance(token, int) and token in self.token_indices:
            return self.token_indices.index(token)
        raise KeyError(f"token {token!r} not recorded; recorded: {', '.join(self.tokens)}")

    def key(self, kind: str, block: int, step: int, direction: str | None = None):
        """The stored key of (kind, block, step[, direction]), negatives resolved; KeyError if absent."""
        if direction is None:
            if len(self.directions) != 1:
                many = "both directions" if len(self.directions) == 2 else "several directions"
                raise KeyError(f"{many} were recorded: name one of {self.directions}")
            direction = self.directions[0]
        n = self.num_blocks.get(kind, 0)
        block = block + n if block < 0 else block
        step = step + self.num_steps if step < 0 else step
        key = (direction, kind, block, step)
        if key not in self.tensors:
            raise KeyError(
                f"no {direction} map for {kind} block {block} at step {step}; recorded blocks "
                f"{self.blocks}, steps {self.steps}, directions {list(self.directions)}"
            )
        return key

    def __getitem__(self, key: tuple) -> torch.Tensor:
        return self.tensors[self.key(*key)]

    def __contains__(self, key: tuple) -> bool:
        try:
            self.key(*key)
        except KeyError:
            return False
        return True

    def stack(self, direction: str | None = None) -> torch.Tensor:
        """[blocks in depth order, steps, B, T, H/16, W/16] of every recorded block and step."""
        rows = [(k, b) for k, idx in self.blocks.items() for b in idx]
        return torch.stack(
            [torch.stack([self[k, b, s, direction] for s in self.steps]) for k, b in rows]
        )

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "tokens": list(self.tokens),
            "token_indices": list(self.token_indices),
            "directions": list(self.directions),
            "heads": self.heads if self.heads == "mean" else list(self.heads),
            "pass_name": self.pass_name,
            "num_blocks": dict(self.num_blocks),
            "num_steps": self.num_steps,
            "grid": None if self.grid is None else list(self.grid),
        }

    # -- as files hold them ----------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Every map by a flat name: "{direction}/{kind}/{block}/{step}" ([B, T, H/16, W/16]) and
        "txt->txt/{kind}/{block}/{step}" (the `to_text` parts [B, T, L]); contiguous, as stored."""
        out = {"/".join(map(str, key)): t.contiguous() for key, t in self.tensors.items()}
        out |= {
            "/".join(map(str, (TO_TEXT, *key))): t.contiguous() for key, t in self.to_text.items()
        }
        return out

    @classmethod
    def from_tensors(cls, metadata: dict, tensors: Mapping[str, torch.Tensor]) -> AttentionMaps:
        """Maps from `metadata()` and `to_tensors()`'s names; `tensors` is read only when a map is
        indexed (a lazy mapping stays lazy). Raises CaptureFileError if they are not such maps."""
        md = metadata
        try:
            if md.get("format") != FORMAT:
                raise ValueError(f"format {md.get('format')!r}")
            heads = md["heads"]
            return cls(
                tokens=tuple(md["tokens"]),
                token_indices=tuple(md["token_indices"]),
                directions=tuple(md["directions"]),
                heads=heads if heads == "mean" else tuple(heads),
                pass_name=md["pass_name"],
                num_blocks=dict(md["num_blocks"]),
                num_steps=int(md["num_steps"]),
                grid=None if md["grid"] is None else tuple(md["grid"]),
                tensors=_Named(tensors, maps=True),
                to_text=_Named(tensors, maps=False),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CaptureFileError(f"not flux-ir attention maps ({err})") from err

    def __repr__(self) -> str:
        return (
            f"AttentionMaps({self.pass_name}, tokens {list(self.tokens)}, "
            f"{'/'.join(self.directions)}, blocks {self.blocks}, steps {self.steps}, "
            f"grid {self.grid}, heads {self.heads})"
        )


class _Named(MutableMapping):
    """A view of flat-named tensors ("dir/kind/block/step") keyed by tuples: maps (direction, kind,
    block, step) or to-text parts (kind, block, step). Names are listed on first use, tensors read
    when indexed; what is assigned (e.g. a move to the CPU) is kept in the view."""

    def __init__(self, source: Mapping[str, torch.Tensor], maps: bool):
        self.source, self.maps = source, maps
        self._names: dict[tuple, str] | None = None
        self._held: dict[tuple, torch.Tensor] = {}

    def names(self) -> dict[tuple, str]:
        if self._names is None:
            names = {}
            for name in self.source:
                direction, kind, block, step = name.split("/")
                if (direction == TO_TEXT) != self.maps:
                    key = (kind, int(block), int(step))
                    names[(direction, *key) if self.maps else key] = name
            self._names = names
        return self._names

    def __getitem__(self, key: tuple) -> torch.Tensor:
        if key in self._held:
            return self._held[key]
        return self.source[self.names()[key]]

    def __setitem__(self, key: tuple, value: torch.Tensor) -> None:
        self.names()
        self._held[key] = value

    def __delitem__(self, key: tuple) -> None:
        raise TypeError("maps read from a file cannot be deleted")

    def __contains__(self, key: object) -> bool:
        return key in self.names() or key in self._held

    def __iter__(self):
        return iter(self.names().keys() | self._held.keys())

    def __len__(self) -> int:
        return len(self.names().keys() | self._held.keys())


class AttentionTrace:
    """Context manager recording text <-> image attention maps of a FLUX transformer.

    Args:
        transformer: a diffusers `FluxTransformer2DModel`.
        options: an `AttentionOptions`, or its fields as keywords (`tokens=...`, `steps=...`).
        num_steps: the run's denoising steps (needed for negative `steps`).
        passes_per_step: 2 with true CFG, 1 without; None tells them apart by the timestep (the
            passes of one step share it; one device sync per transformer call).

    `trace.maps` holds the maps of the first recorded kind of pass (cond by default),
    `trace.passes[name]` each kind's. `trace.normalised` counts the img->txt maps normalised by the
    attention kernel's own logsumexp ("kernel") and by the side computation ("exact").
    """

    def __init__(
        self,
        transformer: nn.Module,
        options: AttentionOptions | None = None,
        *,
        num_steps: int | None = None,
        passes_per_step: int | None = None,
        **fields,
    ):
        if options is None:
            options = AttentionOptions(**fields)
        elif fields:
            raise InvalidArgumentError(
                f"{{param}}: pass an AttentionOptions or its fields ({', '.join(fields)}), not both",
                "options",
            )
        if passes_per_step not in (None, 1, 2):
            raise InvalidArgumentError(
                f"{{param}} must be 1, 2 or None (auto), got {passes_per_step!r}", "passes_per_step"
            )
        self.transformer = transformer
        self.options = options.resolve(
            len(transformer.transformer_blocks),
            len(transformer.single_transformer_blocks),
            transformer.transformer_blocks[0].attn.heads
            if len(transformer.transformer_blocks)
            else transformer.single_transformer_blocks[0].attn.heads,
            num_steps,
        )
        self.passes_per_step = passes_per_step
        opt = self.options
        self.passes: dict[str, AttentionMaps] = {
            name: AttentionMaps(
                tokens=opt.names,
                token_indices=opt.tokens,
                directions=opt.directions,
                heads=opt.heads,
                pass_name=name,
                num_blocks={
                    "double": len(transformer.transformer_blocks),
                    "single": len(transformer.single_transformer_blocks),
                },
                num_steps=num_steps or 0,
            )
            for name in opt.pass_names
        }
        self.normalised = {"kernel": 0, "exact": 0}
        self._needs_lse = "img->txt" in opt.directions and opt.logsumexp == "auto"
        self._handles: list = []
        self._calls = 0
        self._step = -1
        self._pass = 0
        self._last_t: torch.Tensor | None = None
        self._active: AttentionMaps | None = None
        self._current: tuple[str, int] | None = None  # the block whose attention runs now
        self._recorded = False
        self._txt_len = 0
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # input signature -> whether the kernel that returns the logsumexp gives SDPA's output
        self._kernels: dict[tuple, bool] = {}

    @property
    def maps(self) -> AttentionMaps:
        return self.passes[self.options.pass_names[0]]

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> AttentionTrace:
        t = self.transformer
        try:
            self._handles.append(t.register_forward_pre_hook(self._on_call, with_kwargs=True))
            for kind, blocks, idx in (
                ("double", t.transformer_blocks, self.options.double_blocks),
                ("single", t.single_transformer_blocks, self.options.single_blocks),
            ):
                for i in idx:
                    attn = blocks[i].attn
                    self._handles.append(
                        attn.register_forward_pre_hook(self._enter_attn(kind, i), with_kwargs=True)
                    )
                    self._handles.append(
                        attn.register_forward_hook(self._leave_attn(kind, i), always_call=True)
                    )
            _listen(self)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()
        for maps in self.passes.values():  # steps seen: negative steps count from the run's end
            maps.num_steps = max(maps.num_steps, self._step + 1)
            # the maps stayed on the device during the run (no host sync per block): one move here
            for table in (maps.tensors, maps.to_text):
                for key, value in table.items():
                    table[key] = value.cpu()

    def _remove(self) -> None:
        _unlisten(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = None
        self._current = None

    # -- hooks -----------------------------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep")
        if self.passes_per_step is not None:
            self._step, self._pass = divmod(self._calls, self.passes_per_step)
        elif self._last_t is not None and t is not None and torch.equal(t, self._last_t):
            self._pass += 1
        else:
            self._step, self._pass = self._step + 1, 0
        self._last_t = t
        self._calls += 1
        name = PASSES[min(self._pass, 1)]
        steps = self.options.steps
        wanted = self._pass < 2 and (steps is None or self._step in steps)
        self._active = self.passes.get(name) if wanted else None
        if self._active is None:
            return
        enc = kwargs["encoder_hidden_states"]
        self._txt_len = int(enc.shape[1])
        bad = [i for i in self.options.tokens if i >= self._txt_len]
        if bad:
            raise InvalidArgumentError(
                f"{{param}} {bad}: the text has {self._txt_len} T5 tokens (0-{self._txt_len - 1})",
                "tokens",
            )
        if self._active.grid is None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            img_ids = kwargs["img_ids"]
            img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            h = int(img_ids[:, 1].max()) + 1
            self._active.grid = (h, hidden.shape[1] // h)

    def _enter_attn(self, kind: str, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._active is None:
                return
            # FluxAttention.forward(hidden_states, encoder_hidden_states, attention_mask, ...)
            mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
            if mask is not None:
                raise FluxIRError("AttentionTrace does not support attention masks")
            self._current, self._recorded = (kind, index), False

        return hook

    def _leave_attn(self, kind: str, index: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            current, self._current = self._current, None
            if current is not None and not self._recorded and output is not None:
                processor = type(getattr(module, "processor", None)).__name__
                raise FluxIRError(
                    f"AttentionTrace saw no attention call in {kind} block {index}: its processor "
                    f"{processor} does not call diffusers' dispatch_attention_fn (FluxAttnProcessor "
                    "does); set the default processor with transformer.set_attn_processor"
                )

        return hook

    # -- the side computation --------------------------------------------------------------------
    def _tokens_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text positions as an index on `device` (and the chosen heads), made once."""
        if device not in self._index:
            heads = self.options.heads
            self._index[device] = (
                torch.tensor(self.options.tokens, device=device),
                None if heads == "mean" else torch.tensor(heads, device=device),
            )
        return self._index[device]

    def _record(self, query, key, lse: torch.Tensor | None, out: torch.Tensor) -> None:
        """Rows of softmax(q k^T / sqrt(d)) that the selection needs, from the q and k [B, S, H, d]
        that the attention kernel received (rotated; text first), averaged over heads; `lse`
        [B, H, S]: the kernel's logsumexp of each query's scaled scores, or None; `out` [B, S, H, d]:
        the kernel's output (for concept maps). Kept on the device until the context exits
        (float32; B * T * N values per block and step)."""
        maps, (kind, index) = self._active, self._current
        self._recorded = True
        opt = self.options
        n_txt = self._txt_len
        tok, heads = self._tokens_on(query.device)
        if heads is not None:
            query, key = query.index_select(2, heads), key.index_select(2, heads)
            lse = None if lse is None else lse.index_select(1, heads)
        scale = 1.0 / math.sqrt(key.shape[-1])
        step = self._step
        b, n_img = query.shape[0], query.shape[1] - n_txt
        shape = (b, len(opt.tokens), *maps.grid)
        if "txt->img" in opt.directions:
            scores = _scores(query.index_select(1, tok), key).mul_(scale)  # [B, H, T, L + N]
            p = torch.softmax(scores, dim=-1).mean(1)  # [B, T, L + N]
            maps.tensors["txt->img", kind, index, step] = p[..., n_txt:].reshape(shape)
            maps.to_text[kind, index, step] = p[..., :n_txt].contiguous()
        if "img->txt" in opt.directions:
            q_img = query[:, n_txt:]
            if lse is not None:  # one small product: image queries x chosen text keys
                scores = _scores(q_img, key.index_select(1, tok)).mul_(scale)  # [B, H, N, T]
                p = scores.sub_(lse[:, :, n_txt:, None]).exp_().mean(1)  # [B, N, T]
                self.normalised["kernel"] += 1
            else:  # normalised by each image query's logsumexp over every key, in chunks
                chunk = max(1, opt.max_scores // (b * key.shape[2] * key.shape[1]))
                parts = []
                for i in range(0, n_img, chunk):
                    s = _scores(q_img[:, i : i + chunk], key).mul_(scale)  # [B, H, C, L + N]
                    lse_c = torch.logsumexp(s, dim=-1, keepdim=True)  # over every key
                    parts.append((s.index_select(-1, tok) - lse_c).exp_().mean(1))  # [B, C, T]
                p = torch.cat(parts, dim=1)
                self.normalised["exact"] += 1
            maps.tensors["img->txt", kind, index, step] = p.transpose(1, 2).reshape(shape)
        if CONCEPT in opt.directions:  # output space: softmax over the T tokens of o_img . o_t
            o = out if heads is None else out.index_select(2, heads)
            o_img, o_tok = o[:, n_txt:].flatten(2), o.index_select(1, tok).flatten(2)
            sim = _scores(o_img[:, :, None], o_tok[:, :, None])[:, 0]  # [B, N, T]
            p = torch.softmax(sim, dim=-1)
            maps.tensors[CONCEPT, kind, index, step] = p.transpose(1, 2).reshape(shape)

    def _attention(self, call, query, key, value, args) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The processor's attention output, and the kernel's logsumexp [B, H, S] when the kernel
        that returns it is the one SDPA runs for these inputs (checked bit for bit once per input
        signature; otherwise None, and the output is `call()`'s)."""
        if not self._needs_lse or not _plain_native(args) or query.requires_grad:
            return call(), None
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, S, d], as diffusers
        choice = int(torch._fused_sdp_choice(q, k, v))
        sig = (choice, q.device, q.dtype, q.shape, k.shape, q.stride(), k.stride(), v.stride())
        if self._kernels.get(sig) is False:
            return call(), None
        got = _sdpa_with_lse(choice, q, k, v)
        if got is None:
            self._kernels[sig] = False
            return call(), None
        out, lse = got
        if sig not in self._kernels:  # the first time: exactly the plain output, or never used
            plain = call()
            self._kernels[sig] = _same(out, plain) and _lse_matches(lse, q, k)
            if not self._kernels[sig]:
                return plain, None
        return out, lse


def _scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, R, H, d] . b [B, C, H, d] -> [B, H, R, C] float32 (low-precision inputs multiplied
    with float32 accumulation and output on CUDA, else cast first)."""
    bsz, r, h, d = a.shape
    a3 = a.transpose(1, 2).reshape(bsz * h, r, d)
    b3 = b.transpose(1, 2).reshape(bsz * h, b.shape[1], d).transpose(1, 2)
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.bmm(a3, b3, out_dtype=torch.float32).view(bsz, h, r, -1)
        except (RuntimeError, TypeError):  # a torch without bmm's out_dtype
            pass
    return torch.bmm(a3.float(), b3.float()).view(bsz, h, r, -1)


# -- the attention call, watched -------------------------------------------------------------------
_LISTENERS: list[AttentionTrace] = []
_ORIGINAL: dict[str, object] = {}


def _listen(trace: AttentionTrace) -> None:
    """Route FluxAttnProcessor's attention calls through `_dispatch` while a trace is open."""
    import diffusers.models.transformers.transformer_flux as flux

    if not _LISTENERS:
        _ORIGINAL["fn"] = flux.dispatch_attention_fn
        flux.dispatch_attention_fn = _dispatch
    _LISTENERS.append(trace)


def _unlisten(trace: AttentionTrace) -> None:
    import diffusers.models.transformers.transformer_flux as flux

    if trace in _LISTENERS:
        _LISTENERS.remove(trace)
        if not _LISTENERS:
            flux.dispatch_attention_fn = _ORIGINAL.pop("fn")


def _dispatch(query, key, value, *args, **kwargs):
    """diffusers' `dispatch_attention_fn` with the open traces shown its q and k [B, S, H, d]."""
    original = _ORIGINAL["fn"]
    listeners = [t for t in _LISTENERS if t._current is not None]
    if not listeners:
        return original(query, key, value, *args, **kwargs)

    def call():
        return original(query, key, value, *args, **kwargs)

    first = next((t for t in listeners if t._needs_lse), listeners[0])
    out, lse = first._attention(call, query, key, value, (args, kwargs))
    for trace in listeners:
        trace._record(query, key, lse, out)
    return out


def _plain_native(call_args: tuple) -> bool:
    """Whether a `dispatch_attention_fn` call is a plain SDPA call (diffusers' native backend, no
    mask, dropout, causality, scale, GQA or context parallelism)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    args, kwargs = call_args
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "attention_kwargs")
    given = dict(zip(names, args)) | kwargs
    if any(given.get(n) for n in names) or given.get("parallel_config") is not None:
        return False
    backend = given.get("backend")
    if backend is None:
        backend = _AttentionBackendRegistry.get_active_backend()[0]
    return backend in (AttentionBackendName.NATIVE, "native")


def _sdpa_with_lse(choice: int, q, k, v) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The output [B, S, H, d] (laid out as diffusers' native backend returns it) and logsumexp
    [B, H, S] of the fused kernel `choice` (torch's SDPBackend), or None where there is none."""
    from torch.nn.attention import SDPBackend

    aten = torch.ops.aten
    flash, efficient, cudnn = (
        int(b.value)
        for b in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
        )
    )
    try:
        if q.device.type == "cpu" and choice == flash:
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        elif choice == flash:
            out, lse = aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        elif choice == efficient:
            out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        elif choice == cudnn:
            out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
        else:
            return None
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return None
    if lse.dim() == 4:  # cuDNN: [B, H, S, 1]
        lse = lse[..., 0]
    lse = lse[:, :, : q.shape[2]]  # memory-efficient attention pads S to a multiple of 32
    if lse.shape != q.shape[:3]:
        return None
    return out.permute(0, 2, 1, 3), lse.float()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


def _lse_matches(lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel's logsumexp [B, H, S] is the natural logsumexp of the scaled scores, on
    the first, middle and last query."""
    rows = torch.tensor([0, q.shape[2] // 2, q.shape[2] - 1], device=q.device)
    s = q.index_select(2, rows).float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return bool(torch.allclose(lse.index_select(2, rows), s.logsumexp(-1), rtol=1e-4, atol=1e-3))


# -- text tokens -----------------------------------------------------------------------------------
def prompt_words(pipe: FluxPipeline, prompt: str, max_sequence_length: int | None = None):
    """[(word, T5 position of its first piece)] of `prompt` as the pipeline's T5 tokenizer splits it
    (a word starts at a piece beginning with "▁"; surrounding punctuation is dropped)."""
    tok = pipe.tokenizer_2
    length = max_sequence_length or tok.model_max_length
    ids = tok(prompt, max_length=length, truncation=True).input_ids
    words: list[tuple[str, int]] = []
    for pos, piece in enumerate(tok.convert_ids_to_tokens(ids)):
        if piece in tok.all_special_tokens:
            continue
        if piece.startswith("\u2581") or not words:
            words.append((piece.removeprefix("\u2581"), pos))
        else:
            words[-1] = (words[-1][0] + piece, words[-1][1])
    return [(w.strip(string.punctuation), p) for w, p in words if w.strip(string.punctuation)]


def token_indices(
    pipe: FluxPipeline,
    prompt: str,
    words: str | Sequence[str],
    max_sequence_length: int | None = None,
) -> dict[str, int]:
    """{word: T5 position} of `words` in `prompt` (case-insensitive; a word's first piece; its first
    occurrence), the text-token index `AttentionTrace(tokens=...)` takes. `max_sequence_length`: the
    T5 length of the run (default: the tokenizer's), words beyond it are cut off as the pipeline cuts
    them. Raises InvalidArgumentError naming `words` when one is not in the prompt."""
    if isinstance(words, str):
        words = [words]
    found = {}
    for word, pos in prompt_words(pipe, prompt, max_sequence_length):
        found.setdefault(word.lower(), pos)
    missing = [w for w in words if w.lower() not in found]
    if missing or not words:
        raise InvalidArgumentError(
            f"{{param}} {missing or list(words)!r} not among the prompt's T5 words "
            f"({', '.join(found) or 'none'})",
            "words",
        )
    return {w: found[w.lower()] for w in words}


# -- files -----------------------------------------------------------------------------------------
def save_attention(maps: AttentionMaps, path: str | Path) -> Path:
    """Write `maps` as one safetensors file (tensors plus JSON metadata), atomically.

    For maps of a capture, `run_capture(..., attention=AttentionOptions(...))` keeps them in the
    capture's own files instead (`cap.attention`); this file is for maps recorded on their own."""
    from safetensors.torch import save_file

    tensors = maps.to_tensors()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(path, needed=nbytes) as tmp:
        save_file(tensors, str(tmp), metadata={"flux_ir": json.dumps(maps.metadata())})
    return Path(path)


def load_attention(path: str | Path) -> AttentionMaps:
    """Read a file `save_attention` wrote (no pickle); CaptureFileError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = json.loads((f.metadata() or {}).get("flux_ir", "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CaptureFileError(f"cannot read attention maps from {path}: {err}") from err
    if md.get("format") != FORMAT:
        raise CaptureFileError(f"{path} is not a flux-ir attention file (save_attention's)")
    try:
        return AttentionMaps.from_tensors(md, tensors)
    except CaptureFileError as err:
        raise CaptureFileError(f"{path}: {err}") from err
