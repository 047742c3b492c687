"""Streaming shard store: identical round trip, lazy reads, clear errors on damaged files."""

import json

import pytest
import torch
from safetensors import safe_open

from flux_ir.capture import run_capture
from flux_ir.capture.copy import AsyncCopier
from flux_ir.errors import CaptureFileError
from flux_ir.store import ShardWriter, load_capture

from .conftest import small_opts
from .test_fast_capture import assert_same_capture


@pytest.fixture(scope="module")
def shard_dir(tiny, tmp_path_factory):
    pipe, spec = tiny
    path = tmp_path_factory.mktemp("shards") / "capture"
    writer = ShardWriter(path)
    _, cap = run_capture(
        pipe, small_opts(), model_name=spec.name, copier=AsyncCopier(group_bytes=4096), sink=writer
    )
    assert cap.double_blocks == {}  # streamed: nothing kept in memory
    writer.finish(cap)
    return path


def test_shard_round_trip_matches_in_memory_capture(shard_dir, tiny_capture):
    cap = load_capture(shard_dir)
    ref = tiny_capture[1]
    assert_same_capture(cap, ref)
    assert torch.equal(
        cap.denoising_context["final_latents"], ref.denoising_context["final_latents"]
    )
    assert cap.denoising_context["timestep_pairs"] == ref.denoising_context["timestep_pairs"]
    assert cap.metadata["captured_single_blocks"] == ref.metadata["captured_single_blocks"]


def test_shards_are_plain_safetensors(shard_dir):
    with safe_open(shard_dir / "cond_step_0002.safetensors", framework="pt") as f:
        assert "single.0" in f.keys() and "double.0.img" in f.keys()


def test_reading_one_block_opens_only_its_shard(shard_dir):
    cap = load_capture(shard_dir)
    img = cap.image_tokens("single", 1, step=2)
    assert img.shape[1] == 16
    assert cap.reader.opened == {"cond_step_0002.safetensors"}


def test_no_temporary_directory_left(shard_dir):
    assert [p.name for p in shard_dir.parent.iterdir()] == ["capture"]


def test_truncated_shard_is_a_clear_error(shard_dir, tmp_path):
    import shutil

    copy = tmp_path / "cap"
    shutil.copytree(shard_dir, copy)
    shard = copy / "cond_step_0001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CaptureFileError, match="cond_step_0001.safetensors is truncated"):
        load_capture(copy)


def test_corrupted_shard_header_is_a_clear_error(shard_dir, tmp_path):
    import shutil

    copy = tmp_path / "cap"
    shutil.copytree(shard_dir, copy)
    shard = copy / "cond_step_0001.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"garbage!"
    shard.write_bytes(bytes(data))
    cap = load_capture(copy)
    with pytest.raises(CaptureFileError, match="not a readable capture shard"):
        cap["double", 0, 1]


def test_manifest_of_another_format_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CaptureFileError, match="not a flux-ir-shards capture"):
        load_capture(tmp_path)
