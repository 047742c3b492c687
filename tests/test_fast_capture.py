"""Fast capture: the asynchronous copier records exactly what the synchronous one does."""

import pytest
import torch

from flux_ir.capture import run_capture
from flux_ir.capture.copy import (
    AsyncCopier,
    ChunkSource,
    PinnedPool,
    SyncCopier,
    drain_runs,
    make_copier,
    slab_layout,
)
from flux_ir.errors import InvalidArgumentError

from .conftest import small_opts

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_same_capture(a, b):
    for kind in ("double", "single"):
        assert a.blocks(kind).keys() == b.blocks(kind).keys()
        for key, steps in a.blocks(kind).items():
            for x, y in zip(steps, b.blocks(kind)[key], strict=True):
                xs, ys = (x, y) if isinstance(x, tuple) else ((x,), (y,))
                assert all(torch.equal(u, v) for u, v in zip(xs, ys, strict=True)), key
    for key in ("img_state", "y", "temb"):
        ca, cb = a.denoising_context[key], b.denoising_context[key]
        assert all(torch.equal(u, v) for u, v in zip(ca, cb, strict=True)), key


def test_async_copier_on_cpu_matches_sync(tiny, tiny_capture):
    pipe, spec = tiny
    copier = AsyncCopier(group_bytes=4096)  # many small groups: exercises the queueing
    _, cap = run_capture(pipe, small_opts(), model_name=spec.name, copier=copier)
    assert_same_capture(cap, tiny_capture[1])


@pytest.mark.parametrize("dest", ["pinned", "pageable"])
def test_every_host_destination_matches_sync(tiny, tiny_capture, dest):
    pipe, spec = tiny
    # small chunks and a tiny pinned budget: tensors spread over chunks, then pageable tensors
    copier = AsyncCopier(group_bytes=4096, dest=dest, pinned_bytes=1 << 16, chunk_bytes=1 << 16)
    _, cap = run_capture(pipe, small_opts(), model_name=spec.name, copier=copier)
    copier.close()
    assert_same_capture(cap, tiny_capture[1])


def test_carved_host_tensors_own_their_storage():
    copier = AsyncCopier(group_bytes=1 << 30)
    outs = [copier.copy(torch.full((3, 5), float(i))) for i in range(3)]
    copier.synchronize()
    assert all(
        o.untyped_storage().nbytes() == 3 * 5 * 4 for o in outs
    )  # torch.save writes it alone
    assert [float(o[0, 0]) for o in outs] == [0.0, 1.0, 2.0]


def test_pinned_budget_is_returned_when_carved_tensors_are_dropped():
    source = ChunkSource(chunk_bytes=1 << 20, pinned_bytes=5 << 19, pin=False, threads=1)
    assert source.pinned_room(1000)
    chunks = [source.take(1000) for _ in range(2)]
    assert [c.size for c in chunks] == [1 << 20, 1 << 20]  # first sizes are capped by chunk_bytes
    assert not source.pinned_room(1000)  # 2 MiB live: a third chunk would pass 2.5 MiB
    assert source.stats["chunks"] >= 2 and source.stats["make_s"] > 0
    views = [c.array[:10] for c in chunks]
    del chunks
    assert source.live_pinned == 2 << 20  # views keep their chunks alive
    del views
    assert source.live_pinned == 0
    assert source.pinned_room(1000)
    source.close()


def test_copies_beyond_the_pinned_budget_go_to_pageable_tensors_with_the_same_values():
    copier = AsyncCopier(dest="pinned", pinned_bytes=1 << 20, chunk_bytes=1 << 20)
    srcs = [torch.randn(64, 1024) for _ in range(6)]  # 256 KiB each: 1.5 MiB in all
    outs = [copier.copy(s) for s in srcs]
    copier.synchronize()
    base = outs[0].data_ptr()
    carved = [0 <= o.data_ptr() - base < 1 << 20 for o in outs]
    assert (
        carved == [True] * 4 + [False] * 2
    )  # one 1 MiB chunk fills the budget, then pageable tensors
    assert copier.chunks.live_pinned == 1 << 20
    assert all(torch.equal(o, s) for o, s in zip(outs, srcs))
    copier.close()


