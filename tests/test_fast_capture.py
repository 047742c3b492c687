"""Fast capture: the asynchronous copier records exactly what the synchronous one does, and every
copier of a process shares one pool of page-locked memory."""

import gc

import pytest
import torch

from flux_ir.capture import Selection, run_capture
from flux_ir.capture.copy import (
    AsyncCopier,
    PinnedPool,
    SyncCopier,
    drain_runs,
    make_copier,
    slab_layout,
)
from flux_ir.capture.run import capture_nbytes
from flux_ir.errors import InvalidArgumentError
from flux_ir.io.host_memory import PAGE, HostPool, host_pool

from .conftest import small_opts

MiB = 1 << 20


def small_pool(budget: int = 8 * MiB, keep: int | None = None) -> HostPool:
    """Unpinned regions of 2 MiB (the same bookkeeping as page-locked ones), kept for reuse."""
    return HostPool(
        budget, region_bytes=PAGE, pin=False, threads=1, keep=budget if keep is None else keep
    )


def ready(copier: AsyncCopier, nbytes: int) -> None:
    """Reserve `nbytes` for `copier` and wait until the pool has made them."""
    copier.reserve(nbytes)
    assert copier.pool.wait_idle(timeout=30)


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
    # one small region in all: tensors spread over it, then go to pageable tensors
    copier = AsyncCopier(group_bytes=4096, dest=dest, pool=small_pool(budget=PAGE))
    _, cap = run_capture(pipe, small_opts(), model_name=spec.name, copier=copier)
    copier.close()
    assert_same_capture(cap, tiny_capture[1])


def test_carved_host_tensors_own_their_storage():
    copier = AsyncCopier(group_bytes=1 << 30, pool=small_pool())
    ready(copier, MiB)
    outs = [copier.copy(torch.full((3, 5), float(i))) for i in range(3)]
    copier.synchronize()
    assert copier.stats["carved_bytes"] == 3 * 3 * 5 * 4 and copier.stats["staged_bytes"] == 0
    assert all(
        o.untyped_storage().nbytes() == 3 * 5 * 4 for o in outs
    )  # torch.save writes it alone
    assert [float(o[0, 0]) for o in outs] == [0.0, 1.0, 2.0]


def test_two_copiers_share_the_pool_and_a_dropped_capture_returns_its_memory():
    pool = small_pool()
    first = AsyncCopier(pool=pool)
    ready(first, MiB)
    assert pool.stats["regions"] == 1 and pool.live == 0
    src = torch.randn(1000)
    out = first.copy(src)
    first.synchronize()
    ptr = out.data_ptr()
    assert torch.equal(out, src) and pool.live == PAGE and pool.free_bytes == 0
    views = [out[:10]]
    del out
    gc.collect()
    assert pool.live == PAGE  # a view keeps the region in use
    del views
    gc.collect()
    assert pool.live == 0 and pool.free_bytes == PAGE  # back in the pool, kept for reuse
    second = AsyncCopier(pool=pool)  # a new copier, as the command line makes one per capture
    again = second.copy(src * 2)
    second.synchronize()
    assert again.data_ptr() == ptr and torch.equal(again, src * 2)  # the same memory, reused
    assert pool.stats["regions"] == 1 and pool.stats["misses"] == 0
    assert AsyncCopier().pool is AsyncCopier().pool is host_pool()  # one pool per process


def test_unpinned_pool_gives_returned_regions_back_to_the_system():
    pool = small_pool(keep=0)
    copier = AsyncCopier(pool=pool)
    ready(copier, MiB)
    out = copier.copy(torch.ones(10))
    copier.synchronize()
    assert pool.total == PAGE
    del out
    gc.collect()
    assert pool.total == 0 and pool.free_bytes == 0


