"""Background writing of sweeps: the GIL-free PNG encoder, the writer thread, the points table."""

import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import flux_ir.sweep.store as store_mod
import flux_ir.sweep.writer as writer_mod
from flux_ir.io.png import encode_png, write_png
from flux_ir.models import resolve_model
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep
from flux_ir.sweep.store import SweepStore
from flux_ir.sweep.writer import BackgroundWriter

RNG = np.random.default_rng(0)


def smooth_image(h: int = 96, w: int = 128) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 7.0)[..., None] * np.cos(y / 9.0)[..., None]
    return (base + RNG.normal(0, 2, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (6, 4, 3), (3, 9, 4)])
def test_png_decodes_to_exactly_the_pixels(shape):
    pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(encode_png(pixels))))
    assert np.array_equal(back, pixels.reshape(back.shape))


def test_png_of_a_natural_image_is_about_as_small_as_pillows():
    pixels = smooth_image()
    pil = io.BytesIO()
    Image.fromarray(pixels).save(pil, format="PNG")
    assert len(encode_png(pixels)) <= 1.15 * len(pil.getvalue())


def test_png_refuses_non_uint8_pixels():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))


def test_a_png_write_cut_short_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    def half_then_interrupt(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_png(tmp_path / "a000_b000.png", smooth_image())
    assert list(tmp_path.iterdir()) == []


def test_writer_runs_every_job_in_order_before_close_returns():
    done = []
    with BackgroundWriter(max_pending=1) as writer:
        for k in range(5):
            writer.submit(lambda k=k: (time.sleep(0.01), done.append(k)))
    assert done == [0, 1, 2, 3, 4]


def test_writer_error_reaches_the_caller_and_later_jobs_are_skipped():
    done = []

    def fail():
        raise OSError("disk full")

    writer = BackgroundWriter(max_pending=4)
    writer.submit(fail)
    writer.submit(done.append, 1)
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert done == []


def test_writer_error_is_raised_at_the_next_submit_and_at_close():
    def fail():
        raise ValueError("bad image")

    writer = BackgroundWriter(max_pending=1)
    writer.submit(fail)
    with pytest.raises(ValueError, match="bad image"):
        for _ in range(1000):  # until the thread has run the failing job
            writer.submit(lambda: None)
            time.sleep(0.01)
    with pytest.raises(ValueError, match="bad image"):  # a failed writer stays failed
        writer.close()


def test_writer_finishes_submitted_jobs_when_the_caller_is_interrupted():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter(max_pending=2) as writer:
            writer.submit(lambda: (time.sleep(0.05), done.append("batch 0")))
            raise KeyboardInterrupt
    assert done == ["batch 0"]


def test_a_full_queue_makes_submit_wait_and_counts_it(monkeypatch):
    now = [0.0]  # the writer's clock, moved by hand: no wall-clock assertion
    monkeypatch.setattr(writer_mod, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    gate = threading.Event()
    writer = BackgroundWriter(max_pending=1)
    writer.submit(gate.wait)  # taken by the thread, which then waits for the gate
    writer.submit(lambda: None)  # fills the queue
    entered, put = threading.Event(), writer._jobs.put
    monkeypatch.setattr(writer._jobs, "put", lambda item: (entered.set(), put(item)))
    third = threading.Thread(target=writer.submit, args=(lambda: None,))
    third.start()
    entered.wait()  # the third submit has read the clock and waits for a free slot
    now[0] = 5.0  # only a submit still waiting when the clock moves counts these 5 s
    gate.set()
    third.join()
    writer.close()
    assert writer.blocked_s == 5.0


def test_points_part_skips_a_cut_short_line_and_appends_on_a_new_line(tmp_path):
    store = SweepStore(tmp_path)
    store.parts.mkdir(parents=True)
    row = lambda i: {"index": i, "row": 0, "col": i, "alpha": 0.0, "beta": float(i),  # noqa: E731
                     "norm_before": 1.0, "norm_after": 1.0, "file": f"images/a000_b{i:03d}.png",
                     "done": True}  # fmt: skip
    path = store.append_points([row(0), row(1)], rank=0)
    path.write_text(path.read_text() + "2,0,2,0.0,2.")  # a write cut short
    store.append_points([row(3)], rank=0)
    assert sorted(store.read_parts()) == [0, 1, 3]
    assert list(pd.read_csv(path, on_bad_lines="skip")["index"])[-1] == 3


def tiny_cfg(**kw) -> SweepConfig:
    return SweepConfig.from_spec(
        resolve_model("flux-tiny"), width=32, height=32, num_steps=2,
        grid=GridSpec(n_alpha=2, n_beta=3), **kw,
    )  # fmt: skip


def test_a_failing_image_write_stops_the_sweep_with_its_error(tiny, tmp_path, monkeypatch):
    real = store_mod.write_png

    def fail_on_a001(path, pixels, level=6):
        if Path(path).name == "a001_b000.png":
            raise OSError("no space left on device")
        return real(path, pixels, level)

    monkeypatch.setattr(store_mod, "write_png", fail_on_a001)
    with pytest.raises(OSError, match="no space left"):
        run_sweep(tiny[0], tiny_cfg(), tmp_path, batch_size=2, progress=False)
    assert sorted(store_mod.SweepStore(tmp_path).read_parts()) == [0, 1]  # the batch before
    assert not list(tmp_path.rglob(".*tmp*"))


def test_an_interrupted_sweep_leaves_only_complete_pngs(tiny, tmp_path, monkeypatch):
    import flux_ir.sweep.run as run_mod

    real_write, real_generate = store_mod.write_png, run_mod.generate_batch
    calls = {"n": 0}

    def slow_write(path, pixels, level=6):
        time.sleep(0.2)  # the interruption arrives while the first batch is being written
        return real_write(path, pixels, level)

    def interrupt_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(store_mod, "write_png", slow_write)
    monkeypatch.setattr(run_mod, "generate_batch", interrupt_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny[0], tiny_cfg(), tmp_path, batch_size=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == ["a000_b000.png", "a000_b001.png"]
    for name in names:
        assert Image.open(tmp_path / "images" / name).convert("RGB").size == (32, 32)
    assert sorted(SweepStore(tmp_path).read_parts()) == [0, 1]
