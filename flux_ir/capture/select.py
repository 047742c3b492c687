"""What to capture: blocks, steps, token streams, storage dtype and an optional reduction.

    >>> sel = Selection.parse(double_blocks="0-1,3", single_blocks="-1", steps="0,-1", streams="img")
    >>> sel.single_blocks, sel.steps
    ((-1,), (0, -1))
    >>> r = sel.resolve(num_double=4, num_single=8, num_steps=16)   # against the model and the run
    >>> r.double_blocks, r.single_blocks, r.steps
    ((0, 1, 3), (7,), (0, 15))

A `Selection` is resolved once, against the model's block counts and the run's steps (`resolve`):
negative indices count from the end and `None` ("all") becomes the full range. Reductions run on the
device before the copy (fewer bytes cross the bus):
- `"mean"`: mean over tokens of each stream, [B, T, D] -> [B, 1, D];
- `"poolK"` (e.g. `"pool2"`): K x K average pooling of image tokens on the latent grid,
  [B, H*W, D] -> [B, (H/K)*(W/K), D]; text tokens are kept as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from flux_ir.errors import InvalidArgumentError

STREAMS = ("both", "img", "txt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_INDEX = 100_000  # no FLUX has more blocks or steps; larger ranges are typos that exhaust memory


def parse_indices(spec: str | int | list | tuple | None, name: str) -> list[int] | None:
    """`"0-5,18"` -> [0, 1, 2, 3, 4, 5, 18]; `"all"`/None -> None (all); `"none"`/"" -> [].

    Negative indices count from the end and are resolved later against the model (`resolve`).
    `name` is the parameter named in errors.
    """
    if spec is None or spec == "all":
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, list | tuple):
        return [int(i) for i in spec]
    text = str(spec).strip()
    if text in ("", "none"):
        return []
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if not m:
            raise InvalidArgumentError(
                f"{{param}} {spec!r}: use indices and ranges like '0-5,18', or 'all' / 'none'.",
                name,
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise InvalidArgumentError(f"{{param}}: range {part.strip()!r} runs backwards", name)
        if max(abs(lo), abs(hi)) > MAX_INDEX:
            raise InvalidArgumentError(
                f"{{param}}: {part.strip()!r} reaches past {MAX_INDEX}; no model has that many",
                name,
            )
        out.extend(range(lo, hi + 1))
    return out


def resolve(indices: list[int] | None, n: int, name: str) -> list[int]:
    """Indices (None: all; negatives from the end) checked against `n` available, sorted, unique."""
    if indices is None:
        return list(range(n))
    bad = sorted({i for i in indices if not -n <= i < n})
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InvalidArgumentError(
            f"{{param}}: {shown} out of range; there are {n} {name.replace('_', ' ')} "
            f"(0-{n - 1}, or negative from the end)",
            name,
        )
    return sorted({i + n if i < 0 else i for i in indices})


@dataclass(frozen=True)
class Selection:
    """Blocks and steps to record (None: all; negative: from the end), token `streams` ("both",
    "img", "txt"), `store_dtype` (None: the model's) and `reduce` (None, "mean" or "poolK").
    `resolved` is True once `resolve` has made every index concrete."""

    double_blocks: tuple[int, ...] | None = None
    single_blocks: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    streams: str = "both"
    store_dtype: str | None = None
    reduce: str | None = None
    resolved: bool = False

    def __post_init__(self) -> None:
        for name in ("double_blocks", "single_blocks", "steps"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(i) for i in value))
        if self.streams not in STREAMS:
            raise InvalidArgumentError(
                f"{{param}} {self.streams!r}: choose one of {', '.join(STREAMS)}", "streams"
            )
        if self.store_dtype is not None and self.store_dtype not in DTYPES:
            raise InvalidArgumentError(
                f"{{param}} {self.store_dtype!r}: choose one of {', '.join(DTYPES)}", "store_dtype"
            )
        if self.reduce is not None and not (
            self.reduce == "mean" or re.fullmatch(r"pool[1-9]\d*", str(self.reduce))
        ):
            raise InvalidArgumentError(
                f"{{param}} {self.reduce!r}: use 'mean' or 'poolK' (e.g. pool2)", "reduce"
            )

    def resolve(self, num_double: int, num_single: int, num_steps: int | None = None) -> Selection:
        """Concrete, sorted, unique indices checked against the model's blocks and the run's steps
        (`num_steps` None: steps must already be concrete). Resolving twice changes nothing."""
        if self.resolved:
            return self
        steps = self.steps
        if num_steps is not None:
            steps = tuple(resolve(None if steps is None else list(steps), num_steps, "steps"))
        elif steps is not None and any(s < 0 for s in steps):
            raise InvalidArgumentError("{param}: negative steps need the run's step count", "steps")
        return replace(
            self,
            double_blocks=tuple(resolve(_list(self.double_blocks), num_double, "double_blocks")),
            single_blocks=tuple(resolve(_list(self.single_blocks), num_single, "single_blocks")),
            steps=steps,
            resolved=True,
        )

    @classmethod
    def parse(
        cls,
        double_blocks=None,
        single_blocks=None,
        steps=None,
        streams: str = "both",
        store_dtype: str | None = None,
        reduce: str | None = None,
    ) -> Selection:
        """From command-line text: indices and ranges ("0-5,18", "all", "none"), names."""

        def tup(x, name):
            v = parse_indices(x, name)
            return None if v is None else tuple(v)

        return cls(
            tup(double_blocks, "double_blocks"),
            tup(single_blocks, "single_blocks"),
            tup(steps, "steps"),
            str(streams),
            None if store_dtype in (None, "", "none") else str(store_dtype),
            None if reduce in (None, "", "none") else str(reduce),
        )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.store_dtype is None else DTYPES[self.store_dtype]

    @property
    def pool(self) -> int | None:
        return int(self.reduce[4:]) if self.reduce and self.reduce.startswith("pool") else None

    @property
    def full(self) -> bool:
        """True when block tensors keep the original schema ([txt; img] singles, all tokens)."""
        return self.streams == "both" and self.reduce is None

    def check_grid(self, height_tokens: int, width_tokens: int) -> None:
        k = self.pool
        if k and (height_tokens % k or width_tokens % k):
            raise InvalidArgumentError(
                f"{{param}} pool{k} needs the latent token grid ({height_tokens}x{width_tokens}) "
                f"divisible by {k}; choose another K or image size (multiples of {16 * k} pixels).",
                "reduce",
            )

    def reduce_img(self, img: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Image tokens [B, H*W, D] -> reduced tokens (on the tensor's device)."""
        if self.reduce == "mean":
            return img.mean(dim=1, keepdim=True)
        if self.pool:
            b, _, d = img.shape
            h, w = grid
            x = img.view(b, h, w, d).permute(0, 3, 1, 2)
            x = F.avg_pool2d(x, self.pool)
            return x.flatten(2).transpose(1, 2).contiguous()
        return img

    def reduce_txt(self, txt: torch.Tensor) -> torch.Tensor:
        return txt.mean(dim=1, keepdim=True) if self.reduce == "mean" else txt

    def metadata(self) -> dict:
        return {"streams": self.streams, "store_dtype": self.store_dtype, "reduce": self.reduce}


def _list(indices: tuple[int, ...] | None) -> list[int] | None:
    return None if indices is None else list(indices)
