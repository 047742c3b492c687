"""flux-tiny's structure and determinism, the registry, loading and its errors."""

import pytest
import torch

from flux_ir.capture import run_capture
from flux_ir.errors import InvalidArgumentError, ModelUnavailableError
from flux_ir.models import (
    REGISTRY,
    build_random_pipeline,
    build_tiny_pipeline,
    load_pipeline,
    resolve_model,
    save_pipeline,
)
from flux_ir.models.loading import place_pipeline

from .conftest import small_opts


def test_tiny_has_flux_structure(tiny):
    pipe, _ = tiny
    t, vae = pipe.transformer, pipe.vae
    assert len(t.transformer_blocks) >= 2 and len(t.single_transformer_blocks) >= 4
    assert t.config.in_channels == 64 and t.config.out_channels in (None, 64)
    assert len(t.config.axes_dims_rope) == 3
    assert sum(t.config.axes_dims_rope) == t.config.attention_head_dim
    assert vae.config.latent_channels == 16
    assert pipe.vae_scale_factor == 8
    assert vae.config.scaling_factor == pytest.approx(0.3611)
    assert vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.text_encoder.config.hidden_size == t.config.pooled_projection_dim
    assert pipe.text_encoder_2.config.d_model == t.config.joint_attention_dim


def test_tiny_weights_are_deterministic():
    a, b = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0)
    for (name, pa), pb in zip(
        a.transformer.state_dict().items(), b.transformer.state_dict().values()
    ):
        assert torch.equal(pa, pb), name
    c = build_tiny_pipeline(seed=1)
    assert not torch.equal(a.vae.decoder.conv_out.weight, c.vae.decoder.conv_out.weight)


def test_tiny_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline()
    assert torch.equal(torch.rand(3), expected)


def test_registry_defaults():
    assert REGISTRY["flux-schnell"].num_steps == 4 and REGISTRY["flux-schnell"].guidance is None
    assert REGISTRY["flux-schnell"].max_sequence_length == 256
    assert REGISTRY["flux-dev"].num_steps == 50 and REGISTRY["flux-dev"].max_sequence_length == 512
    assert REGISTRY["flux-dev-krea"].source == "black-forest-labs/FLUX.1-Krea-dev"
    assert REGISTRY["flux-tiny"].num_steps == 4


def test_unknown_model_names_the_choices():
    with pytest.raises(
        InvalidArgumentError, match="flux-schnell, flux-dev, flux-dev-krea, flux-tiny"
    ):
        resolve_model("flux-ultra")


def test_directory_without_pipeline_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="model_index.json"):
        resolve_model(str(tmp_path))


def test_hub_model_without_weights_names_the_ways_out():
    with pytest.raises(ModelUnavailableError) as info:
        load_pipeline("flux-schnell", device="cpu")
    msg = str(info.value)
    assert "hf auth login" in msg and "--model /path/to/" in msg and "--model flux-toy" in msg


def test_save_pretrained_round_trip_gives_the_same_capture(tiny, tiny_capture, tmp_path):
    pipe, spec = tiny
    save_pipeline(pipe, tmp_path / "tiny", spec)
    loaded, loaded_spec = load_pipeline(str(tmp_path / "tiny"), device="cpu")
    assert loaded_spec.num_steps == spec.num_steps and loaded_spec.guidance == spec.guidance
    _, cap = run_capture(loaded, small_opts(), model_name=loaded_spec.name)
    _, ref = tiny_capture
    for k in ref.single_blocks:
        for a, b in zip(cap.single_blocks[k], ref.single_blocks[k]):
            # identical weights; float32 kernels may round differently on reloaded tensors
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_local_directory_without_sidecar_defaults_from_config(tiny, tmp_path):
    pipe, _ = tiny
    pipe.save_pretrained(tmp_path / "plain")
    spec = resolve_model(str(tmp_path / "plain"))
    assert spec.name == "plain"
    assert spec.guidance == REGISTRY["flux-dev"].guidance  # tiny has a guidance embedding


def test_model_offload_records_the_same_tensors(tiny_capture):
    offloaded, spec = build_tiny_pipeline(), REGISTRY["flux-tiny"]  # offload's hooks, on the CPU
    place_pipeline(offloaded, "cpu", "model")
    assert hasattr(offloaded.transformer, "_hf_hook")  # accelerate's offload hook is in place
    _, cap = run_capture(offloaded, small_opts(), model_name=spec.name)
    _, ref = tiny_capture
    for kind in ("double", "single"):
        for key, steps in ref.blocks(kind).items():
            for a, b in zip(steps, cap.blocks(kind)[key]):
                a, b = (a, b) if kind == "single" else (torch.cat(a, 1), torch.cat(b, 1))
                assert torch.equal(a, b)


@pytest.mark.parametrize("name, guidance", [("flux-schnell", False), ("flux-dev", True)])
def test_random_weights_build_the_full_flux_architecture(name, guidance):
    pipe = build_random_pipeline(REGISTRY[name], device="meta", dtype=torch.bfloat16)
    t = pipe.transformer
    assert len(t.transformer_blocks) == 19 and len(t.single_transformer_blocks) == 38
    assert t.inner_dim == 3072 and t.config.guidance_embeds is guidance
    assert sum(p.numel() for p in t.parameters()) == pytest.approx(11.9e9, rel=0.01)
    assert (
        pipe.text_encoder_2.config.d_model == 4096 and pipe.text_encoder.config.hidden_size == 768
    )
    assert pipe.vae.config.block_out_channels == (128, 256, 512, 512) or list(
        pipe.vae.config.block_out_channels
    ) == [128, 256, 512, 512]
    assert next(t.parameters()).dtype == torch.bfloat16
    assert pipe.scheduler.config.use_dynamic_shifting is guidance


def test_unknown_weights_kind_is_refused():
    with pytest.raises(InvalidArgumentError, match="pretrained, random"):
        load_pipeline("flux-tiny", device="cpu", weights="zeros")
