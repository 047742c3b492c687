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
sequence. For the chosen blocks and steps the trace computes, beside the processor and from the very
q and k it uses (read by forward hooks on the attention's q/k norms, then rotated as the processor
rotates them), only the rows the selection needs:
- "txt->img": the softmax row of each chosen text token (as query) over all L + N keys, split into
  its image part [B, T, H/16, W/16] (`maps[kind, block, step]`) and its text part [B, T, L]
  (`maps.to_text[kind, block, step]`); the two sum to 1;
- "img->txt": how much each image token (as query) attends to each chosen text token, [B, T, H/16,
  W/16]; each row is normalised by the logsumexp over all keys, computed in chunks of queries.
Probabilities are averaged over the heads (or the chosen `heads`) on the device, then copied to the
CPU as float32. The processor's own computation is untouched, so generated images are bit for bit
those of a run without the trace. Hooks are registered on entering the context and always removed
on exit (also on exceptions). As in `BlockTrace`, each transformer call is a pass, two per step with
true CFG (the conditional first; told apart by their shared timestep, or by `passes_per_step`); the
unconditional pass is left out unless `passes="uncond"` or `"both"`. One run per context.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping, Sequence
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
PASSES = ("cond", "uncond")
KINDS = ("double", "single")
MAX_SCORES = 1 << 26  # score elements materialised at once for img->txt (256 MB of float32)
FORMAT = "flux-ir attention 1"


@dataclass(frozen=True)
class AttentionOptions:
    """What to record; validated once here (and against the model in `resolve`).

    tokens: T5 positions of the text tokens, a list or `{name: position}` (`token_indices` gives one).
    double_blocks, single_blocks, steps: indices or ranges as in `Selection` (None: all; negative:
    from the end; steps need the run's `num_steps` for that). heads: "mean" (all heads) or head
    indices whose average is kept. direction: "txt->img", "img->txt" or "both". passes: "cond"
    (default), "uncond" or "both" (true CFG's unconditional pass). max_scores: score elements
    computed at once for img->txt (memory bound of the side computation).

    >>> AttentionOptions(tokens={"circle": 2}, single_blocks="-1", steps="0,-1").names
    ('circle',)
    >>> AttentionOptions(tokens=[2], direction="img->img")
    Traceback (most recent call last):
    ...
    flux_ir.errors.InvalidArgumentError: direction 'img->img': choose one of txt->img, img->txt, both
    """

    tokens: tuple[int, ...] | Mapping[str, int] | Sequence[int] | int
    double_blocks: tuple[int, ...] | str | None = None
    single_blocks: tuple[int, ...] | str | None = None
    steps: tuple[int, ...] | str | None = None
    heads: str | tuple[int, ...] = "mean"
    direction: str = "txt->img"
    passes: str = "cond"
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
        if self.direction not in (*DIRECTIONS, "both"):
            raise InvalidArgumentError(
                f"{{param}} {self.direction!r}: choose one of {', '.join(DIRECTIONS)}, both",
                "direction",
            )
        if self.passes not in (*PASSES, "both"):
            raise InvalidArgumentError(
                f"{{param}} {self.passes!r}: choose one of {', '.join(PASSES)}, both", "passes"
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
        return DIRECTIONS if self.direction == "both" else (self.direction,)

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


@dataclass
class AttentionMaps:
    """Recorded maps of one kind of pass: `maps[kind, block, step]` -> [B, T, H/16, W/16] float32.

    Blocks and steps may be negative (from the end of the model and of the run). With both directions
    recorded, name one: `maps[kind, block, step, "img->txt"]`. `to_text[kind, block, step]` is the
    txt->img rows' text part [B, T, L]. `tokens`: names of the T text tokens; `token_indices`: their
    T5 positions; `grid`: (H/16, W/16); `tensors`: every map by (direction, kind, block, step), as
    recorded (non-negative indices).
    """

    tokens: tuple[str, ...]
    token_indices: tuple[int, ...]
    directions: tuple[str, ...]
    heads: str | tuple[int, ...]
    pass_name: str
    num_blocks: dict[str, int]
    num_steps: int = 0
    grid: tuple[int, int] | None = None
    tensors: dict[tuple[str, str, int, int], torch.Tensor] = field(default_factory=dict)
    to_text: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)

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
                raise KeyError(f"both directions were recorded: name one of {DIRECTIONS}")
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
            "num_blocks": self.num_blocks,
            "num_steps": self.num_steps,
            "grid": None if self.grid is None else list(self.grid),
        }

    def __repr__(self) -> str:
        return (
            f"AttentionMaps({self.pass_name}, tokens {list(self.tokens)}, "
            f"{'/'.join(self.directions)}, blocks {self.blocks}, steps {self.steps}, "
            f"grid {self.grid}, heads {self.heads})"
        )


