"""Offload modes: group offloading records what the plain pipeline records; the lens head is on
the execution device after any offloaded run."""

import pytest
import torch

from flux_ir.capture import run_capture
from flux_ir.errors import InvalidArgumentError
from flux_ir.lens import LensHead
from flux_ir.models import REGISTRY, build_random_pipeline, build_tiny_pipeline, load_pipeline
from flux_ir.models.loading import GroupOffload, normalize_offload, place_pipeline

from .conftest import small_opts
from .test_fast_capture import assert_same_capture


def cpu_offloaded(mode: str):
    """flux-tiny with an offload mode's hooks on the CPU (the mechanism; the CLI refuses it there)."""
    pipe, spec = build_tiny_pipeline(), REGISTRY["flux-tiny"]
    place_pipeline(pipe, "cpu", mode)
    return pipe, spec


def test_offload_on_the_cpu_is_refused_with_a_reason():
    with pytest.raises(InvalidArgumentError, match="^offload group moves weights between host"):
        load_pipeline("flux-tiny", device="cpu", offload="group")


def test_group_offload_records_the_same_tensors(tiny_capture):
    pipe, spec = cpu_offloaded("group")
    assert getattr(pipe.transformer, "_diffusers_hook", None) is not None
    _, cap = run_capture(pipe, small_opts(), model_name=spec.name)
    assert_same_capture(cap, tiny_capture[1])


def hooked(module: torch.nn.Module) -> bool:
    return any(getattr(m, "_diffusers_hook", None) is not None for m in module.modules())


def test_group_offload_keeps_resident_components_whole_and_hook_free():
    pipe, _ = cpu_offloaded("group")
    for name in GroupOffload().resident:
        assert not hooked(getattr(pipe, name)), name
    for name in ("transformer", "text_encoder_2"):
        assert hooked(getattr(pipe, name)), name


def test_group_offload_variant_records_the_same_tensors(tiny_capture):
    pipe, spec = load_pipeline("flux-tiny", device="cpu")
    variant = GroupOffload(resident=(), num_blocks_per_group=2, text_encoder_2_level="block_level")
    place_pipeline(pipe, "cpu", "group", variant)
    assert hooked(pipe.vae)  # nothing resident
    _, cap = run_capture(pipe, small_opts(), model_name=spec.name)
    assert_same_capture(cap, tiny_capture[1])


def test_lens_head_after_group_offload_is_a_hook_free_copy(tiny):
    pipe, _ = cpu_offloaded("group")
    head = LensHead.from_pipeline(pipe)
    assert getattr(head.proj_out, "_diffusers_hook", None) is None
    h, temb = (
        torch.randn(1, 16, pipe.transformer.inner_dim),
        torch.randn(1, pipe.transformer.inner_dim),
    )
    ref = LensHead.from_pipeline(tiny[0]).velocity(h, temb)
    assert torch.equal(head.velocity(h, temb), ref)


def test_unknown_offload_mode_lists_group():
    with pytest.raises(InvalidArgumentError, match="group"):
        normalize_offload("disk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["model", "group"])
def test_lens_head_runs_on_the_gpu_after_offload(mode):
    pipe, _ = load_pipeline("flux-tiny", device="cuda", offload=mode)
    run_capture(pipe, small_opts(num_steps=1))
    head = LensHead.from_pipeline(pipe)
    assert head.device.type == "cuda" and head.proj_out.weight.device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_group_offloaded_random_weights_are_kept_where_they_were_made():
    """Random weights for group offloading: VAE and CLIP on the GPU, the transformer's and T5's
    parameters in page-locked host memory that diffusers keeps as its offloaded copy (no second
    copy), and captures equal to the pipeline's without offload."""
    from .test_models import SMALL

    spec = REGISTRY["flux-dev"]
    build = dict(sizes=SMALL, init_device="cuda", seed=5)
    pipe = build_random_pipeline(
        spec, "cpu", torch.bfloat16, resident=GroupOffload().resident, host="pinned", **build
    )
    made = {n: p.data_ptr() for n, p in pipe.transformer.named_parameters()}
    assert all(p.is_pinned() for p in pipe.transformer.parameters())
    assert all(p.is_pinned() for p in pipe.text_encoder_2.parameters())
    assert all(p.device.type == "cuda" for p in pipe.vae.parameters())
    place_pipeline(pipe, "cuda", "group")
    hook = pipe.transformer.transformer_blocks[0]._diffusers_hook.get_hook("group_offloading")
    kept = {id(p): t.data_ptr() for p, t in hook.group.cpu_param_dict.items()}
    block = pipe.transformer.transformer_blocks[0]
    for name, p in block.named_parameters():
        assert kept[id(p)] == made[f"transformer_blocks.0.{name}"], name
    plain = build_random_pipeline(spec, "cuda", torch.bfloat16, **build)
    opts = small_opts(num_steps=1)
    _, cap = run_capture(pipe, opts)
    _, ref = run_capture(plain, opts)
    assert_same_capture(cap, ref)