@pytest.mark.parametrize("dest", ["pinned", "pageable"])
def test_storage_dtype_is_applied_before_the_copy(dest):
    copier = AsyncCopier(torch.float16, dest=dest, pinned_bytes=1 << 20, chunk_bytes=1 << 20)
    src = torch.randn(4, 7).t()  # not contiguous
    out = copier.copy(src)
    copier.synchronize()
    assert out.dtype == torch.float16 and out.shape == (7, 4)
    assert torch.equal(out, src.to(torch.float16))
    copier.close()


def test_command_line_copiers_map_to_their_host_destinations():
    assert isinstance(make_copier("sync"), SyncCopier)
    assert make_copier("pageable").dest == "pageable"  # one capture per process: no page-locking
    assert make_copier("pinned").dest == "pinned"
    with pytest.raises(
        InvalidArgumentError, match="^copy 'async': choose one of pageable, pinned, sync"
    ):
        make_copier("async")


def test_staged_copies_pack_into_the_slab_aligned_and_drain_back():
    offsets, total = slab_layout([300, 100, 8])
    assert offsets == [0, 512, 768] and total == 776
    slab = torch.arange(total, dtype=torch.int64).to(torch.uint8)
    dests = [torch.empty(n, dtype=torch.uint8) for n in (300, 100, 8)]
    drain_runs(list(zip(dests, offsets, strict=True)), slab)
    assert all(torch.equal(d, slab[o : o + d.numel()]) for d, o in zip(dests, offsets, strict=True))


def test_async_copier_returns_distinct_host_tensors_filled_after_flush():
    copier = AsyncCopier(group_bytes=1 << 30)
    src = torch.arange(6.0).view(2, 3)
    out = copier.copy(src)
    src.add_(100)  # the copy reads the source when the group is flushed, not before
    copier.synchronize()
    assert out.data_ptr() != src.data_ptr() and torch.equal(out, src)


@cuda
@pytest.mark.parametrize("dest", ["pinned", "pageable"])
def test_async_copier_on_cuda_matches_sync(dest):
    torch.manual_seed(0)
    xs = [torch.randn(2, 300 + i, 64, device="cuda", dtype=torch.bfloat16) for i in range(40)]
    copier = (
        AsyncCopier(  # forces slab reuse, several chunks, then pageable tensors past the budget
            group_bytes=200_000,
            pool_bytes=1 << 20,
            dest=dest,
            pinned_bytes=1 << 20,
            chunk_bytes=1 << 19,
        )
    )
    outs = [copier.copy(x) for x in xs]
    copier.synchronize()
    sync = SyncCopier()
    assert all(torch.equal(o, sync.copy(x)) for o, x in zip(outs, xs, strict=True))
    copier.close()


@cuda
def test_async_capture_on_cuda_matches_sync(tiny):
    pipe, spec = tiny
    pipe.to("cuda")
    try:
        _, a = run_capture(pipe, small_opts(), model_name=spec.name)
        _, b = run_capture(pipe, small_opts(), model_name=spec.name, copier=AsyncCopier())
        assert_same_capture(a, b)
    finally:
        pipe.to("cpu")


def test_pinned_pool_reuses_released_slabs():
    if not torch.cuda.is_available():
        pytest.skip("page-locked memory needs CUDA")
    pool = PinnedPool(budget=64 << 20)
    a = pool.acquire(1000)
    pool.release(a)
    assert pool.acquire(2000).data_ptr() == a.data_ptr()


def test_pinned_pool_hands_back_the_smallest_fitting_slab_among_several():
    mb = 1 << 20
    pool = PinnedPool(budget=200 * mb, pin=False)
    big, small = pool.acquire(90 * mb), pool.acquire(20 * mb)  # 96 MiB and 32 MiB slabs
    pool.release(big)
    pool.release(small)
    assert pool.acquire(10 * mb) is small  # the smaller slab that fits, found by identity
    assert pool.acquire(10 * mb) is big
    pool.release(big)
    pool.release(small)
    huge = pool.acquire(150 * mb)  # fits neither: free slabs are dropped until the budget allows it
    assert huge.numel() == 160 * mb and pool.free == [] and pool.total == 160 * mb


def test_single_block_slices_are_copied_as_their_joint_buffer():
    from flux_ir.capture.trace import _joint_parent

    with torch.inference_mode():
        joint = torch.randn(3, 7, 4)  # batch 3: each slice alone is not contiguous
        assert torch.equal(_joint_parent(joint[:, :2], joint[:, 2:]), joint)
        assert _joint_parent(torch.randn(3, 2, 4), torch.randn(3, 5, 4)) is None
