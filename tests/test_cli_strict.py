"""The command lines' strict front end: unknown flags and commands are refused before any work,
help is rendered from each command's signature and docstring, help imports nothing heavy, and
`--multi_gpu` is refused where it cannot apply."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flux_ir.cli import (
    command_flags,
    commands,
    flags,
    main,
    parse_arguments,
    parse_docstring,
    run_fire,
    summary,
)
from flux_ir.cli.capture import capture
from flux_ir.cli.sweep import sweep
from flux_ir.toy.cli import quality, train

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers")


def all_commands() -> dict:
    """Every command function with the program name it runs under."""
    table = {f"flux-ir {name}": fn for name, fn in commands().items()}
    table.update({"train_toy.py": train, "toy_quality.py": quality})
    return table


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command function is called at all (fire never reached)."""

    def called(*a, **k):
        raise AssertionError("the command ran despite a bad argument")

    monkeypatch.setattr("fire.Fire", called)


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


# -- unknown flags and commands -------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn, name, argv, message",
    [
        (
            sweep,
            "grid_sweep.py",
            "--model flux-tiny --width 64 --height 64 --n_alphas 2 --output_dir X",
            "error: unknown flag --n_alphas for grid_sweep.py; did you mean --n_alpha?",
        ),
        (
            capture,
            "capture_sample.py",
            "--num_step 1",
            "error: unknown flag --num_step for capture_sample.py; did you mean --num_steps?",
        ),
        (
            capture,
            "capture_sample.py",
            "--modle flux-toy",
            "error: unknown flag --modle for capture_sample.py; did you mean --model?",
        ),
        (
            capture,
            "capture_sample.py",
            "--model flux-tiny --num-step=2",
            "error: unknown flag --num-step for capture_sample.py; did you mean --num_steps?",
        ),
        (
            capture,
            "capture_sample.py",
            "--model flux-tiny --nocompil",
            "error: unknown flag --nocompil for capture_sample.py; did you mean --nocompile?",
        ),
        (
            capture,
            "capture_sample.py",
            "-model flux-tiny",
            "error: unknown flag -model for capture_sample.py; did you mean --model?",
        ),
        (
            capture,
            "capture_sample.py",
            "--xyzzy 3",
            "error: unknown flag --xyzzy for capture_sample.py (see capture_sample.py --help)",
        ),
        (
            capture,
            "capture_sample.py",
            "--nowidth",
            "error: unknown flag --nowidth for capture_sample.py; did you mean --width?",
        ),
        (
            train,
            "train_toy.py",
            "--out x --seeed 1",
            "error: unknown flag --seeed for train_toy.py; did you mean --seed?",
        ),
        (
            quality,
            "toy_quality.py",
            "--sample 3",
            "error: unknown flag --sample for toy_quality.py; did you mean --samples?",
        ),
    ],
)
def test_unknown_flag_is_refused_before_the_command_runs(fn, name, argv, message, no_work, capsys):
    assert run_fire(fn, argv.split(), name=name) == 2
    assert one_line(capsys) == message


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            "capture --modle flux-toy",
            "error: unknown flag --modle for flux-ir capture; did you mean --model?",
        ),
        (
            "sweep --n_alphas 2",
            "error: unknown flag --n_alphas for flux-ir sweep; did you mean --n_alpha?",
        ),
        (
            "decode cap.pt --targt next",
            "error: unknown flag --targt for flux-ir decode; did you mean --target?",
        ),
        (
            "analyze out --embeder pixel",
            "error: unknown flag --embeder for flux-ir analyze; did you mean --embedder?",
        ),
        (
            "captrue --model flux-tiny",
            "error: unknown command captrue for flux-ir; did you mean capture?",
        ),
        ("swep", "error: unknown command swep for flux-ir; did you mean sweep?"),
        (
            "--model flux-tiny",
            "error: flux-ir needs a command first: capture, decode, sweep, analyze",
        ),
        ("", "error: flux-ir needs a command first: capture, decode, sweep, analyze"),
        ("decode", "error: flux-ir decode needs CAPTURE_PATH (usage: flux-ir decode CAPTURE_PATH"),
        ("decode a.pt b.pt", "error: unexpected argument 'b.pt' for flux-ir decode"),
        ("capture --prompt", "error: --prompt needs a value (flux-ir capture --help)"),
        ("capture --seed --model flux-tiny", "error: --seed needs a value"),
        (
            "capture --compile=maybe",
            "error: --compile is a switch: write --compile, --nocompile or --compile=False, "
            "not --compile=maybe",
        ),
        (
            "capture --compile yes",
            "error: unexpected argument 'yes' for flux-ir capture; --compile is a switch",
        ),
    ],
)
def test_flux_ir_refuses_bad_commands_and_flags_in_one_line(argv, message, no_work, capsys):
    assert main(argv.split()) == 2
    line = one_line(capsys)
    assert line.startswith(message), line


