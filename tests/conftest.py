"""Shared fixtures: the flux-tiny pipeline and small captures, built once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub

import pytest  # noqa: E402

from flux_ir.capture import CaptureOptions, run_capture  # noqa: E402
from flux_ir.models import load_pipeline  # noqa: E402
from flux_ir.sampling import SamplingOptions  # noqa: E402

SIZE = 64  # 64x64 pixels -> 8x8 latents -> 16 packed tokens


def small_sampling(**kw) -> SamplingOptions:
    base = dict(
        prompt="a photo of a cat", width=SIZE, height=SIZE, num_steps=4, max_sequence_length=32
    )
    base.update(kw)
    return SamplingOptions(**base)


def small_opts(seed: int = 1, num_images: int = 1, **kw) -> CaptureOptions:
    """flux-tiny at 64x64, 4 steps, T5 length 32; `kw` overrides sampling settings."""
    return CaptureOptions(small_sampling(**kw), seed=seed, num_images=num_images)


@pytest.fixture(scope="session")
def tiny():
    pipe, spec = load_pipeline("flux-tiny", device="cpu")
    return pipe, spec


@pytest.fixture(scope="session")
def tiny_capture(tiny):
    pipe, spec = tiny
    images, cap = run_capture(pipe, small_opts(), model_name=spec.name)
    return images, cap


@pytest.fixture(scope="session")
def cfg_capture(tiny):
    pipe, spec = tiny
    opts = small_opts(negative_prompt="blurry, ugly", true_cfg_scale=4.0)
    return run_capture(pipe, opts, model_name=spec.name)[1]


@pytest.fixture(scope="session")
def toy_pipe():
    """flux-toy with its shipped weights, on the CPU (tests that need it skip without weights)."""
    return load_pipeline("flux-toy", device="cpu")
