"""How block outputs reach host memory.

A copier's `copy(t)` returns a host tensor that is valid after `synchronize()`.
"""

from __future__ import annotations

from typing import Protocol

import torch


class HostCopier(Protocol):
    def copy(self, t: torch.Tensor) -> torch.Tensor: ...

    def synchronize(self) -> None: ...


class SyncCopier:
    """Plain blocking copy to CPU (a clone on CPU), optionally cast to `dtype`."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype=self.dtype or t.dtype, copy=True)

    def synchronize(self) -> None:
        pass