def test_the_scripts_refuse_an_unknown_flag_in_a_fresh_process():
    """The brief's example as a user runs it: exit 2, one line, nothing heavy imported."""
    code, out, err, heavy = _run_script("grid_sweep.py", "--model flux-tiny --n_alphas 2")
    assert code == 2 and out == ""
    assert (
        err.strip() == "error: unknown flag --n_alphas for grid_sweep.py; did you mean --n_alpha?"
    )
    assert heavy == []


# -- accepted forms -------------------------------------------------------------------------------
@flags()
def _probe(
    path: str,
    n: int = 1,
    on: bool = False,
    off: bool = True,
    mode: bool | str = False,
    seeds=None,
    prompt: str = "x",
) -> dict:
    """A command that returns what it was given.

    Args:
        path: a path.
        n: a number.
        on, off: switches.
        mode: False, True or a mode.
        seeds: a tuple.
        prompt: text.
    """
    _probe.seen = dict(path=path, n=n, on=on, off=off, mode=mode, seeds=seeds, prompt=prompt)


@pytest.mark.parametrize(
    "argv, expected",
    [
        ("p", dict(path="p")),
        ("--path p --n 3", dict(path="p", n=3)),
        ("p --n=3 --on --nooff", dict(path="p", n=3, on=True, off=False)),
        ("p --on False --off false", dict(path="p", on=False, off=False)),
        ("p --on=true --off=False", dict(path="p", on=True, off=False)),
        ("--on p", dict(path="p", on=True)),  # a switch does not swallow the positional
        ("p --mode", dict(path="p", mode=True)),
        ("p --mode --n 2", dict(path="p", mode=True, n=2)),
        ("p --mode group", dict(path="p", mode="group")),
        ("p --nomode", dict(path="p", mode=False)),
        ("p --seeds 0,123,200 --prompt 1984", dict(path="p", seeds=(0, 123, 200), prompt=1984)),
        ("p --n 1 --n 2", dict(path="p", n=2)),  # the last one counts
        ("p --n -3", dict(path="p", n=-3)),  # a negative number is a value, not a flag
    ],
)
def test_accepted_forms_reach_the_function_parsed(argv, expected, capsys):
    assert run_fire(_probe, argv.split(), name="probe") == 0, capsys.readouterr().err
    defaults = dict(n=1, on=False, off=True, mode=False, seeds=None, prompt="x")
    assert _probe.seen == {**defaults, **expected}


def test_sweep_flags_parse_as_written():
    given = parse_arguments(
        sweep, "--num-steps 2 --phases --noprogress --offload --alpha -10,10".split()
    )
    assert given == {
        "num_steps": "2",
        "phases": "True",
        "progress": "False",
        "offload": "True",
        "alpha": "-10,10",
    }


def test_noflag_flag_false_and_numeric_prompt_end_to_end(tmp_path):
    from PIL import ExifTags, Image

    argv = ["capture", "--model", "flux-tiny", "--width", "64", "--height", "64", "--seed", "1"]
    argv += ["--num-steps", "2", "--prompt", "1984", "--noshould_decode_intermediates"]
    argv += ["--add_sampling_metadata", "False", "--output_dir", str(tmp_path)]
    assert main(argv) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (meta,) = run_dir.glob("intermediates/metadata_*.json")
    meta = json.loads(meta.read_text())
    assert meta["prompt"] == "1984" and meta["num_steps"] == 2
    assert meta["multi_gpu"] is False and "device_map" not in meta
    assert not (run_dir / "intermediates" / "decoded").exists()
    assert ExifTags.Base.ImageDescription not in Image.open(run_dir / "img_0.jpg").getexif()


