"""Schedulers: each one runs in FluxPipeline on FLUX's noise levels, captures keep their schema, the
x0 lens of the last block at the last step is the final latent, and "next" is Euler's alone."""

import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from flux_ir.capture import run_capture
from flux_ir.errors import InvalidArgumentError
from flux_ir.lens import BlockStep, LensHead, block_latents, decode_capture
from flux_ir.models import load_pipeline, resolve_model
from flux_ir.models.schedulers import SCHEDULERS, UNSUPPORTED, check_scheduler, use_scheduler
from flux_ir.sampling import SamplingOptions, generate
from flux_ir.sweep import GridSpec, SweepConfig

from .conftest import small_opts

NAMES = list(SCHEDULERS)


@pytest.fixture(scope="module")
def captures(tiny):
    pipe, spec = tiny
    out = {}
    for name in NAMES:
        opts = small_opts(scheduler=name, width=32, height=32)
        out[name] = run_capture(pipe, opts, model_name=spec.name, progress=False)[1]
    use_scheduler(pipe, "euler")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_each_scheduler_keeps_the_capture_schema(captures, name):
    cap = captures[name]
    md = cap.metadata
    assert md["scheduler"] == name and md["scheduler_class"] == SCHEDULERS[name].cls
    assert cap.captured_steps == [0, 1, 2, 3] and len(cap.denoising_context["img_state"]) == 4
    assert len(md["sigmas"]) == 5 and md["sigmas"][-1] == 0.0  # each step ends at sigma 0
    assert cap["single", 3, 0].shape == (1, 32 + 4, 32)  # [txt; img]
    euler = captures["euler"].metadata["sigmas"]  # FLUX's noise levels (diffusers' flow sigmas)
    assert md["sigmas"] == pytest.approx(euler, abs=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_the_last_x0_is_the_final_latent(tiny, captures, name):
    pipe, _ = tiny
    cap = captures[name]
    head = LensHead.from_pipeline(pipe)
    z = block_latents(head, cap, BlockStep("single", 3, 3), "x0")
    torch.testing.assert_close(z, cap.denoising_context["final_latents"], rtol=1e-5, atol=1e-5)
    if name != "euler":  # the solvers differ from Euler before the last step
        assert not torch.allclose(cap["single", 3, 2], captures["euler"]["single", 3, 2])


@pytest.mark.parametrize("name", NAMES)
def test_the_next_lens_is_refused_unless_one_output_makes_the_step(tiny, captures, name):
    pipe, _ = tiny
    cap = captures[name]
    head = LensHead.from_pipeline(pipe)
    if SCHEDULERS[name].one_output:
        ctx = cap.denoising_context
        z = block_latents(head, cap, BlockStep("single", 3, 1), "next")
        torch.testing.assert_close(z, ctx["img_state"][2], rtol=1e-5, atol=1e-6)
        return
    with pytest.raises(
        InvalidArgumentError, match=f"^target next reproduces .*{re.escape(name)}.*use the x0"
    ):
        block_latents(head, cap, BlockStep("single", 3, 1), "next")
    with pytest.raises(InvalidArgumentError, match="use the x0 lens"):
        next(decode_capture(pipe, cap, target="next", progress=False))


def test_schedulers_are_deterministic_and_the_pipeline_gets_its_own_back(tiny):
    pipe, spec = tiny
    own = pipe.scheduler
    assert isinstance(own, FlowMatchEulerDiscreteScheduler)
    for name in NAMES:
        opts = small_opts(scheduler=name, width=32, height=32, num_steps=3).sampling
        a = generate(pipe, opts, seed=3, output_type="latent").images
        b = generate(pipe, opts, seed=3, output_type="latent").images
        assert torch.equal(a, b), name
    assert generate(pipe, small_opts(width=32, height=32, num_steps=1).sampling, seed=3).images
    assert (
        pipe.scheduler is own and pipe.config["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    )


def test_unsupported_schedulers_are_refused_with_the_reason(tiny):
    with pytest.raises(InvalidArgumentError, match="^scheduler 'heun' is not offered: diffusers'"):
        SamplingOptions.from_spec(resolve_model("flux-tiny"), scheduler="heun")
    with pytest.raises(InvalidArgumentError, match="'ddim' is unknown; choose one of euler, dpm"):
        check_scheduler("ddim")
    assert set(UNSUPPORTED) >= {"heun", "deis", "lcm"}
    # the reason holds: FluxPipeline's own call of set_timesteps fails for flow-matching Heun
    heun = FlowMatchHeunDiscreteScheduler.from_config(tiny[0].scheduler.config)
    with pytest.raises(ValueError, match="does not support custom sigmas"):
        retrieve_timesteps(heun, 4, "cpu", sigmas=np.linspace(1.0, 0.25, 4), mu=0.5)


def test_a_sweep_names_its_scheduler_unless_it_is_eulers():
    spec = resolve_model("flux-tiny")
    grid = GridSpec(n_alpha=2, n_beta=2)
    euler = SweepConfig.from_spec(spec, grid=grid)
    assert "scheduler" not in euler.signature()  # sweeps made before schedulers still resume
    unipc = SweepConfig.from_spec(spec, grid=grid, scheduler="unipc")
    assert unipc.signature()["scheduler"] == "unipc"
    assert SweepConfig.from_signature(unipc.signature()) == unipc
    assert SweepConfig.from_signature(euler.signature()) == euler


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_flux_toy_per_scheduler(name):
    """flux-toy (true CFG, shift 2, no dynamic shifting): schema, last x0 identity, determinism."""
    pipe, spec = load_pipeline("flux-toy", device="cpu")
    from flux_ir.capture import CaptureOptions

    opts = CaptureOptions.from_spec(spec, seed=2, num_steps=6, scheduler=name)
    _, cap = run_capture(pipe, opts, model_name=spec.name, progress=False)
    _, again = run_capture(pipe, opts, model_name=spec.name, progress=False)
    assert cap.has_uncond and cap.captured_steps == list(range(6))
    assert torch.equal(
        cap.denoising_context["final_latents"], again.denoising_context["final_latents"]
    )
    head = LensHead.from_pipeline(pipe)
    z = block_latents(head, cap, BlockStep("single", 7, 5), "x0")
    torch.testing.assert_close(z, cap.denoising_context["final_latents"], rtol=1e-4, atol=1e-4)
