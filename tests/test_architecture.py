"""The package's shape (docs/ARCHITECTURE.md): imports only point down, and there is no circle.

Every module has a level; a module may import modules of its own level or below, never above.
Imports inside functions count too (a lazy import is still a dependency of the design), read with
`ast` as ../shared/tools/import_cycles.py reads them. A failure names the importing module, the
imported one and both levels.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "cnnlab"

# Lowest first. A module's level is that of the longest prefix listed here.
LEVELS = [
    # 0 foundation: no knowledge of models, data or runs
    ["cnnlab.errors", "cnnlab.files", "cnnlab.runtime", "cnnlab.formatting"],
    # 1 the checkpoint format (safetensors + JSON), packaged pretrained weights converted to it
    ["cnnlab.checkpoint", "cnnlab.pretrained"],
    # 2 the layer registry and the tables of named things
    ["cnnlab.layers", "cnnlab.presets", "cnnlab.data.catalog"],
    # 3 configuration
    ["cnnlab.config"],
    # 4 data
    ["cnnlab.data"],
    # 5 the opened run, evaluation, the optimiser and the step guard, fine-tuning's start, recipes fitted to data
    ["cnnlab.runs", "cnnlab.evaluate", "cnnlab.optim", "cnnlab.guard", "cnnlab.finetune", "cnnlab.tensorboard_log",
     "cnnlab.recipes", "cnnlab.sync_batchnorm", "cnnlab.feature_cache"],
    # 6 training
    ["cnnlab.training"],
    # 7 features built on trained runs
    ["cnnlab.predict", "cnnlab.explain", "cnnlab.faithfulness", "cnnlab.export", "cnnlab.lr_range", "cnnlab.tuning",
     "cnnlab.report", "cnnlab.visualize", "cnnlab.summarize", "cnnlab.module_summary", "cnnlab.comparison",
     "cnnlab.network_view"],
    # 8 interfaces: the command line, the Python API, the server, notebook display
    ["cnnlab.cli", "cnnlab.commands", "cnnlab.api", "cnnlab.serve", "cnnlab.display", "cnnlab.__main__", "cnnlab"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def level(name: str) -> int:
    best, found = -1, None
    for number, prefixes in enumerate(LEVELS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), number
    if found is None:
        raise AssertionError(f"{name} has no level in tests/test_architecture.py LEVELS (and docs/ARCHITECTURE.md)")
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    name = module_name(path)
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def test_every_module_has_a_level():
    for name in graph():
        level(name)


def test_imports_only_point_down():
    upward = [f"{a} (level {level(a)}) imports {b} (level {level(b)})"
              for a, targets in sorted(graph().items()) for b in sorted(targets) if level(b) > level(a)]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circle = path[path.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_checker_finds_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    """The checks above can fail: a made-up package with both faults is caught."""
    package = tmp_path / "cnnlab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("from .training import fit\n")      # level 0 -> 6
    (package / "training.py").write_text("from .errors import CnnlabError\n")  # and back: a circle
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    with pytest.raises(AssertionError, match=r"cnnlab.errors \(level 0\) imports cnnlab.training \(level 6\)"):
        test_imports_only_point_down()
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_import_circle()
