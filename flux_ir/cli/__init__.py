"""Command line: `flux-ir capture|decode|sweep|analyze|verify|patch|harvest ...` and the scripts beside the package
(`capture_sample.py`, `grid_sweep.py`, `train_toy.py`, `toy_quality.py`).

A strict front end stands before fire. `run_fire` checks every argument against the command
function's signature before anything runs: an unknown flag or command is refused with the closest
match (`error: unknown flag --n_alphas for grid_sweep.py; did you mean --n_alpha?`), a flag that
needs a value and has none too; `-h`/`--help` print help rendered from the signature and the
docstring's `Args:` section. Then fire calls the function, each argument passed as `--name=value`:
fire parses the values (`--seeds 0,123,200` is a tuple, `--prompt 1984` a number that `text()` turns
back into text). Accepted forms: `--name value`, `--name=value`, `--num-steps` for `--num_steps`;
switches (parameters annotated `bool`) as bare `--flag`, `--noflag`, `--flag False` or
`--flag=false`; parameters without a default also positionally (`flux-ir decode CAPTURE_PATH`).
A flag given twice keeps its last value.

Commands are thin: they map flags to the library's settings objects (which validate themselves),
call the library, and print where the results went. This module and the command modules import
nothing heavy (no torch, diffusers or transformers): the commands import them inside their bodies,
so help and argument errors answer at once.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import sys
import textwrap
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flux_ir.errors import FluxIRError, InvalidArgumentError

HELP_FLAGS = ("-h", "--help")
WIDTH = 100  # help text width (fixed, so that help reads the same everywhere)
BOOL_WORDS = {"true": True, "false": False}  # case-insensitive values of a switch
_FLAG = re.compile(r"^(--?)([A-Za-z_][\w-]*)(=.*)?$", re.S)  # "-10,10" and "-a cat" are values


class CommandLineError(FluxIRError):
    """An argument error rendered with the command line's flag names."""


def flags(**renames: str) -> Callable:
    """Decorate a command so that argument errors name its flags: a parameter `p` is `--p` unless
    `renames` maps it (e.g. `store_format="--format"`)."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except InvalidArgumentError as err:
                if err.param is None:
                    raise
                flag = renames.get(err.param, f"--{err.param}")
                raise CommandLineError(err.render(flag)) from err

        return run

    return decorate


def text(value) -> str | None:
    """A flag meant as text that the command line parsed as a number (`--prompt 1984`) is text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value  # anything else is refused by the setting it goes to


# -- a command's flags, from its signature and docstring -------------------------------------------
@dataclass(frozen=True)
class Flag:
    """One parameter of a command. `kind`: "switch" (annotated bool: bare `--flag` is True, the
    value is true or false), "optional" (bool | str: bare `--flag` is True, else a value) or "value"
    (needs a value). `required`: no default; it may also be given positionally."""

    name: str
    kind: str
    default: Any
    help: str

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def metavar(self) -> str:
        return self.name.upper()


def _annotation_names(annotation) -> set[str]:
    """Type names in an annotation (a string under `from __future__ import annotations`)."""
    if annotation is inspect.Parameter.empty:
        return set()
    if isinstance(annotation, str):
        return {part.strip() for part in annotation.split("|")}
    args = typing.get_args(annotation) or (annotation,)
    return {getattr(a, "__name__", str(a)) for a in args}


def _kind(param: inspect.Parameter) -> str:
    names = _annotation_names(param.annotation) - {"None", "NoneType"}
    if not names and isinstance(param.default, bool):
        names = {"bool"}
    if names == {"bool"}:
        return "switch"
    return "optional" if "bool" in names else "value"


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: help}) of a Google-style docstring. An `Args:` entry may name
    several parameters (`width, height: ...`): each gets the whole text."""
    lines = inspect.cleandoc(doc or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
    if not starts:
        return "\n".join(lines).strip(), {}
    start = starts[0]
    base = len(lines[start]) - len(lines[start].lstrip())
    entries: dict[str, str] = {}
    names: list[str] = []
    words: list[str] = []
    entry_indent = None
    header = re.compile(r"^(\w+(?:\s*,\s*\w+)*)\s*:(?:\s+(.*))?$")

    def flush() -> None:
        for name in names:
            entries[name] = " ".join(" ".join(words).split())

    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base:
            break
        entry_indent = indent if entry_indent is None else entry_indent
        m = header.match(line.strip())
        if indent == entry_indent and m:
            flush()
            names = [n.strip() for n in m.group(1).split(",")]
            words = [m.group(2) or ""]
        else:
            words.append(line.strip())
    flush()
    return "\n".join(lines[:start]).strip(), entries


def command_flags(fn: Callable) -> dict[str, Flag]:
    """The flags of a command function, in signature order."""
    _, docs = parse_docstring(fn.__doc__)
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = Flag(p.name, _kind(p), p.default, docs.get(p.name, ""))
    return out


def summary(fn: Callable) -> str:
    """The first paragraph of a command's docstring, on one line."""
    description, _ = parse_docstring(fn.__doc__)
    return " ".join(description.split("\n\n")[0].split())


