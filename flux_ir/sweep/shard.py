"""Many processes, one sweep: rank and world size from torchrun / accelerate, sharding, barriers.

    dist = Distributed.from_env()          # RANK / WORLD_SIZE / LOCAL_RANK, set by torchrun and accelerate
    points = list(range(10))
    mine = dist.shard(points)              # points[rank::world]
    dist.barrier()                         # gloo on CPU, nccl on CUDA; a no-op for one process
    dist.gather(len(mine))                 # every process's object, in rank order: [len(mine)] alone

Each process loads its own pipeline on `cuda:LOCAL_RANK` and writes its own points; the metadata is
merged by rank 0 after the last barrier.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> str:
        """`cuda:LOCAL_RANK` when several processes share a CUDA host, else `requested`."""
        if requested is None:
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if (
            self.world > 1
            and torch.device(requested).type == "cuda"
            and torch.device(requested).index is None
        ):
            return f"cuda:{self.local_rank}"
        return requested

    def init(self, device: str) -> None:
        """Join the process group (gloo for CPU, nccl for CUDA) if launched with more than one process."""
        if self.world <= 1 or torch_dist.is_initialized():
            return
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        torch_dist.init_process_group(backend=backend, timeout=timedelta(hours=12))
        self.owns_group = True

    def barrier(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            if torch_dist.get_backend() == "nccl":
                torch_dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                torch_dist.barrier()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share: every `world`-th item starting at `rank` (balanced to within one)."""
        return list(items[self.rank :: self.world])

    def gather(self, obj: T) -> list[T]:
        """Every process's `obj` (picklable), in rank order, on every process; `[obj]` for one."""
        if self.world > 1 and torch_dist.is_initialized():
            out: list = [None] * self.world
            torch_dist.all_gather_object(out, obj)
            return out
        return [obj]

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
            self.owns_group = False
