"""Capture files: plain torch.load, the README example, atomic writes, clear errors on bad files."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from flux_ir.errors import CaptureFileError
from flux_ir.store import load_capture, save_capture

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def saved(tiny_capture, tmp_path_factory):
    _, cap = tiny_capture
    path = tmp_path_factory.mktemp("cap") / "capture_20260101_000000_flux-tiny.pt"
    save_capture(cap, path)
    return path, cap


def test_plain_torch_load_returns_the_original_schema(saved):
    path, cap = saved
    data = torch.load(path, weights_only=True)
    assert set(data) == {"double_blocks", "single_blocks", "denoising_context", "metadata"}
    img, txt = data["double_blocks"]["block_0"][0]
    assert isinstance(data["double_blocks"]["block_0"][0], tuple)
    assert torch.equal(img, cap["double", 0, 0][0])
    assert torch.equal(data["single_blocks"]["block_3"][2], cap["single", 3, 2])


def test_load_capture_round_trip(saved):
    path, cap = saved
    loaded = load_capture(path)
    assert loaded.metadata == cap.metadata
    assert torch.equal(loaded.denoising_context["temb"][1], cap.denoising_context["temb"][1])


def test_readme_loading_example_runs_verbatim(saved, tmp_path, monkeypatch):
    path, _ = saved
    text = README.read_text()
    block = re.search(r"```python\n(from pathlib import Path\n\nimport torch\n.*?)```", text, re.S)
    assert block, "README lost its loading example"
    run = tmp_path / "output" / "20260101_000000_flux-tiny" / "intermediates"
    run.mkdir(parents=True)
    shutil.copy(path, run / "capture_20260101_000000_flux-tiny.pt")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert scope["metadata"]["model"] == "flux-tiny"


def test_save_leaves_no_temporary_files(saved):
    path, _ = saved
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}.sha256"]


def test_truncated_file_gives_a_clear_error(saved, tmp_path):
    path, _ = saved
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CaptureFileError, match="truncated.pt is truncated: a zip archive without"):
        load_capture(bad)


def test_garbage_and_foreign_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a capture at all")
    with pytest.raises(CaptureFileError, match="junk.pt"):
        load_capture(junk)
    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CaptureFileError, match="not a flux-ir capture"):
        load_capture(foreign)
    with pytest.raises(CaptureFileError, match="no capture file"):
        load_capture(tmp_path / "missing.pt")


def test_pickled_code_is_never_executed(tmp_path):
    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"double_blocks": Boom()}, evil)
    with pytest.raises(CaptureFileError):
        load_capture(evil)


def test_top_level_names_resolve():
    import flux_ir

    for name in flux_ir.__all__:
        assert getattr(flux_ir, name) is not None
    with pytest.raises(AttributeError):
        flux_ir.no_such_name  # noqa: B018
