"""Selective capture: blocks, steps, streams, dtype and reductions; bytes scale with the choice."""

import pytest
import torch

from flux_ir.capture import run_capture
from flux_ir.capture.select import Selection, parse_indices
from flux_ir.cli import main
from flux_ir.errors import CaptureFileError, FluxIRError, InvalidArgumentError
from flux_ir.lens import decode_capture
from flux_ir.store import load_capture

from .conftest import small_opts

N_TOKENS = 16  # 64x64 pixels: a 4x4 token grid


def nbytes(cap) -> int:
    total = 0
    for kind in ("double", "single"):
        for steps in cap.blocks(kind).values():
            for v in steps:
                for t in v if isinstance(v, tuple) else (v,):
                    total += 0 if t is None else t.numel() * t.element_size()
    return total


def test_index_syntax():
    assert parse_indices("0-2,5", "x") == [0, 1, 2, 5]
    assert parse_indices((1, 3), "x") == [1, 3]
    assert parse_indices("all", "x") is None and parse_indices("none", "x") == []
    with pytest.raises(InvalidArgumentError, match="like '0-5,18'"):
        parse_indices("0..3", "x")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(streams="pixels"), "^streams 'pixels': choose one of both, img, txt"),
        (dict(store_dtype="int8"), "^store_dtype 'int8': choose one of"),
        (dict(reduce="max"), "^reduce 'max': use 'mean' or 'poolK'"),
        (dict(steps="3-1"), "^steps: range '3-1' runs backwards"),
        (dict(single_blocks="0-100000000000"), "^single_blocks: .* reaches past 100000"),
    ],
)
def test_bad_selection_is_refused(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        Selection.parse(**kwargs)


def test_selected_blocks_and_steps(tiny, tiny_capture):
    pipe, _ = tiny
    sel = Selection.parse(double_blocks="1", single_blocks="0,-1", steps="0,-1")
    _, cap = run_capture(pipe, small_opts(), selection=sel)
    assert cap.block_indices == {"double": [1], "single": [0, 3]}
    assert cap.captured_steps == [0, 3]
    full = tiny_capture[1]
    assert torch.equal(cap["single", 3, 3], full["single", 3, 3])
    assert torch.equal(cap.image_tokens("double", 1, 3), full.image_tokens("double", 1, 3))


def test_out_of_range_step_names_the_count(tiny):
    with pytest.raises(InvalidArgumentError, match="^steps: 7 out of range; there are 4 steps"):
        run_capture(tiny[0], small_opts(), selection=Selection.parse(steps="7"))


def test_streams_and_dtype_scale_bytes(tiny, tiny_capture):
    pipe, _ = tiny
    full = tiny_capture[1]
    _, img = run_capture(pipe, small_opts(), selection=Selection.parse(streams="img"))
    _, half = run_capture(pipe, small_opts(), selection=Selection.parse(store_dtype="float16"))
    assert nbytes(half) * 2 == nbytes(full)
    txt_len = 32
    assert nbytes(img) * (txt_len + N_TOKENS) == nbytes(full) * N_TOKENS
    assert torch.equal(img.image_tokens("single", 2, 1), full.image_tokens("single", 2, 1))
    assert img.metadata["streams"] == "img" and half.metadata["store_dtype"] == "float16"
    with pytest.raises(CaptureFileError, match="only image tokens"):
        img.text_tokens("double", 0, 0)


def test_reductions_match_host_reference(tiny, tiny_capture):
    pipe, _ = tiny
    full = tiny_capture[1]
    _, mean = run_capture(pipe, small_opts(), selection=Selection.parse(reduce="mean"))
    _, pool = run_capture(pipe, small_opts(), selection=Selection.parse(reduce="pool2"))
    ref = full.image_tokens("single", 1, 2)
    assert torch.allclose(mean.image_tokens("single", 1, 2), ref.mean(1, keepdim=True))
    grid = ref.view(1, 4, 4, -1)
    pooled = grid.unflatten(1, (2, 2)).unflatten(3, (2, 2)).mean((2, 4)).flatten(1, 2)
    assert torch.allclose(pool.image_tokens("single", 1, 2), pooled, atol=1e-6)
    assert mean.text_tokens("double", 0, 0).shape[1] == 1


def test_lens_refuses_what_it_cannot_decode(tiny):
    pipe, _ = tiny
    _, txt = run_capture(pipe, small_opts(num_steps=1), selection=Selection.parse(streams="txt"))
    with pytest.raises(FluxIRError, match="needs every image token"):
        next(decode_capture(pipe, txt, progress=False))


def test_cli_selective_shards_capture(tmp_path):
    code = main(
        "capture --model flux-tiny --seed 1 --width 64 --height 64 --num_steps 2 "
        "--double_blocks none --single_blocks 1-2 --steps -1 --streams img --format shards "
        f"--output_dir {tmp_path}".split()
    )
    assert code == 0
    (run_dir,) = list(tmp_path.iterdir())
    (cap_dir,) = (run_dir / "intermediates").glob("capture_*")
    cap = load_capture(cap_dir)
    assert cap.block_indices == {"double": [], "single": [1, 2]}
    assert cap.captured_steps == [1]
    assert cap["single", 1, 1].shape == (1, N_TOKENS, 32)  # denoising step 1, the last
    assert len(list((run_dir / "intermediates" / "decoded").iterdir())) == 2


def test_cli_refuses_decoding_text_only_before_loading(capsys):
    code = main("capture --model flux-tiny --streams txt".split())
    assert code == 2 and "turn --should_decode_intermediates off" in capsys.readouterr().err
