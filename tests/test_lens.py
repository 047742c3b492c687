"""The block lens: exact identities with the pipeline, targets, decoding."""

import numpy as np
import pytest
import torch

from flux_ir.capture import run_capture
from flux_ir.errors import InvalidArgumentError
from flux_ir.lens import (
    BlockStep,
    LensHead,
    LensOptions,
    block_latents,
    block_steps,
    decode_capture,
    lens_latents,
)
from flux_ir.models import load_pipeline

from .conftest import small_opts


def _next_latents(cap, k):
    ctx = cap.denoising_context
    return ctx["img_state"][k + 1] if k + 1 < len(ctx["img_state"]) else ctx["final_latents"]


def test_last_block_next_target_reproduces_the_pipelines_next_latent(tiny, tiny_capture):
    pipe, _ = tiny
    _, cap = tiny_capture
    head = LensHead.from_pipeline(pipe)
    last = cap.block_indices["single"][-1]
    for k in cap.captured_steps:
        z = block_latents(head, cap, BlockStep("single", last, k), target="next")
        torch.testing.assert_close(z, _next_latents(cap, k), rtol=1e-5, atol=1e-6)


def test_identity_is_exact_in_bfloat16():
    pipe, spec = load_pipeline("flux-tiny", device="cpu", dtype=torch.bfloat16)
    _, cap = run_capture(pipe, small_opts(), model_name=spec.name)
    head = LensHead.from_pipeline(pipe)
    last = cap.block_indices["single"][-1]
    for k in cap.captured_steps:
        z = block_latents(head, cap, BlockStep("single", last, k), target="next")
        assert z.dtype == torch.bfloat16
        assert torch.equal(z, _next_latents(cap, k))


def test_identity_holds_with_true_cfg(tiny, cfg_capture):
    pipe, _ = tiny
    head = LensHead.from_pipeline(pipe)
    last = cfg_capture.block_indices["single"][-1]
    for k in cfg_capture.captured_steps:
        z = block_latents(head, cfg_capture, BlockStep("single", last, k), target="next")
        torch.testing.assert_close(z, _next_latents(cfg_capture, k), rtol=1e-5, atol=1e-6)


def test_earlier_blocks_are_not_the_final_prediction(tiny, tiny_capture):
    pipe, _ = tiny
    _, cap = tiny_capture
    head = LensHead.from_pipeline(pipe)
    z = block_latents(head, cap, BlockStep("double", 0, 0), target="next")
    assert not torch.allclose(z, _next_latents(cap, 0))


def test_targets_follow_their_formulas():
    v, x = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    torch.testing.assert_close(lens_latents(v, x, 0.8, 0.6, "x0"), x - 0.8 * v)
    torch.testing.assert_close(lens_latents(v, x, 0.8, 0.6, "next"), x + (0.6 - 0.8) * v)
    with pytest.raises(KeyError, match="'eps' is neither x0 nor next"):
        lens_latents(v, x, 0.8, 0.6, "eps")
    with pytest.raises(
        InvalidArgumentError, match="^target 'eps' is unknown; choose one of x0, next"
    ):
        LensOptions("eps")


def test_x0_and_next_agree_at_the_last_step(tiny, tiny_capture):
    pipe, _ = tiny
    _, cap = tiny_capture
    head = LensHead.from_pipeline(pipe)
    item = BlockStep("double", 1, cap.captured_steps[-1])  # t_prev = 0: one Euler step lands on x0
    torch.testing.assert_close(
        block_latents(head, cap, item, "x0"), block_latents(head, cap, item, "next")
    )


def test_decode_capture_yields_every_block_and_step_in_depth_order(tiny, tiny_capture):
    pipe, _ = tiny
    _, cap = tiny_capture
    items = block_steps(cap)
    assert len(items) == (2 + 4) * 4
    assert items[0] == BlockStep("double", 0, 0) and items[-1] == BlockStep("single", 3, 3)
    out = list(decode_capture(pipe, cap, items[:3], batch_size=2, progress=False))
    assert [it for it, _ in out] == items[:3]
    assert all(len(imgs) == 1 and imgs[0].size == (64, 64) for _, imgs in out)


def test_decoded_last_block_matches_the_generated_image(tiny, tiny_capture):
    pipe, _ = tiny
    images, cap = tiny_capture
    last = BlockStep("single", cap.block_indices["single"][-1], cap.captured_steps[-1])
    ((_, decoded),) = decode_capture(pipe, cap, [last], target="next", progress=False)
    a = torch.from_numpy(np.asarray(decoded[0], dtype=np.float32))
    b = torch.from_numpy(np.asarray(images[0], dtype=np.float32))
    assert (a - b).abs().max() <= 1  # same latents, same VAE: equal up to uint8 rounding