# -- help -------------------------------------------------------------------------------------------
_GLUE = "\x00"  # a space that help text is not wrapped at


def _default_text(flag: Flag) -> str:
    if flag.required or flag.default is None:
        return ""  # the docstring says what happens when it is left out
    value = flag.default
    shown = (value or '""') if isinstance(value, str) else repr(value)
    return f" (default: {shown})".replace(" ", _GLUE).replace(_GLUE, " ", 1)


def _wrap(text: str, **kw) -> list[str]:
    """Lines of at most WIDTH characters, broken at spaces only (not in flux-toy or 0,123,200)."""
    return textwrap.wrap(text, WIDTH, break_long_words=False, break_on_hyphens=False, **kw)


def _entry(label: str, body: str, column: int = 28) -> list[str]:
    """`label` in a column, `body` wrapped beside it (below it when the label is too wide)."""
    lead, indent = "  " + label, " " * column
    wrap = functools.partial(_wrap, initial_indent=indent, subsequent_indent=indent)
    if len(lead) + 2 > column:
        lines = [lead, *wrap(body)]
    else:
        lines = wrap(body)
        lines = [lead.ljust(column) + (lines[0][column:] if lines else "")] + lines[1:]
    return [line.replace(_GLUE, " ") for line in lines]


def render_help(fn: Callable, prog: str) -> str:
    """Help of one command: usage, description, its arguments and flags with defaults."""
    description, _ = parse_docstring(fn.__doc__)
    all_flags = command_flags(fn)
    positional = [f for f in all_flags.values() if f.required]
    usage = " ".join([f"usage: {prog}", *(f.metavar for f in positional), "[flags]"])
    out = [usage, ""]
    for paragraph in description.split("\n\n"):
        out += _wrap(" ".join(paragraph.split())) + [""]
    if positional:
        out.append("arguments:")
        for f in positional:
            out += _entry(f.metavar, f"{f.help} (or --{f.name} {f.metavar})")
        out.append("")
    out.append("flags:")
    for f in all_flags.values():
        if f.required:
            continue
        label = {"switch": f"--{f.name}", "optional": f"--{f.name} [{f.metavar}]"}.get(
            f.kind, f"--{f.name} {f.metavar}"
        )
        out += _entry(label, f.help + _default_text(f))
    out += _entry("-h, --help", "show this help and exit")
    out += [
        "",
        *_wrap(
            "Flags take --name value or --name=value. Switches (True/False) are set by --name, "
            "--noname or --name=False."
        ),
    ]
    return "\n".join(out)


def render_commands_help(commands: Mapping[str, Callable], prog: str) -> str:
    """Help of a multi-command entry point: each command with its docstring's first paragraph."""
    out = [f"usage: {prog} COMMAND [flags]   ({prog} COMMAND -h lists the command's flags)", ""]
    out.append("commands:")
    column = max(len(name) for name in commands) + 6
    for name, fn in commands.items():
        out += _entry(name, summary(fn), column)
    return "\n".join(out)


# -- parsing ----------------------------------------------------------------------------------------
def _suggest(word: str, candidates: list[str]) -> str | None:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_flag(token: str, prog: str, all_flags: dict[str, Flag]) -> CommandLineError:
    shown = token.split("=", 1)[0]
    key = shown.lstrip("-").replace("-", "_")
    names = list(all_flags)
    switches = [f"no{n}" for n, f in all_flags.items() if f.kind != "value"]
    if key in all_flags:  # -model: one dash too few
        match = key
    elif len(key) == 1:  # -w: fire's one-letter shortcuts are not taken (-h would be --height)
        starting = [n for n in names if n.startswith(key)]
        match = starting[0] if len(starting) == 1 else None
    else:
        match = _suggest(key, names + switches)
    hint = f"; did you mean --{match}?" if match else f" (see {prog} --help)"
    return CommandLineError(f"unknown flag {shown} for {prog}{hint}")


