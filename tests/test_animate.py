"""Movies: a block's lens decode over the steps and a sweep point's x0 over the steps, as GIF and MP4."""

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from flux_ir.cli import main
from flux_ir.errors import InvalidArgumentError
from flux_ir.plots.frames import labelled_frame, write_movie
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep
from flux_ir.workflows import CaptureRunOptions, capture_to_dir
from flux_ir.workflows.movies import animate

from .conftest import small_opts

STEPS = 3


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    pipe, spec = tiny
    return capture_to_dir(
        pipe,
        spec,
        small_opts(num_steps=STEPS),
        tmp_path_factory.mktemp("runs"),
        CaptureRunOptions(),
    )


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as im:
        out = []
        for k in range(im.n_frames):
            im.seek(k)
            out.append(np.asarray(im.convert("RGB")))
        return out


def test_a_blocks_movie_has_one_labelled_frame_per_step(run_dir, tmp_path):
    paths = animate(
        run_dir, tmp_path, fps=5, double_blocks="none", single_blocks="-1", formats=("gif", "mp4")
    )
    assert [p.name for p in paths] == ["single_block_3_x0.gif", "single_block_3_x0.mp4"]
    frames = gif_frames(paths[0])
    assert len(frames) == STEPS
    with Image.open(paths[0]) as im:
        assert im.info["duration"] == 200 and im.info.get("loop") == 0
    h, w, _ = frames[0].shape
    assert w == 256 and h % 16 == 0 and w % 16 == 0
    # the image part of each frame is that step's lens decode, scaled
    for step, frame in enumerate(frames):
        with Image.open(
            run_dir / "intermediates" / "decoded" / f"single_block_3_step_{step}.jpg"
        ) as d:
            decode = np.asarray(d.convert("RGB").resize((256, 256), Image.Resampling.BICUBIC))
        assert np.abs(frame[:256].astype(int) - decode).mean() < 12  # GIF palette quantisation
    assert (frames[0][256:] != frames[1][256:]).any()  # the step label differs
    reader = imageio.get_reader(paths[1])
    assert reader.count_frames() == STEPS and reader.get_meta_data()["fps"] == 5
    reader.close()


def test_every_captured_block_by_default_into_movies(run_dir):
    paths = animate(run_dir, formats=("gif",))
    assert len(paths) == 2 + 4 and all(p.parent == run_dir / "movies" for p in paths)


def test_a_target_without_decodes_needs_the_model(run_dir, tiny, tmp_path):
    with pytest.raises(InvalidArgumentError, match="missing"):
        animate(run_dir, tmp_path, target="next", single_blocks="0", double_blocks="none")
    paths = animate(
        run_dir, tmp_path, target="next", single_blocks="0", double_blocks="none",
        formats=("gif",), pipe=tiny[0],
    )  # fmt: skip
    assert len(gif_frames(paths[0])) == STEPS
    assert (run_dir / "intermediates" / "decoded_next" / "single_block_0_step_2.jpg").is_file()


def test_a_sweep_points_x0_over_the_steps(tiny, tmp_path):
    pipe, spec = tiny
    cfg = SweepConfig.from_spec(
        spec, width=32, height=32, num_steps=STEPS, grid=GridSpec(n_alpha=2, n_beta=2)
    )
    run_sweep(pipe, cfg, tmp_path / "s", phase_pool=1, phase_images=16, progress=False)
    paths = animate(tmp_path / "s", points="0,3", formats=("gif",), size=64)
    assert [p.name for p in paths] == ["a000_b000_x0.gif", "a001_b001_x0.gif"]
    assert all(len(gif_frames(p)) == STEPS for p in paths)


def test_the_command_writes_movies_and_refuses_bad_flags(run_dir, tmp_path, capsys):
    out = tmp_path / "m"
    code = main(["animate", str(run_dir), "--formats", "gif", "--fps", "2",
                 "--double_blocks", "0", "--single_blocks", "none", "--output_dir", str(out)])  # fmt: skip
    assert code == 0
    assert len(gif_frames(out / "double_block_0_x0.gif")) == STEPS
    assert "1 movie(s)" in capsys.readouterr().out
    assert main(["animate", str(run_dir), "--fps", "0"]) == 2
    assert "--fps must be a number in (0, 60]" in capsys.readouterr().err
    assert main(["animate", str(run_dir), "--formats", "avi"]) == 2
    assert "--formats must be gif, mp4" in capsys.readouterr().err
    assert main(["animate", str(run_dir), "--single_blocks", "9"]) == 2
    assert "--single_blocks" in capsys.readouterr().err
    assert main(["animate", str(tmp_path)]) == 2
    assert "neither a capture run" in capsys.readouterr().err


def test_frames_are_multiples_of_16_and_movies_need_frames(tmp_path):
    frame = labelled_frame(Image.new("RGB", (30, 20), "red"), "x", size=50)
    assert frame.shape[0] % 16 == 0 and frame.shape[1] == 64
    with pytest.raises(ValueError, match="at least one frame"):
        write_movie(tmp_path / "a.gif", [])
