"""Every example in the package's docstrings runs: doctests, and each module docstring's example block
executed on flux-tiny (and flux-toy's shipped weights) in a temporary directory."""

import ast
import doctest
import importlib
import pkgutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import flux_ir

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(flux_ir.__path__, "flux_ir.")
    if not m.name.startswith("flux_ir.cli")  # command lines: their help is their documentation
)
PUBLIC = [
    "flux_ir.models", "flux_ir.sampling", "flux_ir.geometry", "flux_ir.capture", "flux_ir.store",
    "flux_ir.lens", "flux_ir.sweep", "flux_ir.analysis", "flux_ir.plots", "flux_ir.io",
    "flux_ir.workflows", "flux_ir.intervene",
]  # fmt: skip
# Examples that cannot run in a test: they take minutes (or a GPU) by design.
NOT_RUN = {
    "flux_ir.toy.train": "trains flux-toy for about 20 minutes on a GPU",
    "flux_ir.toy.quality": "measures the quality bars for minutes",
    "flux_ir.toy.train2": "trains flux-toy-2 for about 13 minutes on a GPU",
    "flux_ir.toy.quality2": "needs flux-toy-2's trained weights and measures for minutes",
}


def example_block(module) -> str | None:
    """The first indented block of the module docstring (a usage example), dedented."""
    doc = ast.get_docstring(ast.parse(Path(module.__file__).read_text()), clean=False) or ""
    block: list[str] = []
    for line in doc.splitlines():
        if line.startswith("    ") and not line.lstrip().startswith(">>>"):
            block.append(line)
        elif block and line.strip():
            break
        elif block:
            block.append("")
    return textwrap.dedent("\n".join(block)).strip() or None


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """Names the examples take as given: a flux-tiny capture and sweep, and the public API."""
    from flux_ir.capture import CaptureOptions, Selection, run_capture
    from flux_ir.models import load_pipeline
    from flux_ir.store import save_capture
    from flux_ir.sweep import GridSpec, SweepConfig, run_sweep

    root = tmp_path_factory.mktemp("examples")
    pipe, spec = load_pipeline("flux-tiny")
    opts = CaptureOptions.from_spec(spec, seed=1, width=64, height=64, num_steps=2)
    _, cap = run_capture(pipe, opts, model_name=spec.name)
    path = save_capture(cap, root / "capture.pt")
    cfg = SweepConfig.from_spec(
        spec, width=64, height=64, num_steps=2, grid=GridSpec(n_alpha=2, n_beta=2)
    )
    sweep_dir = root / "sweep"
    run_sweep(pipe, cfg, sweep_dir, batch_size=4, progress=False)
    from flux_ir.workflows.patching import causal_map

    sel = Selection(double_blocks=(0,), single_blocks=(), steps=(0, 1))
    other = CaptureOptions.from_spec(spec, seed=2, width=64, height=64, num_steps=2)
    cmap = causal_map(pipe, opts, other, selection=sel, progress=False)
    from flux_ir.workflows.harvest import HarvestOptions, read_prompts, run_harvest

    (root / "prompts.txt").write_text("a cat\na dog\n")
    entries = read_prompts(root / "prompts.txt", spec, width=32, height=32, num_steps=2)
    harvest_dir = root / "harvest"
    sel = Selection.parse("none", "3", streams="img")
    run_harvest(pipe, entries, harvest_dir, HarvestOptions(sel), progress=False)
    names = {}
    for package in PUBLIC:
        module = importlib.import_module(package)
        names.update({k: getattr(module, k) for k in getattr(module, "__all__", vars(module))})
    from flux_ir.sweep.run import grid_norms, point_row
    from flux_ir.toy.scenes import make_scenes
    from flux_ir.workflows.ablation import block_importance

    return {
        **names, "flux_ir": flux_ir, "torch": torch, "np": np, "Path": Path,
        "grid_norms": grid_norms, "block_importance": block_importance, "point_row": point_row, "make_scenes": make_scenes,
        "spec": spec, "opts": opts, "cap": cap, "harvest_dir": harvest_dir, "cmap": cmap, "path": path, "cfg": cfg, "sweep_dir": sweep_dir,
        "paths": sorted((sweep_dir / "images").glob("*.png")),
    }  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_module_example_runs(name, namespace, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    code = example_block(module)
    if code is None:
        pytest.skip("no example")
    if name in NOT_RUN:
        pytest.skip(NOT_RUN[name])
    from flux_ir.models import load_pipeline

    monkeypatch.chdir(tmp_path)
    scope = {**vars(module), **namespace, "pipe": load_pipeline("flux-tiny")[0]}
    exec(compile(code, f"<{name} example>", "exec"), scope)


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    if not tests:
        pytest.skip("no doctests")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_the_main_modules_show_an_example():
    """(A formatter that dedents a docstring would silently hide its example from the test above.)"""
    main = [
        "flux_ir", "flux_ir.sampling", "flux_ir.capture.run", "flux_ir.capture.trace",
        "flux_ir.capture.schema", "flux_ir.store.files", "flux_ir.store.shards", "flux_ir.lens.blocks",
        "flux_ir.lens.decode", "flux_ir.models.loading", "flux_ir.sweep.run", "flux_ir.sweep.config",
        "flux_ir.sweep.store", "flux_ir.sweep.generate", "flux_ir.plots.sweep",
        "flux_ir.workflows.capture_run",
    ]  # fmt: skip
    assert [m for m in main if example_block(importlib.import_module(m)) is None] == []


def readme_block(heading: str) -> str:
    """The first python code block under a README heading."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_from_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(
        compile(readme_block("## From a notebook or a script"), "<README From a notebook>", "exec"),
        scope,
    )
    assert scope["cap"].image_tokens("single", 7, step=15).shape == (1, 64, 128)
    assert scope["cap"].captured_steps == [0, 15]
    assert scope["image"].size == (128, 128)


def test_the_readmes_interventions_example_runs_and_turns_the_circle_green(tmp_path, monkeypatch):
    from flux_ir.toy.checker import check_images
    from flux_ir.toy.scenes import COLOURS

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    code = readme_block("## Interventions: patching, steering, ablation")
    exec(compile(code, "<README Interventions>", "exec"), scope)
    pixels = torch.from_numpy(np.array(scope["patched"])).permute(2, 0, 1)[None].float() / 255
    assert check_images(pixels).colour.item() == COLOURS.index("green")
    assert scope["cap"].metadata["interventions"] == [
        "add(scale=0.5) at single -1 img, all steps, both"
    ]


def test_the_readmes_attention_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("### Attention maps"), "<README attention>", "exec"), scope)
    assert scope["words"] == {"circle": 2, "background": 6}
    assert scope["trace"].maps["single", -1, -1, "txt->img"].shape == (1, 2, 8, 8)
    assert (tmp_path / "attention.png").is_file() and (tmp_path / "attention.safetensors").is_file()


def test_the_readmes_prepare_capture_example_runs():
    scope: dict = {}
    exec(compile(readme_block("### Fast capture"), "<README Fast capture>", "exec"), scope)
    assert scope["cap"].image_tokens("single", -1, step=0).shape == (1, 64, 128)