# -- help -----------------------------------------------------------------------------------------
def _help(fn, name, flag, capsys) -> str:
    assert run_fire(fn, [flag], name=name) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _described(text: str, label: str) -> str:
    """The description beside (or under) `label` in a help text."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"  {label} ") or line == f"  {label}":
            rest = [line[28:].strip()] if line[26:28] == "  " else []
            for more in lines[i + 1 :]:
                if not more.startswith(" " * 28):
                    break
                rest.append(more.strip())
            return " ".join(r for r in rest if r)
    raise AssertionError(f"{label} is not in the help:\n{text}")


@pytest.mark.parametrize("name", list(all_commands()))
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_describes_every_flag_with_its_default(name, flag, capsys):
    fn = all_commands()[name]
    text = _help(fn, name, flag, capsys)
    assert text.startswith(f"usage: {name}")
    assert summary(fn) in " ".join(text.split())
    for forbidden in ("INFO:", "Optional[", "Type:", "SYNOPSIS"):
        assert forbidden not in text
    for f in command_flags(fn).values():
        label = f.metavar if f.required else f"--{f.name}"
        described = _described(text, label)
        assert len(described) > 8, (name, f.name, described)
        assert "default" in described or f.required, (name, f.name, described)
        if f.default not in (None, False, True) and not f.required:
            assert f"(default: {f.default})" in described, (name, f.name, described)
    assert _described(text, "-h, --help")


def test_capture_help_is_not_height_and_names_the_details(capsys):
    assert main(["capture", "-h"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: flux-ir capture [flags]")
    width, height = _described(text, "--width WIDTH"), _described(text, "--height HEIGHT")
    assert width == height and width.startswith("image size in pixels")
    assert "16 for flux-toy" in _described(text, "--num_steps NUM_STEPS")
    assert "device_map" in _described(text, "--multi_gpu")
    assert "flux-toy" in _described(text, "--model MODEL")


def test_sweep_help_names_flux_toy_and_seeds(capsys):
    text = _help(sweep, "grid_sweep.py", "--help", capsys)
    assert "flux-toy" in _described(text, "--model MODEL")
    assert "0,123,200" in _described(text, "--seeds SEEDS")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_flux_ir_help_lists_the_commands(flag, capsys):
    assert main([flag]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: flux-ir COMMAND")
    for name, fn in commands().items():
        assert f"  {name}" in text
        assert summary(fn) in " ".join(text.split())


def test_every_parameter_has_a_docstring_entry():
    for name, fn in all_commands().items():
        description, entries = parse_docstring(fn.__doc__)
        assert description, name
        missing = [p for p in command_flags(fn) if not entries.get(p)]
        assert not missing, (name, missing)
        assert set(entries) <= set(command_flags(fn)), (name, set(entries) - set(command_flags(fn)))


def test_a_docstring_entry_naming_two_flags_gives_both_the_text():
    _, entries = parse_docstring(
        """Summary.

        Args:
            width, height: image size,
                in pixels.
            prompt: text.
        """
    )
    assert entries == {
        "width": "image size, in pixels.",
        "height": "image size, in pixels.",
        "prompt": "text.",
    }


# -- nothing heavy for help and argument errors ---------------------------------------------------
def _run_script(script: str, args: str) -> tuple[int, str, str, list[str]]:
    """Run a script in a fresh interpreter; return (exit code, stdout, stderr, heavy modules)."""
    code = (
        "import json, runpy, sys\n"
        f"sys.argv = [{script!r}, *{args.split()!r}]\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "    rc = 0\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('\\n@@' + json.dumps([rc, heavy]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    out, _, tail = proc.stdout.rpartition("\n@@")
    rc, heavy = json.loads(tail)
    return rc, out.strip(), proc.stderr, heavy


def _run_main(argv: list[str]) -> tuple[int, str, list[str]]:
    code = (
        "import json, sys\n"
        "from flux_ir.cli import main\n"
        f"rc = main({argv!r})\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('\\n@@' + json.dumps([rc, heavy]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    out, _, tail = proc.stdout.rpartition("\n@@")
    rc, heavy = json.loads(tail)
    return rc, out, heavy


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["-h"],
        ["capture", "-h"],
        ["decode", "--help"],
        ["sweep", "-h"],
        ["analyze", "-h"],
    ],
)
def test_flux_ir_help_imports_nothing_heavy(argv):
    rc, out, heavy = _run_main(argv)
    assert rc == 0 and out.startswith("usage: flux-ir")
    assert heavy == [], f"flux-ir {' '.join(argv)} imported {heavy}"


@pytest.mark.parametrize(
    "script", ["capture_sample.py", "grid_sweep.py", "train_toy.py", "toy_quality.py"]
)
def test_script_help_imports_nothing_heavy(script):
    rc, out, _, heavy = _run_script(script, "-h")
    assert rc == 0 and out.startswith(f"usage: {script}")
    assert heavy == [], f"{script} -h imported {heavy}"


def test_the_command_modules_import_nothing_heavy():
    modules = (
        "flux_ir.cli, flux_ir.cli.capture, flux_ir.cli.decode, flux_ir.cli.sweep, flux_ir.toy.cli"
    )
    code = f"import sys, {modules}\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- --multi_gpu ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model", "flux-schnell", "--multi_gpu"],
            "error: --multi_gpu needs at least 2 visible CUDA devices; this machine has 1",
        ),
        (
            ["--model", "flux-schnell", "--multi_gpu", "True", "--offload", "group"],
            "error: --multi_gpu places every component on a GPU; it cannot be combined with "
            "offload='group'",
        ),
        (
            ["--model", "flux-schnell", "--offload", "--multi_gpu"],
            "error: --multi_gpu places every component on a GPU; it cannot be combined with "
            "offload='model'",
        ),
        (
            ["--multi_gpu"],
            "error: --multi_gpu spreads weights loaded from the hub or a local directory over the "
            "GPUs, but flux-tiny is built in code: run it on one device",
        ),
        (
            ["--model", "flux-toy", "--multi_gpu=True"],
            "error: --multi_gpu spreads weights loaded from the hub or a local directory over the "
            "GPUs, but flux-toy is built in code: run it on one device",
        ),
        (
            ["--model", "flux-dev", "--weights", "random", "--multi_gpu"],
            "error: --multi_gpu spreads weights loaded from the hub or a local directory over the "
            "GPUs, but random weights are built in code: run it on one device",
        ),
        (
            ["--model", "flux-dev", "--device", "cpu", "--multi_gpu"],
            "error: --multi_gpu uses every visible GPU; leave the device out (got 'cpu') and choose "
            "the GPUs with CUDA_VISIBLE_DEVICES",
        ),
    ],
)
def test_multi_gpu_is_refused_where_it_cannot_apply(args, message, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        "flux_ir.models.load_pipeline", lambda *a, **k: pytest.fail("a model was loaded")
    )
    argv = ["capture", "--model", "flux-tiny", "--output_dir", str(tmp_path), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [message]
    assert "Traceback" not in err


def test_multi_gpu_loads_with_a_balanced_device_map(monkeypatch):
    """With 2 GPUs (simulated), the pipeline comes from `from_pretrained(device_map="balanced")`
    and is not moved afterwards (diffusers refuses `.to` on a device-mapped pipeline)."""
    import torch

    import flux_ir.models.loading as loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls = {}

    class Pipe:
        hf_device_map = {"transformer": 0, "text_encoder_2": 1, "vae": 1, "text_encoder": 0}
        components: dict = {}  # load_pipeline fingerprints the weights as it loads

        def set_progress_bar_config(self, **kw):
            pass

    def from_pretrained(source, **kw):
        calls.update(source=source, **kw)
        return Pipe()

    monkeypatch.setattr(loading.FluxPipeline, "from_pretrained", from_pretrained)
    monkeypatch.setattr(loading, "place_pipeline", lambda *a, **k: pytest.fail("pipeline moved"))
    opts = loading.LoadOptions.create("flux-schnell", multi_gpu=True)
    assert (opts.device, opts.multi_gpu, opts.offload) == ("cuda", True, "none")
    pipe, spec = loading.load_pipeline(opts)
    assert isinstance(pipe, Pipe) and spec.name == "flux-schnell"
    assert calls == {
        "source": "black-forest-labs/FLUX.1-schnell",
        "dtype": torch.bfloat16,
        "device_map": "balanced",
    }
    assert loading.LoadOptions.create("flux-tiny", device="cpu").multi_gpu is False


# -- the benchmark --------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_cli_help_smoke_writes_json_and_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_cli_help.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "cli_help.json").read_text())["rows"]
    by = {r["command"]: r for r in rows}
    assert by["flux-ir --help"]["heavy imports"] == "none"
    assert by["capture_sample.py -h"]["heavy imports"] == "none"
    assert (
        "--width must be a positive multiple of 16"
        in by["capture_sample.py --width 100 (library's error)"]["output"]
    )
    assert "| command |" in (tmp_path / "cli_help.md").read_text()