def parse_arguments(fn: Callable, argv: list[str], prog: str = "flux-ir") -> dict[str, str]:
    """Check `argv` against `fn`'s signature; return {parameter: value as written} (a switch's value
    is "True" or "False"). Raises CommandLineError naming the first bad argument."""
    all_flags = command_flags(fn)
    given: dict[str, str] = {}
    loose: list[tuple[str, str | None]] = []  # positional tokens, and the switch just before
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        m = _FLAG.match(token)
        if not m:
            loose.append((token, argv[i - 2] if i >= 2 and _FLAG.match(argv[i - 2]) else None))
            continue
        dashes, key, eq = m.groups()
        key = key.replace("-", "_")
        value = None if eq is None else eq[1:]
        after = argv[i] if i < len(argv) else None
        after_is_value = after is not None and not _FLAG.match(after)
        flag = all_flags.get(key) if dashes == "--" else None
        negated = (
            flag is None
            and dashes == "--"
            and value is None
            and key.startswith("no")
            and key[2:] in all_flags
            and all_flags[key[2:]].kind != "value"
        )
        if negated:
            flag = all_flags[key[2:]]
        if flag is None:
            raise _unknown_flag(token, prog, all_flags)
        shown = f"--{flag.name}"
        if negated:
            value = "False"
        elif flag.kind == "value":
            if value is None:
                if not after_is_value:
                    raise CommandLineError(f"{shown} needs a value ({prog} --help)")
                value, i = after, i + 1
        elif flag.kind == "switch":
            if value is None and after_is_value and after.lower() in BOOL_WORDS:
                value, i = after, i + 1
            if value is None:
                value = "True"
            elif value.lower() in BOOL_WORDS:
                value = str(BOOL_WORDS[value.lower()])
            else:
                raise CommandLineError(
                    f"{shown} is a switch: write {shown}, --no{flag.name} or {shown}=False, "
                    f"not {shown}={value}"
                )
        else:  # optional: bare means True
            if value is None and after_is_value:
                value, i = after, i + 1
            if value is None:
                value = "True"
            elif value.lower() in BOOL_WORDS:
                value = str(BOOL_WORDS[value.lower()])
        given[flag.name] = value  # given twice: the last one counts
    positional = [f.name for f in all_flags.values() if f.required and f.name not in given]
    for token, before in loose:
        if not positional:
            switch = all_flags.get((before or "").lstrip("-").replace("-", "_"))
            hint = ""
            if switch is not None and switch.kind == "switch":
                hint = f"; --{switch.name} is a switch and takes no value but True or False"
            raise CommandLineError(f"unexpected argument {token!r} for {prog}{hint}")
        given[positional.pop(0)] = token
    if positional:
        needed = " ".join(all_flags[n].metavar for n in positional)
        raise CommandLineError(
            f"{prog} needs {needed} (usage: {prog} {needed} [flags]; {prog} --help)"
        )
    return given


TEXT_ANNOTATIONS = ("str", "str | None")


def _call(fn: Callable, given: dict[str, str], prog: str):
    """Call `fn` through fire: fire parses each value (literals become numbers, tuples, bools),
    except the values of text parameters (annotated `str`), which reach `fn` as typed: a prompt
    "1984" stays text, and a 70,000-character prompt is not parsed as Python."""
    import inspect

    import fire

    params = inspect.signature(fn).parameters
    command = []
    for name, value in given.items():
        param = params.get(name)
        if param is not None and str(param.annotation) in TEXT_ANNOTATIONS:
            value = repr(str(value))
        command.append(f"--{name}={value}")
    return fire.Fire(fn, command=command, name=prog)


def run_fire(
    component: Callable | Mapping[str, Callable],
    argv: list[str] | None = None,
    name: str = "flux-ir",
) -> int:
    """Run a command function (or pick one from a {name: function} mapping by the first argument)
    with the strict front end and fire. Help goes to stdout (exit code 0); argument errors and
    FluxIRError messages go to stderr as one line without a traceback (exit code 2); Ctrl-C ends
    with one line and exit code 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if isinstance(component, Mapping):
            if argv and argv[0] in HELP_FLAGS:
                print(render_commands_help(component, name))
                return 0
            if not argv or argv[0].startswith("-"):
                raise CommandLineError(
                    f"{name} needs a command first: {', '.join(component)} ({name} --help)"
                )
            sub = argv[0]
            if sub not in component:
                match = _suggest(sub, list(component))
                hint = (
                    f"; did you mean {match}?"
                    if match
                    else f" (choose one of {', '.join(component)})"
                )
                raise CommandLineError(f"unknown command {sub} for {name}{hint}")
            return run_fire(component[sub], argv[1:], f"{name} {sub}")
        if any(token in HELP_FLAGS for token in argv):
            print(render_help(component, name))
            return 0
        _call(component, parse_arguments(component, argv, name), name)
    except FluxIRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was finished is flushed (a sweep says how to resume)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def commands() -> dict[str, Callable]:
    """flux-ir's commands (their modules are light: each imports torch inside its body)."""
    from flux_ir.cli.animate import animate
    from flux_ir.cli.capture import capture
    from flux_ir.cli.decode import decode
    from flux_ir.cli.explore import explore
    from flux_ir.cli.geometry import geometry
    from flux_ir.cli.harvest import harvest
    from flux_ir.cli.patch import patch
    from flux_ir.cli.sweep import analyze, sweep
    from flux_ir.cli.verify import verify

    return {
        "capture": capture,
        "decode": decode,
        "sweep": sweep,
        "analyze": analyze,
        "verify": verify,
        "patch": patch,
        "harvest": harvest,
        "explore": explore,
        "animate": animate,
        "geometry": geometry,
    }


def main(argv: list[str] | None = None) -> int:
    return run_fire(commands(), argv)


def entry() -> None:
    sys.exit(main())
