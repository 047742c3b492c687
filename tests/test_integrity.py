"""Damaged, foreign and half-written captures: checksums and `verify`, bad manifests, refused pickles,
a full disk, temporaries of killed runs, a capture decoded with another model's pipeline."""

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch

from flux_ir.capture import run_capture
from flux_ir.cli import main, run_fire
from flux_ir.cli.verify import verify
from flux_ir.errors import CaptureFileError, InvalidArgumentError
from flux_ir.io import atomic
from flux_ir.io.atomic import (
    STALE_AFTER_S,
    atomic_path,
    is_temporary,
    remove_stale_temporaries,
    temp_path,
)
from flux_ir.lens import decode_capture
from flux_ir.store import ShardWriter, load_capture, save_capture, verify_capture
from flux_ir.store.shards import CONTEXT, MANIFEST
from flux_ir.workflows.capture_run import CaptureRunOptions, capture_to_dir

from .conftest import small_opts

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
OLD = time.time() - 10 * STALE_AFTER_S  # an mtime long past the grace period


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_pt(tiny_capture, tmp_path_factory):
    path = tmp_path_factory.mktemp("pt") / "capture_20260101_000000_flux-tiny.pt"
    save_capture(tiny_capture[1], path)
    return path


@pytest.fixture(scope="module")
def saved_shards(tiny, tmp_path_factory):
    pipe, spec = tiny
    path = tmp_path_factory.mktemp("shards") / "capture"
    writer = ShardWriter(path)
    _, cap = run_capture(pipe, small_opts(), model_name=spec.name, sink=writer)
    writer.finish(cap)
    return path


@pytest.fixture
def pt_copy(saved_pt, tmp_path):
    path = tmp_path / saved_pt.name
    shutil.copy(saved_pt, path)
    shutil.copy(f"{saved_pt}.sha256", f"{path}.sha256")
    return path


@pytest.fixture
def shard_copy(saved_shards, tmp_path):
    return Path(shutil.copytree(saved_shards, tmp_path / "capture"))


