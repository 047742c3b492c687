"""Fast capture: the asynchronous copier records exactly what the synchronous one does."""

import pytest
import torch

from flux_ir.capture import run_capture
from flux_ir.capture.copy import AsyncCopier, PinnedPool, SyncCopier

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


def test_async_copier_returns_distinct_host_tensors_filled_after_flush():
    copier = AsyncCopier(group_bytes=1 << 30)
    src = torch.arange(6.0).view(2, 3)
    out = copier.copy(src)
    src.add_(100)  # the copy reads the source when the group is flushed, not before
    copier.synchronize()
    assert out.data_ptr() != src.data_ptr() and torch.equal(out, src)


@cuda
def test_async_copier_on_cuda_matches_sync():
    torch.manual_seed(0)
    xs = [torch.randn(2, 300 + i, 64, device="cuda", dtype=torch.bfloat16) for i in range(40)]
    copier = AsyncCopier(group_bytes=200_000, pool_bytes=1 << 20)  # forces slab reuse
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
