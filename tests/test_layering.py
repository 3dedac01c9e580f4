"""The layering of docs/ARCHITECTURE.md, checked on the source: every ``hadakit`` import (module level or inside a
function) points to the same layer or one below it, and the library never imports its CLI."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hadakit"

# Lowest first. Modules of one rank may import each other; a module may import any lower rank.
RANKS = [
    {"devices", "outdir", "selection"},
    {"kernels"},
    {"transforms"},
    {"formats"},
    {"quantization", "training", "analysis"},
    {"io"},
    {"evaluation"},
    {"api", "__init__"},
    {"cli"},
]
RANK = {name: i for i, names in enumerate(RANKS) for name in names}


def _part(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "hadakit":
                for alias in node.names:  # from hadakit import x: x may be a subpackage or a name of __init__
                    yield node.lineno, alias.name if alias.name in RANK else "__init__"
            elif node.module.startswith("hadakit."):
                yield node.lineno, _part(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hadakit."):
                    yield node.lineno, _part(alias.name)


def _modules():
    return sorted(p for p in SRC.rglob("*.py"))


def test_every_package_has_a_rank():
    tops = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in _modules()}
    assert tops - set(RANK) == set(), "a new top-level module needs a rank in this test and in ARCHITECTURE.md"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    bad = [(line, target) for line, target in _imports(path)
           if target != own and RANK.get(target, 99) > RANK[own]]
    # `import hadakit` for the version string is the one upward import a lower layer may make
    bad = [(line, t) for line, t in bad if not (t == "__init__" and "__version__" in path.read_text().splitlines()[line - 1])]
    assert not bad, f"{path.relative_to(SRC)} imports a higher layer: {bad}"


def test_the_check_catches_an_upward_import(tmp_path):
    # negative control: the parser sees an import inside a function
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from hadakit.cli.main import main\n    return main\n")
    assert list(_imports(f)) == [(2, "cli")]
