"""Command line: `flux-ir capture ...`, `flux-ir decode ...`, `flux-ir sweep ...`, `flux-ir analyze ...`
(fire). Commands are thin: they map flags to the library's settings objects (which validate
themselves), call the library, and print where the results went."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from flux_ir.errors import FluxIRError, InvalidArgumentError


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


def run_fire(component, argv: list[str] | None = None, name: str = "flux-ir") -> int:
    """Run a fire component; print FluxIRError messages without a traceback and return exit code 2."""
    import fire

    try:
        fire.Fire(component, command=argv, name=name)
    except FluxIRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def commands() -> dict[str, Callable]:
    from flux_ir.cli.capture import capture
    from flux_ir.cli.decode import decode
    from flux_ir.cli.sweep import analyze, sweep

    return {"capture": capture, "decode": decode, "sweep": sweep, "analyze": analyze}


def main(argv: list[str] | None = None) -> int:
    return run_fire(commands(), argv)


def entry() -> None:
    sys.exit(main())