def tensor_range(shard: Path, key: str) -> tuple[int, int]:
    """Byte range of a tensor's data in a safetensors file."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    lo, hi = json.loads(data[8 : 8 + n])[key]["data_offsets"]
    return 8 + n + lo, 8 + n + hi


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- 1. checksums ---------------------------------------------------------------------------------
def test_a_pt_capture_has_a_sha256sum_line_beside_it(saved_pt):
    digest = hashlib.sha256(saved_pt.read_bytes()).hexdigest()
    assert Path(f"{saved_pt}.sha256").read_text() == f"{digest}  {saved_pt.name}\n"
    checked = verify_capture(saved_pt)
    assert (checked.files, checked.nbytes) == (1, saved_pt.stat().st_size)
    load_capture(saved_pt, verify=True)


def test_overwritten_bytes_in_a_pt_load_silently_but_fail_verification(pt_copy, tiny_capture):
    latents = tiny_capture[1].denoising_context["final_latents"]
    data = bytearray(pt_copy.read_bytes())
    at = bytes(data).find(latents.numpy().tobytes())
    assert at > 0
    data[at : at + 8] = bytes(8)  # same size: the zip and the pickle still read
    pt_copy.write_bytes(bytes(data))
    lazy = load_capture(pt_copy)  # the default trusts the bytes: wrong values, no error
    assert not torch.equal(lazy.denoising_context["final_latents"], latents)
    with pytest.raises(CaptureFileError) as err:
        load_capture(pt_copy, verify=True)
    assert one_line(err).startswith(f"{pt_copy} is damaged: its sha256 differs")
    assert "(bytes differ in denoising_context['final_latents'])" in str(err.value)


def test_shard_manifest_records_the_sha256_of_every_file(saved_shards):
    manifest = json.loads((saved_shards / MANIFEST).read_text())
    assert manifest["version"] == 2
    sums = manifest["checksums"]
    assert set(sums) == {*manifest["shards"], CONTEXT}
    for name, entry in sums.items():
        assert entry["sha256"] == hashlib.sha256((saved_shards / name).read_bytes()).hexdigest()
    assert set(sums["cond_step_0001.safetensors"]["crc32"]) >= {"double.0.img", "single.3"}
    checked = verify_capture(saved_shards)
    total = sum((saved_shards / n).stat().st_size for n in sums)
    assert (checked.files, checked.nbytes) == (len(manifest["shards"]) + 1, total)


def test_a_zeroed_tensor_in_a_shard_is_named_by_verification(shard_copy):
    shard = shard_copy / "cond_step_0001.safetensors"
    lo, hi = tensor_range(shard, "single.1")
    data = bytearray(shard.read_bytes())
    data[lo:hi] = bytes(hi - lo)
    shard.write_bytes(bytes(data))
    cap = load_capture(shard_copy)  # lazily, it decodes zeros
    assert not cap["single", 1, 1].any()
    with pytest.raises(CaptureFileError) as err:
        load_capture(shard_copy, verify=True)
    assert one_line(err).startswith(
        f"{shard} is damaged: the bytes of tensor 'single.1' differ from those written"
    )


def test_a_changed_shard_header_and_context_are_named(saved_shards, shard_copy):
    context = shard_copy / CONTEXT
    lo, _ = tensor_range(context, "final_latents")
    data = bytearray(context.read_bytes())
    data[lo : lo + 4] = b"\xff\xff\xff\x7f"
    context.write_bytes(bytes(data))
    with pytest.raises(CaptureFileError, match=f"{context} is damaged: the bytes of tensor 'final"):
        verify_capture(shard_copy)
    shutil.copy(saved_shards / CONTEXT, context)
    shard = shard_copy / "cond_step_0000.safetensors"
    data = bytearray(shard.read_bytes())
    at = data.index(b'"F32"')
    data[at : at + 5] = b'"I32"'  # same size, still a valid header: reads as integers
    shard.write_bytes(bytes(data))
    with pytest.raises(CaptureFileError, match="cond_step_0000.safetensors is damaged: its header"):
        verify_capture(shard_copy)


def test_verify_command_reports_ok_and_damage(saved_pt, pt_copy, shard_copy, capsys):
    assert run_fire(verify, [str(saved_pt)]) == 0
    size = saved_pt.stat().st_size
    assert capsys.readouterr().out == f"ok: {saved_pt} (1 files, {size} bytes)\n"
    assert run_fire(verify, [str(shard_copy)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {shard_copy} (5 files, ")
    shard = shard_copy / "cond_step_0002.safetensors"
    lo, hi = tensor_range(shard, "double.1.txt")
    data = bytearray(shard.read_bytes())
    data[lo:hi] = bytes(hi - lo)
    shard.write_bytes(bytes(data))
    assert run_fire(verify, [str(shard_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shard} is damaged: the bytes of tensor 'double.1.txt'")
    assert err.count("\n") == 1


def test_files_without_checksums_load_but_cannot_be_verified(capsys):
    for path in (LEGACY / "capture.pt", LEGACY / "capture_shards"):
        assert load_capture(path).metadata["model"] == "flux-tiny"
        with pytest.raises(CaptureFileError) as err:
            load_capture(path, verify=True)
        assert one_line(err).startswith(f"{path}: no checksums recorded")
        assert run_fire(verify, [str(path)]) == 2
        assert "no checksums recorded" in capsys.readouterr().err


# -- 2. bad manifests -----------------------------------------------------------------------------
def without(manifest: dict, key: str) -> dict:
    return {k: v for k, v in manifest.items() if k != key}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: [1, 2, 3], "is not a flux-ir-shards manifest: a JSON list, not an object"),
        (lambda m: without(m, "shards"), "is damaged: it lacks 'shards'; re-run the capture."),
        (lambda m: without(m, "metadata"), "is damaged: it lacks 'metadata'; re-run the capture."),
        (lambda m: {**m, "shards": [1]}, "is damaged: 'shards' is not what flux-ir writes"),
    ],
)
def test_bad_manifests_are_one_line_errors(shard_copy, edit, message):
    manifest = shard_copy / MANIFEST
    manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
    with pytest.raises(CaptureFileError) as err:
        load_capture(shard_copy)
    assert one_line(err).startswith(f"{manifest} {message}")
    with pytest.raises(CaptureFileError) as err:
        verify_capture(shard_copy)
    assert one_line(err).startswith(f"{manifest} {message}")


def test_a_directory_without_manifest_is_refused(tmp_path):
    with pytest.raises(CaptureFileError, match="holds no manifest.json: not a flux-ir-shards"):
        load_capture(tmp_path)


# -- 3. refused pickles, truncated and foreign files ----------------------------------------------
class Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_that_would_run_code_is_refused_in_our_words(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"double_blocks": Boom(), "metadata": {}}, evil)
    with pytest.raises(CaptureFileError) as err:
        load_capture(evil)
    text = one_line(err)
    assert text.startswith(f"{evil} is not a flux-ir capture: its pickle holds objects other than")
    assert "(print)" in text and "none of its code ran" in text
    for wrong in ("weights_only", "truncated", "corrupted", "trust"):
        assert wrong not in text
    assert err.value.__suppress_context__ and err.value.__cause__ is None
    assert "pwned" not in capsys.readouterr().out


def test_truncated_and_non_zip_files_are_told_apart(saved_pt, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(saved_pt.read_bytes()[:5000])
    with pytest.raises(CaptureFileError) as err:
        load_capture(cut)
    assert one_line(err).startswith(f"{cut} is truncated: a zip archive without its end record")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a capture at all")
    with pytest.raises(CaptureFileError) as err:
        load_capture(junk)
    assert one_line(err) == (
        f"{junk} is not a torch.save file: not a zip archive (it starts with b'not '), so not a "
        "flux-ir capture."
    )
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CaptureFileError, match="is empty"):
        load_capture(empty)


# -- 4. a full disk -------------------------------------------------------------------------------
def no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def no_space_after(limit: int):
    original = atomic.DigestWriter.write

    def write(self, data):
        if self.nbytes + memoryview(data).nbytes > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    return write


def test_save_on_a_full_disk_says_so_and_leaves_nothing(tiny_capture, tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.DigestWriter, "write", no_space_after(4096))
    path = tmp_path / "capture.pt"
    with pytest.raises(CaptureFileError) as err:
        save_capture(tiny_capture[1], path)
    assert one_line(err).startswith(f"the disk is full: could not write {path} (needs ")
    assert list(tmp_path.iterdir()) == []


def test_torchs_own_write_failure_on_a_full_disk(tiny_capture, tmp_path, monkeypatch):
    def save(obj, f):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 199360 vs 19"
        )

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(
        CaptureFileError, match=r"the disk is full: could not write .*, 0 bytes free"
    ):
        save_capture(tiny_capture[1], tmp_path / "capture.pt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_on_a_full_disk(tmp_path):
    with pytest.raises(CaptureFileError, match="the disk is full: could not write .*table.csv"):
        with atomic_path(tmp_path / "table.csv") as tmp:
            tmp.write_text("a")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_shards_on_a_full_disk(tiny, tmp_path, monkeypatch):
    pipe, spec = tiny

    monkeypatch.setattr(os, "fsync", no_space)  # where a full disk may first show
    writer = ShardWriter(tmp_path / "capture")
    with pytest.raises(CaptureFileError) as err:
        _, cap = run_capture(pipe, small_opts(), model_name=spec.name, sink=writer)
        writer.finish(cap)
    writer.abort()
    text = one_line(err)
    assert text.startswith(f"the disk is full: could not write {tmp_path / 'capture'}/")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("store_format", ["pt", "shards"])
def test_a_capture_run_on_a_full_disk_leaves_no_run_directory(
    tiny, tmp_path, monkeypatch, store_format
):
    pipe, spec = tiny
    if store_format == "pt":
        monkeypatch.setattr(atomic.DigestWriter, "write", no_space_after(10_000))
    else:
        monkeypatch.setattr(os, "fsync", no_space)
    run = CaptureRunOptions(decode=None, store_format=store_format)
    with pytest.raises(CaptureFileError, match="the disk is full"):
        capture_to_dir(pipe, spec, small_opts(), tmp_path, run)
    assert list(tmp_path.iterdir()) == []


# -- 5. temporaries of killed runs ----------------------------------------------------------------
def leftovers(directory: Path, dead: int) -> dict[str, Path]:
    """Temporaries of a dead writer, of this process, and files that are no temporaries."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "dead": directory / f".capture_x.tmp{dead}.pt",
        "dead_dir": directory / f".capture_y.tmp{dead}",
        "ours": directory / f".capture_z.tmp{os.getpid()}.pt",
        "dotfile": directory / ".config",
        "lookalike": directory / f".notes.tmp{dead}.txt.bak",
        "fresh": directory / f".img_0.tmp{dead}.jpg",
    }
    for key, path in files.items():
        if key == "dead_dir":
            path.mkdir()
            (path / "cond_step_0000.safetensors").write_bytes(b"x")
            os.utime(path / "cond_step_0000.safetensors", (OLD, OLD))
        else:
            path.write_bytes(b"x")
        if key != "fresh":  # written just now: perhaps by a live writer on another host
            os.utime(path, (OLD, OLD))
    return files


