"""Interventions: identities that could fail (self-patching reproduces a run bit for bit; patching
every site from another run reproduces that run), edits land where addressed and nowhere else, hooks
always go, and a capture records what was edited."""

import pytest
import torch

from flux_ir.capture import BlockTrace, CaptureOptions, Selection, run_capture
from flux_ir.errors import InvalidArgumentError
from flux_ir.intervene import Intervention, Site, add, apply, mean, patch_edits, zero
from flux_ir.sampling import generate

from .conftest import small_opts


def every_site(pipe, steps=None, streams=("img", "txt")) -> list[Site]:
    t = pipe.transformer
    sites = [Site("temb", 0, steps=steps)]
    for kind, n in (
        ("double", len(t.transformer_blocks)),
        ("single", len(t.single_transformer_blocks)),
    ):
        sites += [Site(kind, i, steps=steps, stream=s) for i in range(n) for s in streams]
    return sites


def final_latents(pipe, opts: CaptureOptions, edits=()):
    with Intervention(pipe.transformer, list(edits), passes_per_step=opts.sampling.passes_per_step):
        return generate(pipe, opts.sampling, seed=opts.seed, output_type="latent").images


@pytest.mark.parametrize("cfg", [False, True])
def test_patching_a_run_with_its_own_activations_everywhere_reproduces_it_bit_for_bit(tiny, cfg):
    pipe, _ = tiny
    opts = small_opts(**(dict(negative_prompt="blurry", true_cfg_scale=3.0) if cfg else {}))
    _, cap = run_capture(pipe, opts, progress=False)
    plain = final_latents(pipe, opts)
    patched = final_latents(pipe, opts, patch_edits(cap, every_site(pipe)))
    assert torch.equal(patched, plain)
    assert torch.equal(plain, cap.denoising_context["final_latents"])


def test_patching_every_site_from_another_prompt_reproduces_that_prompts_run(tiny):
    pipe, _ = tiny
    source, target = small_opts(prompt="a red circle"), small_opts(prompt="a green square")
    _, cap = run_capture(pipe, source, progress=False)
    patched = final_latents(pipe, target, patch_edits(cap, every_site(pipe)))
    assert torch.equal(patched, cap.denoising_context["final_latents"])
    assert not torch.equal(final_latents(pipe, target), patched)


def test_an_edit_changes_only_its_block_step_stream_and_batch_element(tiny):
    pipe, spec = tiny
    opts = small_opts(num_images=2)
    site = Site("single", 1, steps=(2,), stream="img", batch=(1,), tokens=(0, 1, 2))
    with Intervention(pipe.transformer, [(site, zero())], num_steps=4):
        _, cap = run_capture(pipe, opts, progress=False)
    _, plain = run_capture(pipe, opts, progress=False)
    edited = cap.image_tokens("single", 1, 2)
    assert torch.equal(edited[1, :3], torch.zeros_like(edited[1, :3]))
    assert torch.equal(edited[1, 3:], plain.image_tokens("single", 1, 2)[1, 3:])
    assert torch.equal(edited[0], plain.image_tokens("single", 1, 2)[0])
    assert torch.equal(cap.text_tokens("single", 1, 2), plain.text_tokens("single", 1, 2))
    assert torch.equal(cap.image_tokens("single", 0, 2), plain.image_tokens("single", 0, 2))
    assert torch.equal(cap["single", 1, 1], plain["single", 1, 1])  # the step before: untouched
    assert not torch.equal(cap["single", 3, 3], plain["single", 3, 3])  # what follows: changed


