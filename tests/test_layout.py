"""The package's layout: data flows one way through its stages, and no module imports the root."""

import ast
from pathlib import Path

import flux_ir

PACKAGE = Path(flux_ir.__file__).parent
# models -> sampling -> capture / intervene -> store -> lens -> sweep -> analysis -> plots -> workflows -> cli;
# the explorer (a web app over sweeps and captures) stands with the command lines
# flux-toy's training and quality bars live with their command lines
STAGES = [
    {"errors", "version", "geometry", "io"},
    {"models"},
    {"sampling", "inversion"},
    {"capture", "intervene"},
    {"store"},
    {"lens"},
    {"sweep"},
    {"analysis"},
    {"plots"},
    {"workflows"},
    {"cli", "toy", "explorer"},
]


def stage(part: str) -> int:
    return next(i for i, names in enumerate(STAGES) if part in names)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every flux_ir import in `path`, lazy ones inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
    return [(line, m) for line, m in out if m == "flux_ir" or m.startswith("flux_ir.")]


def test_every_module_belongs_to_a_stage():
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    parts -= {"__init__"}
    assert parts <= set().union(*STAGES)


def test_no_module_imports_from_a_later_stage_or_the_package_root():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel == Path("__init__.py"):
            continue
        here = stage(rel.parts[0].removesuffix(".py"))
        for line, module in imports(path):
            if module == "flux_ir":
                wrong.append(f"{rel}:{line} imports the package root")
            elif stage(module.split(".")[1]) > here:
                wrong.append(f"{rel}:{line} imports {module} from a later stage")
    assert wrong == []