def assert_only_dead_removed(files: dict[str, Path]) -> None:
    assert not files["dead"].exists() and not files["dead_dir"].exists()
    for key in ("ours", "dotfile", "lookalike", "fresh"):
        assert files[key].exists(), key


def test_temporary_names_come_from_one_place(tmp_path):
    assert temp_path(tmp_path / "a.pt", pid=7) == tmp_path / ".a.tmp7.pt"
    assert temp_path(tmp_path / "capture_x", pid=7, directory=True) == tmp_path / ".capture_x.tmp7"
    assert is_temporary(".a.tmp7.pt") and is_temporary(".capture_x.tmp7")
    assert not is_temporary(".config") and not is_temporary("a.tmp7.pt")
    with atomic_path(tmp_path / "b.json") as tmp:
        assert tmp == temp_path(tmp_path / "b.json")
        tmp.write_text("{}")


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    files = leftovers(tmp_path, dead_pid())
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([files["dead"], files["dead_dir"]])
    assert_only_dead_removed(files)


def test_writers_remove_stale_temporaries(tiny, tmp_path):
    pipe, spec = tiny
    dead = dead_pid()
    shard_parent = leftovers(tmp_path / "shards", dead)
    ShardWriter(tmp_path / "shards" / "capture").abort()
    assert_only_dead_removed(shard_parent)

    out = tmp_path / "output"
    old_run = leftovers(out / "20250101_000000_flux-tiny" / "intermediates", dead)
    capture_to_dir(pipe, spec, small_opts(num_steps=1), out, CaptureRunOptions(decode=None))
    assert_only_dead_removed(old_run)


