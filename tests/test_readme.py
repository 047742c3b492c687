"""The README's examples run as written: the quick start's command, then the Python that loads its
capture (a second-stage test: a whole command and 192 lens decodes on the CPU)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(heading: str) -> str:
    return README.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, language: str) -> list[str]:
    return [part.split("```", 1)[0] for part in text.split(f"```{language}\n")[1:]]


@pytest.mark.slow
def test_the_quick_start_and_the_capture_loading_examples_run_as_written(tmp_path):
    (quick_start,) = code_blocks(section("## Quick start (offline, CPU, no downloads)"), "bash")
    command = next(line for line in quick_start.splitlines() if "capture_sample.py" in line)
    args = shlex.split(command)
    assert args[:3] == ["uv", "run", "python"]  # run here with this interpreter instead of uv
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / args[3]), *args[4:]]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "output").iterdir()
    assert len(list((run_dir / "intermediates" / "decoded").glob("*.jpg"))) == 12 * 16
    assert (run_dir / "intermediates" / "mosaic_x0.jpg").is_file()

    blocks = code_blocks(section("### Loading captures in Python"), "python")
    assert len(blocks) == 2
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        for k, block in enumerate(blocks):
            exec(compile(block, f"<README loading block {k}>", "exec"), scope)
    finally:
        os.chdir(ROOT)
    cap = scope["cap"]
    assert cap.stack("single", "img").shape == (8, 16, 1, 64, 128)
    assert repr(cap).startswith("Capture(flux-toy, 'a red circle on a blue background', 128x128")
