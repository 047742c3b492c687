"""HostArena: tensors carved one after another from a pool's regions, waiting for them to be made,
and ordinary memory only where the pool can make no more."""

import torch

from flux_ir.io.host_memory import ALIGN, HostArena, HostPool

MiB = 1 << 20


def test_arena_carves_aligned_tensors_back_to_back_and_they_hold_values():
    arena = HostArena(HostPool(budget=16 * MiB, pin=False, threads=2), 3 * MiB)
    a = arena.empty((1000, 3), torch.float32)  # 12,000 bytes: padded to the next ALIGN
    b = arena.empty((256, 1024), torch.bfloat16)
    assert b.data_ptr() == a.data_ptr() + 12000 + (-12000 % ALIGN)
    a.copy_(torch.arange(3000.0).view(1000, 3))
    b.fill_(2.5)
    assert a.sum() == sum(range(3000)) and torch.all(b == 2.5)
    assert arena.stats["pageable_bytes"] == 0 and arena.stats["regions"] == 1
    arena.close()
    assert torch.all(b == 2.5)  # tensors outlive the arena and its pool


def test_arena_falls_back_to_ordinary_memory_when_the_budget_is_spent():
    pool = HostPool(budget=4 * MiB, pin=False, threads=1)
    arena = HostArena(pool, 2 * MiB)
    first = arena.empty((MiB,), torch.uint8)
    rest = [arena.empty((MiB,), torch.uint8) for _ in range(5)]  # 6 MiB asked of a 4 MiB budget
    assert arena.stats["pageable_bytes"] > 0
    assert arena.stats["carved_bytes"] + arena.stats["pageable_bytes"] == 6 * MiB
    assert pool.total <= pool.budget
    for i, t in enumerate([first, *rest]):
        t.fill_(i)
    assert [int(t[-1]) for t in [first, *rest]] == list(range(6))  # none overlaps another
    arena.close()


def test_closing_an_arena_gives_unused_regions_back():
    pool = HostPool(budget=64 * MiB, pin=False, threads=2)
    arena = HostArena(pool, 32 * MiB)
    kept = arena.empty((MiB,), torch.uint8)
    arena.close()
    for thread in pool._growers:
        thread.join()
    assert pool.free_bytes == 0 and pool.total == pool.live  # only the region in use remains
    del kept
    assert pool.total == 0