def test_a_resumed_sweep_removes_stale_temporaries(tiny, tmp_path):
    from flux_ir.sweep import GridSpec, SweepConfig
    from flux_ir.sweep.store import SweepStore

    _, spec = tiny
    cfg = SweepConfig.from_spec(
        spec, width=64, height=64, num_steps=2, grid=GridSpec(n_alpha=2, n_beta=2)
    )
    store = SweepStore(tmp_path / "sweep")
    store.claim(cfg)
    files = leftovers(store.images, dead_pid())
    store.claim(cfg)
    assert_only_dead_removed(files)


# -- 6. a capture decoded with another model's pipeline --------------------------------------------
@pytest.fixture(scope="module")
def toy_pipe():
    from flux_ir.models import load_pipeline
    from flux_ir.models.toy import has_toy_weights

    if not has_toy_weights():
        pytest.skip("no flux-toy weights in the package")
    return load_pipeline("flux-toy", device="cpu")[0]


MISMATCH = (
    "this capture was made by flux-tiny (2 double, 4 single blocks, width 32, VAE scaling 0.3611); "
    "the pipeline is flux-toy (4 double, 8 single blocks, width 128, VAE scaling 0.7031); "
    "pass {param} flux-tiny"
)


def test_decoding_with_another_models_pipeline_names_both(toy_pipe, tiny_capture):
    with pytest.raises(InvalidArgumentError) as err:
        next(decode_capture(toy_pipe, tiny_capture[1], progress=False))
    assert one_line(err) == MISMATCH.replace("{param}", "model")
    assert err.value.param == "model"


def test_decode_command_with_the_wrong_model(toy_pipe, saved_pt, tmp_path, capsys):
    code = main(["decode", str(saved_pt), "--model", "flux-toy", "--output_dir", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err == f"error: {MISMATCH.replace('{param}', '--model')}\n"
    assert not (tmp_path / "decoded").exists()  # refused before anything is written