class AttentionTrace:
    """Context manager recording text <-> image attention maps of a FLUX transformer.

    Args:
        transformer: a diffusers `FluxTransformer2DModel`.
        options: an `AttentionOptions`, or its fields as keywords (`tokens=...`, `steps=...`).
        num_steps: the run's denoising steps (needed for negative `steps`).
        passes_per_step: 2 with true CFG, 1 without; None tells them apart by the timestep (the
            passes of one step share it; one device sync per transformer call).

    `trace.maps` holds the maps of the first recorded kind of pass (cond by default),
    `trace.passes[name]` each kind's.
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
        self._handles: list = []
        self._calls = 0
        self._step = -1
        self._pass = 0
        self._last_t: torch.Tensor | None = None
        self._active: AttentionMaps | None = None
        self._txt_len = 0
        self._stash: dict[str, torch.Tensor] = {}

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
                    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                        if getattr(attn, name, None) is not None:
                            hook = self._stash_hook(name.removeprefix("norm_"))
                            self._handles.append(getattr(attn, name).register_forward_hook(hook))
                    self._handles.append(
                        attn.register_forward_hook(self._attn_hook(kind, i), with_kwargs=True)
                    )
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
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stash.clear()
        self._active = None

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

    def _stash_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._active is not None:
                self._stash[name] = output

        return hook

    def _attn_hook(self, kind: str, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            maps = self._active
            if maps is None:
                return
            stash, self._stash = self._stash, {}
            # FluxAttention.forward(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            given = dict(zip(("hidden_states", "encoder", "attention_mask", "rotary"), args))
            if kwargs.get("attention_mask", given.get("attention_mask")) is not None:
                raise FluxIRError("AttentionTrace does not support attention masks")
            # [B, S, heads, d] after the norms; double blocks keep text apart, text first
            q, k = stash["q"], stash["k"]
            if "added_q" in stash:
                q_txt, q_img = stash["added_q"], q
                k = torch.cat([stash["added_k"], k], dim=1)  # as the processor concatenates
            else:
                q_txt, q_img = q[:, : self._txt_len], q[:, self._txt_len :]
            rotary = kwargs.get("image_rotary_emb", given.get("rotary"))
            self._record(maps, kind, index, q_txt, q_img, k, rotary)

        return hook

    # -- the side computation --------------------------------------------------------------------
    def _record(self, maps: AttentionMaps, kind: str, index: int, q_txt, q_img, k, rotary) -> None:
        """Rows of softmax(q k^T / sqrt(d)) that the selection needs, averaged over heads; kept on
        the device until the context exits (float32; B * T * N values per block and step)."""
        from diffusers.models.embeddings import apply_rotary_emb

        opt = self.options
        n_txt = self._txt_len
        if opt.heads != "mean":
            heads = list(opt.heads)
            q_txt, q_img, k = q_txt[:, :, heads], q_img[:, :, heads], k[:, :, heads]
        scale = 1.0 / math.sqrt(k.shape[-1])

        def rows(x: torch.Tensor, sel, start: int = 0) -> torch.Tensor:
            """Rows `sel` of x [B, S', heads, d] (at sequence position `start` + sel), rotated as the
            processor rotates them, as float32 [B, heads, R, d]."""
            x = x[:, sel]
            if rotary is not None:
                cos, sin = (r[start:][sel] for r in rotary)
                x = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
            return x.transpose(1, 2).float()

        keys_t = (rows(k, slice(None)) * scale).transpose(-1, -2)  # [B, heads, d, S]; k untouched
        step = self._step
        b, n_img = q_img.shape[:2]
        shape = (b, len(opt.tokens), *maps.grid)
        tok = list(opt.tokens)
        if "txt->img" in opt.directions:
            p = torch.softmax(rows(q_txt, tok) @ keys_t, dim=-1).mean(1)  # [B, T, L + N]
            maps.tensors["txt->img", kind, index, step] = p[..., n_txt:].reshape(shape)
            maps.to_text[kind, index, step] = p[..., :n_txt].contiguous()
        if "img->txt" in opt.directions:
            chunk = max(1, opt.max_scores // (b * keys_t.shape[1] * keys_t.shape[-1]))
            parts = []
            for i in range(0, n_img, chunk):
                s = rows(q_img, slice(i, i + chunk), n_txt) @ keys_t  # [B, heads, C, L + N]
                lse = torch.logsumexp(s, dim=-1, keepdim=True)  # over every key
                parts.append((s[..., tok] - lse).exp_().mean(1))  # [B, C, T]
            img = torch.cat(parts, dim=1).transpose(1, 2).reshape(shape)
            maps.tensors["img->txt", kind, index, step] = img


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
    """Write `maps` as one safetensors file (tensors plus JSON metadata), atomically."""
    from safetensors.torch import save_file

    tensors = {"/".join(map(str, key)): t.contiguous() for key, t in maps.tensors.items()}
    tensors |= {
        "/".join(map(str, ("txt->txt", *key))): t.contiguous() for key, t in maps.to_text.items()
    }
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
    heads = md["heads"]
    maps = AttentionMaps(
        tokens=tuple(md["tokens"]),
        token_indices=tuple(md["token_indices"]),
        directions=tuple(md["directions"]),
        heads=heads if heads == "mean" else tuple(heads),
        pass_name=md["pass_name"],
        num_blocks=md["num_blocks"],
        num_steps=md["num_steps"],
        grid=None if md["grid"] is None else tuple(md["grid"]),
    )
    for name, t in tensors.items():
        direction, kind, block, step = name.split("/")
        if direction == "txt->txt":
            maps.to_text[kind, int(block), int(step)] = t
        else:
            maps.tensors[direction, kind, int(block), int(step)] = t
    return maps