def test_steering_mean_ablation_and_functions_follow_their_formulas(tiny):
    pipe, _ = tiny
    opts = small_opts(num_steps=1)
    _, plain = run_capture(pipe, opts, selection=Selection(double_blocks=(), single_blocks=(2,)))
    v = torch.randn(32)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True  # the top-left image tokens 0, 1, 4, 5
    cases = [
        (Site("single", 2), add(v, scale=0.5), lambda x: x + 0.5 * v),
        (Site("single", 2, tokens=mask), mean(), None),
        (Site("single", 2), apply(lambda x, step: 2 * x), lambda x: 2 * x),
    ]
    for site, edit, expect in cases:
        with Intervention(pipe.transformer, [(site, edit)]):
            _, cap = run_capture(
                pipe, opts, selection=Selection(double_blocks=(), single_blocks=(2,))
            )
        got, ref = cap.image_tokens("single", 2, 0), plain.image_tokens("single", 2, 0)
        if expect is not None:
            torch.testing.assert_close(got, expect(ref))
        else:
            idx = torch.tensor([0, 1, 4, 5])
            torch.testing.assert_close(
                got[:, idx], ref[:, idx].mean(1, keepdim=True).expand(1, 4, 32)
            )
            rest = torch.tensor([i for i in range(16) if i not in (0, 1, 4, 5)])
            assert torch.equal(got[:, rest], ref[:, rest])


def test_hooks_are_removed_even_when_the_run_fails(tiny):
    pipe, _ = tiny
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    before = [len(b._forward_hooks) for b in blocks]
    with pytest.raises(KeyboardInterrupt):
        with Intervention(pipe.transformer, [(Site("double", 0), zero())]):
            raise KeyboardInterrupt
    assert [len(b._forward_hooks) for b in blocks] == before


def test_an_intervention_runs_before_a_trace_whatever_the_order_of_entry(tiny):
    pipe, _ = tiny
    opts = small_opts(num_steps=1)
    trace = BlockTrace(pipe.transformer, Selection(double_blocks=(0,), single_blocks=()))
    with trace, Intervention(pipe.transformer, [(Site("double", 0, stream="txt"), zero())]):
        generate(pipe, opts.sampling, seed=1)
    img, txt = trace.records["cond"].double[0][0]
    assert torch.equal(txt, torch.zeros_like(txt)) and img.abs().sum() > 0


@pytest.mark.parametrize(
    "site, message",
    [
        (dict(kind="triple", block=0), "^kind 'triple': choose one of double, single, temb"),
        (dict(kind="single", block=0, stream="both"), "^stream 'both': choose one of img, txt"),
        (dict(kind="single", block=0, passes="cfg"), "^passes 'cfg': choose one of cond"),
    ],
)
def test_bad_sites_name_the_parameter(site, message):
    with pytest.raises(InvalidArgumentError, match=message):
        Site(**site)


def test_a_block_out_of_range_is_refused(tiny):
    with pytest.raises(InvalidArgumentError, match="^block 9 is out of range: there are 4 single"):
        Intervention(tiny[0].transformer, [(Site("single", 9), zero())])


def test_a_capture_with_edits_records_them_and_the_edited_activations(tiny):
    pipe, spec = tiny
    edits = [(Site("double", 1, steps=(-1,)), zero())]
    _, cap = run_capture(pipe, small_opts(), model_name=spec.name, edits=edits, progress=False)
    assert cap.metadata["interventions"] == ["zero at double 1 img, steps [-1], both"]
    img = cap.image_tokens("double", 1, 3)
    assert torch.equal(img, torch.zeros_like(img))
    assert cap.image_tokens("double", 1, 2).abs().sum() > 0


@pytest.mark.parametrize("setting", ["group offload", "compiled blocks"])
def test_edits_give_the_same_run_under_offload_and_compiled_blocks(tiny, setting):
    from flux_ir.models import build_tiny_pipeline
    from flux_ir.models.compile import compile_blocks
    from flux_ir.models.loading import place_pipeline

    pipe, _ = tiny
    opts = small_opts(negative_prompt="blurry", true_cfg_scale=3.0)
    edits = [
        (Site("single", 1, steps=(1, 2)), zero()),
        (Site("double", 0), add(torch.ones(32), 0.3)),
    ]
    expected = final_latents(pipe, opts, edits)
    other = build_tiny_pipeline()
    if setting == "group offload":
        place_pipeline(other, "cpu", "group")  # diffusers' hooks around the blocks, on the CPU
    else:
        torch._dynamo.reset()
        compile_blocks(other.transformer, backend="eager")  # fullgraph: an edit inside would raise
    try:
        got = final_latents(other, opts, edits)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, final_latents(pipe, opts))
