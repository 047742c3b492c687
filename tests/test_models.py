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


# A small architecture through the full-size builder (meta construction, then seeded filling).
SMALL = {
    "transformer": dict(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 6, 6),
    ),
    "vae": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
    "clip": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 projection_dim=16),
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2),
}  # fmt: skip


def small_random(seed: int = 0, **kw):
    return build_random_pipeline(REGISTRY["flux-dev"], "cpu", seed=seed, sizes=SMALL, **kw)


def test_random_weights_are_filled_per_parameter_from_the_seed():
    from flux_ir.models import weights_fingerprint
    from flux_ir.models.random_init import param_seed, random_values

    a, b, c = small_random(0), small_random(0, init_device="cpu"), small_random(1)
    assert weights_fingerprint(a) == weights_fingerprint(b) != weights_fingerprint(c)
    for name, p in a.transformer.named_parameters():
        assert p.device.type == "cpu" and not p.requires_grad, name
        assert torch.equal(p, b.transformer.get_parameter(name)), name
        if p.dim() >= 2:  # its own generator: the same values whatever was filled before it
            expected = random_values(
                name, p.shape, p.dtype, p.device, param_seed(0, "transformer", name)
            )
            assert torch.equal(p, expected), name
            assert p.abs().max() <= p[0].numel() ** -0.5 and p.std() > 0, name
        elif name.endswith("bias"):
            assert not p.any(), name
        else:
            assert torch.all(p == 1), name
    assert not torch.equal(a.vae.decoder.conv_out.weight, c.vae.decoder.conv_out.weight)
    ids = [b for n, b in a.text_encoder.named_buffers() if n.endswith("position_ids")]
    assert torch.equal(ids[0], torch.arange(77)[None])  # buffers are built, not filled


def test_offloaded_random_weights_are_carved_from_host_regions_with_the_same_values():
    """host="pinned" (ordinary regions without CUDA: the same bookkeeping): the same weights as
    pageable, each offloaded parameter carved right after the one before it, resident ones apart."""
    from flux_ir.models import weights_fingerprint
    from flux_ir.models.random_init import host_arena

    plain = small_random(4)
    pinned = small_random(4, resident=("vae", "text_encoder"), host="pinned")
    assert weights_fingerprint(pinned) == weights_fingerprint(plain)
    params = list(pinned.transformer.parameters()) + list(pinned.text_encoder_2.parameters())
    for before, after in zip(params, params[1:], strict=False):
        nbytes = before.numel() * before.element_size()
        assert after.data_ptr() == before.data_ptr() + nbytes + (-nbytes % 256)
    ptrs = {p.data_ptr() for p in params}
    assert not ptrs & {p.data_ptr() for p in pinned.vae.parameters()}
    arena = host_arena([plain.transformer])
    arena.close()  # does not wait for a region being made: it is dropped once made
    for thread in arena.pool._growers:
        thread.join()
    assert arena.stats["carved_bytes"] == 0 and arena.pool.total == 0  # nothing kept once closed
    with pytest.raises(InvalidArgumentError, match="pageable, pinned"):
        small_random(4, host="locked")


def test_random_weights_keep_their_fingerprint_under_offload_and_generate():
    from flux_ir.models import weights_fingerprint
    from flux_ir.sampling import generate

    from .conftest import small_sampling

    pipe = small_random(3)
    before = weights_fingerprint(pipe)
    place_pipeline(pipe, "cpu", "group")  # offload's hooks, on the CPU
    assert weights_fingerprint(pipe, refresh=True) == before
    out = generate(pipe, small_sampling(num_steps=1), seed=0, output_type="latent")
    assert out.images.shape == (1, 16, 64)


def test_load_pipeline_caches_the_fingerprint(monkeypatch):
    import flux_ir.models.fingerprint as fp

    pipe, _ = load_pipeline("flux-tiny", device="cpu")
    monkeypatch.setattr(fp, "modules_fingerprint", lambda m: pytest.fail("recomputed"))
    assert len(fp.weights_fingerprint(pipe)) == 16  # computed by load_pipeline