def test_a_reservation_ends_at_synchronize_and_a_miss_asks_for_one_region():
    pool = small_pool()
    copier = AsyncCopier(pool=pool)
    copier.reserve(3 * MiB)  # two 2 MiB regions
    assert pool.demand == 3 * MiB
    assert pool.wait_idle(timeout=30) and pool.free_bytes == 2 * PAGE
    keep = [copier.copy(torch.zeros(MiB // 4)) for _ in range(4)]  # 1 MiB each: two regions
    assert pool.demand == 0 and pool.free_bytes == 0  # taken regions count against the ask
    assert copier.copy(torch.zeros(MiB // 4)) is not None and pool.stats["misses"] == 1
    copier.synchronize()
    assert copier.stats["staged_bytes"] == MiB  # no region was ready: staged, nothing waited
    assert pool.wait_idle(timeout=30) and pool.free_bytes == PAGE  # the miss asked for one
    other = AsyncCopier(pool=pool)
    other.reserve(MiB)
    other.synchronize()
    assert pool.demand == 0
    del keep


def test_run_capture_reserves_what_the_capture_takes(tiny):
    pipe, spec = tiny
    pool = small_pool(budget=64 * MiB)
    copier = AsyncCopier(pool=pool)
    opts = small_opts(num_steps=2)
    _, cap = run_capture(pipe, opts, model_name=spec.name, copier=copier)
    assert pool.demand == 0  # the reservation ended with the capture
    carved = copier.stats["carved_bytes"] + copier.stats["staged_bytes"]
    block_bytes = sum(
        t.nbytes
        for kind in ("double", "single")
        for steps in cap.blocks(kind).values()
        for v in steps
        for t in (v if isinstance(v, tuple) else (v,))
    )
    sel = Selection().resolve(
        len(pipe.transformer.transformer_blocks), len(pipe.transformer.single_transformer_blocks), 2
    )
    total, per_step, largest = capture_nbytes(pipe.transformer, sel, opts.sampling, 1)
    assert block_bytes <= carved <= total  # the estimate covers every tensor copied
    assert total < 2 * carved + 2 * largest
    assert per_step * 2 <= total


def test_copies_beyond_the_pool_budget_go_to_pageable_tensors_with_the_same_values():
    pool = small_pool(budget=PAGE)
    copier = AsyncCopier(dest="pinned", pool=pool)
    ready(copier, PAGE)
    srcs = [torch.randn(128, 1024) for _ in range(6)]  # 512 KiB each: 3 MiB in all
    outs = [copier.copy(s) for s in srcs]
    copier.synchronize()
    base = outs[0].data_ptr()
    carved = [0 <= o.data_ptr() - base < PAGE for o in outs]
    assert (
        carved == [True] * 4 + [False] * 2
    )  # one 2 MiB region fills the budget, then pageable tensors
    assert pool.live == PAGE and pool.total == PAGE
    assert all(torch.equal(o, s) for o, s in zip(outs, srcs))
    copier.close()


@pytest.mark.parametrize("dest", ["pinned", "pageable"])
def test_storage_dtype_is_applied_before_the_copy(dest):
    copier = AsyncCopier(torch.float16, dest=dest, pool=small_pool())
    ready(copier, MiB)
    src = torch.randn(4, 7).t()  # not contiguous
    out = copier.copy(src)
    copier.synchronize()
    assert out.dtype == torch.float16 and out.shape == (7, 4)
    assert torch.equal(out, src.to(torch.float16))
    copier.close()


def test_command_line_copiers_map_to_their_host_destinations():
    assert isinstance(make_copier("sync"), SyncCopier)
    assert make_copier("pageable").dest == "pageable"  # every copy staged: nothing page-locked
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
    copier = AsyncCopier(group_bytes=1 << 30, pool=small_pool())
    ready(copier, MiB)
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
    # forces slab reuse, several regions, then pageable tensors past the budget
    pool = HostPool(2 * PAGE, region_bytes=PAGE, threads=1)
    copier = AsyncCopier(group_bytes=200_000, pool_bytes=1 << 20, dest=dest, pool=pool)
    ready(copier, 2 * PAGE)
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


def test_staging_slabs_prepared_ahead_are_used_without_making_more():
    pool = PinnedPool(budget=64 * MiB, pin=False)
    pool.prepare(2, 20 * MiB)  # rounded to 32 MiB slabs, made in a background thread
    slab = pool.acquire(10 * MiB)  # waits for a prepared one instead of making its own
    assert slab.numel() == 32 * MiB and pool.total == 64 * MiB
    pool.prepare(2, 20 * MiB)  # the budget holds no third slab: nothing more
    pool.release(slab)
    with pool.cond:
        assert pool.cond.wait_for(lambda: len(pool.free) == 2, timeout=30)
    assert pool.total == 64 * MiB


def test_single_block_slices_are_copied_as_their_joint_buffer():
    from flux_ir.capture.trace import _joint_parent

    with torch.inference_mode():
        joint = torch.randn(3, 7, 4)  # batch 3: each slice alone is not contiguous
        assert torch.equal(_joint_parent(joint[:, :2], joint[:, 2:]), joint)
        assert _joint_parent(torch.randn(3, 2, 4), torch.randn(3, 5, 4)) is None


def test_prefill_makes_free_memory_once_and_counts_what_is_free():
    pool = small_pool(budget=16 * MiB, keep=0)
    pool.prefill(3 * MiB)  # two 2 MiB regions
    assert pool.wait_idle(timeout=30) and pool.free_bytes == 2 * PAGE and pool.demand == 0
    pool.prefill(3 * MiB)  # free already: nothing more is made
    assert pool.wait_idle(timeout=30) and pool.stats["regions"] == 2
    copier = AsyncCopier(pool=pool)
    out = copier.copy(torch.ones(10))
    copier.synchronize()
    assert pool.stats["misses"] == 0  # the copy found a prefilled region
    del out
    gc.collect()  # keep=0: the region goes back to the system ...
    assert pool.wait_idle(timeout=30)
    assert pool.total == PAGE and pool.stats["regions"] == 2  # ... and is not made again


def test_trim_ends_a_prefill():
    pool = small_pool(budget=16 * MiB)
    pool.prefill(7 * MiB)
    pool.trim()
    assert pool.wait_idle(timeout=30)
    pool.trim()
    assert pool.target == 0 and pool.free_bytes == 0


def test_prepare_capture_asks_what_run_capture_reserves(tiny):
    from flux_ir.capture import CaptureOptions, prepare_capture
    from flux_ir.capture.run import TransformerShape, host_bytes_asked
    from flux_ir.models import LoadOptions, load_pipeline

    pipe, _ = tiny
    opts = small_opts(num_steps=2)
    sel = Selection(single_blocks=[0, 1]).resolve(2, 4, 2)
    total, per_step, _ = capture_nbytes(pipe.transformer, sel, opts.sampling, 1)
    for streaming in (False, True):
        pool = small_pool(budget=64 * MiB)
        asked = prepare_capture(
            pipe, opts, Selection(single_blocks=[0, 1]), streaming=streaming, pool=pool
        )
        assert asked == host_bytes_asked(total, per_step, streaming)
        assert pool.wait_idle(timeout=30) and pool.free_bytes >= asked
    if not torch.cuda.is_available():  # the default pool page-locks only with CUDA
        assert prepare_capture(pipe, opts) == 0
    # before loading: the same bytes from the config as from the loaded model
    load = LoadOptions.create("flux-toy-2", "cpu")
    toy, _ = load_pipeline(load)
    toy_opts = CaptureOptions.from_spec(load.spec, seed=0)
    pool = small_pool(budget=1 << 30)
    shape = TransformerShape.of(toy.transformer)
    assert (
        prepare_capture(load, toy_opts, pool=pool)
        == prepare_capture(toy, toy_opts, pool=small_pool(budget=1 << 30))
        > 0
    )
    assert shape.num_double == 6 and shape.num_single == 12
    pool.close()


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell", "flux-toy"])
def test_transformer_config_is_the_architecture_that_loads(model, tmp_path):
    from flux_ir.capture.run import TransformerShape
    from flux_ir.models import LoadOptions, build_random_pipeline, transformer_config

    load = LoadOptions.create(model, "cpu", weights="random")
    built = build_random_pipeline(load.spec, "meta", torch.bfloat16)  # shapes alone
    shape = TransformerShape.from_config(transformer_config(load), torch.bfloat16)
    assert shape == TransformerShape.of(built.transformer)


def test_transformer_config_reads_a_saved_pipeline_and_knows_when_it_cannot(tiny, tmp_path):
    from flux_ir.capture.run import TransformerShape
    from flux_ir.models import LoadOptions, save_pipeline, transformer_config

    pipe, spec = tiny
    assert transformer_config(LoadOptions.create("flux-tiny", "cpu")) is None  # built in code
    save_pipeline(pipe, tmp_path / "saved", spec)
    load = LoadOptions.create(str(tmp_path / "saved"), "cpu")
    shape = TransformerShape.from_config(transformer_config(load), torch.float32)
    assert shape == TransformerShape.of(pipe.transformer)
    missing = LoadOptions.create("flux-dev", "cpu")  # pretrained, not in the local cache
    assert transformer_config(missing) is None
