"""What to change and where: a `Site` addresses block outputs the way capture selects them, an `Edit`
says what becomes of them.

    >>> site = Site("single", -1, steps=(0, 1), stream="img")       # last single block, two steps
    >>> zero().describe(), add(torch.ones(8), scale=2.0).describe()
    ('zero', 'add(scale=2.0)')

An edit is a function `(activation [b, t, D], step) -> activation` applied to the addressed tokens
of the addressed batch elements; the ones here are `replace`, `add` (steering), `zero`, `mean`
(mean ablation over the addressed tokens) and `apply` (any function of yours).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from flux_ir.errors import InvalidArgumentError

KINDS = ("double", "single", "temb")
STREAMS = ("img", "txt")
PASSES = ("cond", "uncond", "both")


@dataclass(frozen=True)
class Site:
    """Where an edit applies.

    kind: "double" or "single" (a block's output), or "temb" (the conditioning embedding [B, D] that
    modulates every block and the output head; `block`, `stream` and `tokens` do not apply).
    block: index (negative: from the end). steps: denoising steps
    (None: all; negative: from the end of the run). stream: "img" (image tokens) or "txt" (text
    tokens). tokens: which tokens of the stream (None: all; a slice, a tuple of indices, or a boolean
    mask over the image-token grid [H/16, W/16] for "img"). passes: "cond", "uncond" or "both" (true
    CFG runs an unconditional pass too). batch: which batch elements (None: all).
    """

    kind: str
    block: int
    steps: tuple[int, ...] | None = None
    stream: str = "img"
    tokens: slice | tuple[int, ...] | torch.Tensor | None = None
    passes: str = "both"
    batch: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(
                f"{{param}} {self.kind!r}: choose one of {', '.join(KINDS)}", "kind"
            )
        if self.stream not in STREAMS:
            raise InvalidArgumentError(
                f"{{param}} {self.stream!r}: choose one of {', '.join(STREAMS)}", "stream"
            )
        if self.passes not in PASSES:
            raise InvalidArgumentError(
                f"{{param}} {self.passes!r}: choose one of {', '.join(PASSES)}", "passes"
            )
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(i) for i in _as_tuple(value)))
        tokens = self.tokens
        if isinstance(tokens, torch.Tensor):
            if tokens.dtype != torch.bool or tokens.dim() != 2 or self.stream != "img":
                raise InvalidArgumentError(
                    "{param}: a tensor must be a boolean mask [H/16, W/16] over image tokens",
                    "tokens",
                )
        elif tokens is not None and not isinstance(tokens, slice):
            object.__setattr__(self, "tokens", tuple(int(i) for i in _as_tuple(tokens)))

    def token_index(self, n_tokens: int) -> slice | torch.Tensor:
        """An index over the stream's `n_tokens` tokens (a slice or a LongTensor)."""
        t = self.tokens
        if t is None:
            return slice(None)
        if isinstance(t, slice):
            return t
        if isinstance(t, torch.Tensor):
            if t.numel() != n_tokens:
                raise InvalidArgumentError(
                    f"{{param}}: the mask has {t.numel()} cells but the image has {n_tokens} tokens",
                    "tokens",
                )
            return t.flatten().nonzero().flatten()
        return torch.tensor([i + n_tokens if i < 0 else i for i in t])

    def describe(self) -> str:
        steps = "all steps" if self.steps is None else f"steps {list(self.steps)}"
        tokens = "" if self.tokens is None else " (some tokens)"
        batch = "" if self.batch is None else f", batch {list(self.batch)}"
        return f"{self.kind} {self.block} {self.stream}{tokens}, {steps}, {self.passes}{batch}"


def _as_tuple(value) -> Sequence:
    if isinstance(value, int):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class Edit:
    """`fn(activation, step) -> activation` with a short description for the metadata."""

    fn: Callable[[torch.Tensor, int], torch.Tensor]
    name: str
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return self.fn(x, step)

    def describe(self) -> str:
        return self.name


def _on(t: torch.Tensor, like: torch.Tensor, cache: dict) -> torch.Tensor:
    """`t` on `like`'s device and dtype, moved once per device and dtype."""
    key = (like.device, like.dtype, id(t))
    if key not in cache:
        cache[key] = t.to(like.device, like.dtype)
    return cache[key]


def replace(values: torch.Tensor | Callable[[int], torch.Tensor]) -> Edit:
    """Activation patching: the addressed activation becomes `values` (a tensor broadcastable to it,
    or a function of the step giving one, e.g. read lazily from a saved capture)."""
    cache: dict = {}

    def fn(x: torch.Tensor, step: int) -> torch.Tensor:
        v = values(step) if callable(values) else values
        return _on(v, x, cache).expand_as(x)

    return Edit(fn, "replace")


def add(vector: torch.Tensor | Callable[[int], torch.Tensor], scale: float = 1.0) -> Edit:
    """Steering: adds `scale * vector` ([D], or a function of the step giving one)."""
    cache: dict = {}

    def fn(x: torch.Tensor, step: int) -> torch.Tensor:
        v = vector(step) if callable(vector) else vector
        return x + scale * _on(v, x, cache)

    return Edit(fn, f"add(scale={scale})")


def zero() -> Edit:
    """Zero ablation."""
    return Edit(lambda x, step: torch.zeros_like(x), "zero")


def mean() -> Edit:
    """Mean ablation: every addressed token becomes the mean over the addressed tokens."""
    return Edit(lambda x, step: x.mean(dim=-2, keepdim=True).expand_as(x), "mean")


def apply(fn: Callable[[torch.Tensor, int], torch.Tensor], name: str = "apply") -> Edit:
    """Any function `(activation [b, t, D], step) -> activation` of the same shape."""
    return Edit(fn, name)
