"""Command line: `flux-ir capture ...`, `flux-ir decode ...` (fire)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import fire

from flux_ir.errors import FluxIRError


def run_fire(component, argv: list[str] | None = None, name: str = "flux-ir") -> int:
    """Run a fire component; print FluxIRError messages without a traceback and return exit code 2."""
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
