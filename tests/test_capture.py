"""What a capture holds: schema, counts, shapes, determinism, CFG passes, hook hygiene."""

import pytest
import torch

from flux_ir.capture import BlockTrace, Selection, run_capture
from flux_ir.errors import InvalidArgumentError
from flux_ir.sampling import generate

from .conftest import SIZE, small_opts

N_TOKENS = (SIZE // 16) ** 2


def test_schema_and_counts(tiny, tiny_capture):
    pipe, _ = tiny
    _, cap = tiny_capture
    n_double, n_single = (
        len(pipe.transformer.transformer_blocks),
        len(pipe.transformer.single_transformer_blocks),
    )
    assert sorted(cap.double_blocks) == sorted(f"block_{i}" for i in range(n_double))
    assert sorted(cap.single_blocks) == sorted(f"block_{i}" for i in range(n_single))
    dim = pipe.transformer.inner_dim
    txt_len = cap.denoising_context["txt_seq_len"][0]
    assert txt_len == 32
    for steps in cap.double_blocks.values():
        assert len(steps) == 4
        for img, txt in steps:
            assert img.shape == (1, N_TOKENS, dim) and txt.shape == (1, txt_len, dim)
            assert img.dtype == torch.float32 and img.device.type == "cpu"
    for steps in cap.single_blocks.values():
        assert len(steps) == 4
        assert all(h.shape == (1, txt_len + N_TOKENS, dim) for h in steps)


def test_single_block_tensor_is_txt_then_img(tiny):
    pipe, _ = tiny
    only_single_0 = Selection(double_blocks=(), single_blocks=(0,))
    trace = BlockTrace(pipe.transformer, only_single_0)
    opts = small_opts(num_steps=1, prompt="x")
    with trace:
        generate(pipe, opts.sampling, seed=opts.seed)
    joint = trace.records["cond"].single[0][0]
    assert joint.shape[1] == 32 + N_TOKENS  # one [txt; img] tensor, copied without a cat
    _, cap = run_capture(pipe, opts, selection=only_single_0)
    assert torch.equal(cap["single", 0, 0], joint)
    assert torch.equal(cap.text_tokens("single", 0, 0), joint[:, :32])
    assert torch.equal(cap.image_tokens("single", 0, 0), joint[:, 32:])


def test_denoising_context_lengths(tiny_capture):
    _, cap = tiny_capture
    ctx = cap.denoising_context
    for key in ("y", "img_state", "timestep_pairs", "txt_seq_len", "temb"):
        assert len(ctx[key]) == 4, key
    assert ctx["img_state"][0].shape == (1, N_TOKENS, 64)
    assert ctx["final_latents"].shape == (1, N_TOKENS, 64)
    assert ctx["y"][0].shape == (1, 32)
    pairs = ctx["timestep_pairs"]
    assert pairs[0][0] == pytest.approx(1.0) and pairs[-1][1] == 0.0
    assert all(a[1] == b[0] for a, b in zip(pairs, pairs[1:]))  # t_prev of k is t_curr of k+1
    assert ctx["guidance"] == 3.5


def test_metadata_fields(tiny_capture):
    _, cap = tiny_capture
    md = cap.metadata
    for key in (
        "model",
        "prompt",
        "width",
        "height",
        "num_steps",
        "seed",
        "guidance",
        "timesteps",
        "dtype",
        "versions",
        "timestamp",
        "run_id",
    ):
        assert key in md, key
    assert md["model"] == "flux-tiny" and md["num_steps"] == 4 and md["seed"] == 1
    assert len(md["timesteps"]) == 4 and {"torch", "diffusers", "transformers"} <= set(
        md["versions"]
    )


def test_same_seed_gives_identical_capture(tiny, tiny_capture):
    pipe, _ = tiny
    _, again = run_capture(pipe, small_opts())
    _, ref = tiny_capture
    for k, steps in ref.single_blocks.items():
        assert all(torch.equal(a, b) for a, b in zip(steps, again.single_blocks[k]))
    _, other = run_capture(
        pipe, small_opts(seed=2), selection=Selection(double_blocks=(), single_blocks=(0,))
    )
    assert not torch.equal(other["single", 0, 0], ref["single", 0, 0])


def test_batch_of_two_keeps_the_batch_dimension(tiny):
    pipe, _ = tiny
    images, cap = run_capture(pipe, small_opts(num_images=2, num_steps=2))
    assert len(images) == 2
    assert cap["double", 0, 0][0].shape[0] == 2 and cap["single", 1, 1].shape[0] == 2
    assert cap.denoising_context["img_state"][1].shape[0] == 2


def test_true_cfg_passes_are_kept_apart(tiny_capture, cfg_capture):
    _, plain = tiny_capture
    cap = cfg_capture
    assert cap.has_uncond
    assert all(len(v) == 4 for v in cap.single_blocks.values())  # one entry per step, not two
    assert all(len(v) == 4 for v in cap.single_blocks_uncond.values())
    # step 0 sees the same latents, so the cond pass matches a run without CFG, the uncond one does not
    assert torch.equal(cap["single", 3, 0], plain["single", 3, 0])
    assert not torch.equal(cap.single_blocks_uncond["block_3"][0], plain["single", 3, 0])
    assert len(cap.denoising_context["temb_uncond"]) == 4


def test_selected_blocks_and_steps(tiny):
    pipe, _ = tiny
    sel = Selection(double_blocks=(1,), single_blocks=(0, 2), steps=(0, 3))
    _, cap = run_capture(pipe, small_opts(), selection=sel)
    assert sorted(cap.double_blocks) == ["block_1"] and sorted(cap.single_blocks) == [
        "block_0",
        "block_2",
    ]
    assert all(len(v) == 2 for v in cap.single_blocks.values())
    assert cap.captured_steps == [0, 3]
    assert cap.image_tokens("single", 2, step=3).shape == (1, N_TOKENS, pipe.transformer.inner_dim)
    with pytest.raises(KeyError, match="not captured"):
        cap.image_tokens("single", 2, step=1)


def test_hooks_are_removed_after_an_exception(tiny):
    pipe, _ = tiny
    modules = [
        pipe.transformer,
        *pipe.transformer.transformer_blocks,
        *pipe.transformer.single_transformer_blocks,
    ]
    before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules]
    with pytest.raises(KeyboardInterrupt):
        with BlockTrace(pipe.transformer):
            assert len(pipe.transformer.transformer_blocks[0]._forward_hooks) > 0
            raise KeyboardInterrupt
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules] == before


def test_block_index_out_of_range(tiny):
    pipe, _ = tiny
    with pytest.raises(InvalidArgumentError, match="single_blocks: 9 out of range; there are 4"):
        BlockTrace(pipe.transformer, Selection(single_blocks=(9,)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=100), "^width must be a positive multiple of 16"),
        (dict(height=0), "^height must be a positive integer"),
        (dict(num_steps=0), "^num_steps must be a positive integer"),
        (dict(true_cfg_scale=0.5), "^true_cfg_scale must be >= 1"),
        (dict(seed=2**64), "^seed must lie between"),
        (dict(num_images=0), "^num_images must be >= 1"),
        (dict(prompt=1984), "^prompt must be text"),
        (dict(guidance="abc"), "^guidance must be a finite number"),
        (dict(max_sequence_length=513), "^max_sequence_length must be at most 512"),
    ],
)
def test_bad_capture_options_name_the_parameter(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message) as err:
        small_opts(**kwargs)
    assert err.value.param == next(iter(kwargs))
