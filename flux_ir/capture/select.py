"""What to capture: blocks, steps, token streams, storage dtype and an optional reduction.

    sel = Selection.parse(double_blocks="0-5,18", single_blocks="30-37", steps="0,-1",
                          streams="img", dtype="float16", reduce="pool2")

Reductions run on the device before the copy (fewer bytes cross the bus):
- `"mean"`: mean over tokens of each stream, [B, T, D] -> [B, 1, D];
- `"poolK"` (e.g. `"pool2"`): K x K average pooling of image tokens on the latent grid,
  [B, H*W, D] -> [B, (H/K)*(W/K), D]; text tokens are kept as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flux_ir.errors import InvalidArgumentError

STREAMS = ("both", "img", "txt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_indices(spec: str | int | list | tuple | None, name: str) -> list[int] | None:
    """`"0-5,18"` -> [0, 1, 2, 3, 4, 5, 18]; `"all"`/None -> None (all); `"none"`/"" -> [].

    Negative indices count from the end and are resolved later against the model (`resolve`).
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
                f"--{name} {spec!r}: use indices and ranges like '0-5,18', or 'all' / 'none'."
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise InvalidArgumentError(f"--{name}: range {part.strip()!r} runs backwards")
        out.extend(range(lo, hi + 1))
    return out


def resolve(indices: list[int] | None, n: int, name: str) -> list[int]:
    """Indices (None: all; negatives from the end) checked against `n` available, sorted, unique."""
    if indices is None:
        return list(range(n))
    out = sorted({i + n if i < 0 else i for i in indices})
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise InvalidArgumentError(
            f"--{name}: {bad} out of range, this model has {n} {name.replace('_', ' ')} "
            f"(0-{n - 1}, or negative from the end)"
        )
    return out


@dataclass(frozen=True)
class Selection:
    double_blocks: tuple[int, ...] | None = None
    single_blocks: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    streams: str = "both"
    dtype: str | None = None
    reduce: str | None = None

    def __post_init__(self) -> None:
        if self.streams not in STREAMS:
            raise InvalidArgumentError(
                f"--streams {self.streams!r}: choose one of {', '.join(STREAMS)}"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidArgumentError(
                f"--store_dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}"
            )
        if self.reduce is not None and not (
            self.reduce == "mean" or re.fullmatch(r"pool[1-9]\d*", self.reduce)
        ):
            raise InvalidArgumentError(
                f"--reduce {self.reduce!r}: use 'mean' or 'poolK' (e.g. pool2)"
            )

    @classmethod
    def parse(
        cls,
        double_blocks=None,
        single_blocks=None,
        steps=None,
        streams: str = "both",
        dtype: str | None = None,
        reduce: str | None = None,
    ) -> Selection:
        def tup(x, name):
            v = parse_indices(x, name)
            return None if v is None else tuple(v)

        return cls(
            tup(double_blocks, "double_blocks"),
            tup(single_blocks, "single_blocks"),
            tup(steps, "steps"),
            str(streams),
            None if dtype in (None, "", "none") else str(dtype),
            None if reduce in (None, "", "none") else str(reduce),
        )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else DTYPES[self.dtype]

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
                f"--reduce pool{k} needs the latent token grid ({height_tokens}x{width_tokens}) "
                f"divisible by {k}; choose another K or image size (multiples of {16 * k} pixels)."
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
        return {"streams": self.streams, "store_dtype": self.dtype, "reduce": self.reduce}
