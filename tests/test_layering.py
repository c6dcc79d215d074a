"""The package's layers, read from its import statements (ast): the library never imports the console commands
(vqgan/cli), and no two vqgan modules import each other. Also: every module imports, and neither the library
nor `vqgan.__all__` reaches a deprecated name (vqgan.export's moved names warn; tests/test_export.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vqgan"

# Cycles known and left to their owners, each with why it is still here. Anything else is a new cycle.
KNOWN_CYCLES = {
    # PRESETS / preset() stay importable from vqgan.autoencoder through a lazy (PEP 562) re-export
    frozenset({"vqgan.autoencoder", "vqgan.presets"}),
}


def module_files() -> dict[str, tuple[Path, bool]]:
    """Module name -> (its file, whether it is a package's __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


MODULES = module_files()


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported_modules(name: str) -> set[str]:
    """The vqgan modules `name` imports anywhere in its file (inside functions too; not under TYPE_CHECKING).

    `from vqgan import train` and `from vqgan.data import shards` count as importing the submodule only. The
    implicit import of a module's parent package is not counted: Python runs a package's __init__ before its
    modules without that being a cycle.
    """
    path, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):  # never executed: static analysers only
                for statement in child.orelse:
                    visit(statement)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from . import x / from ..y import z
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:  # a submodule by name, or a name defined in `base`
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return {module for module in found if module in MODULES and module != name}


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_reader_sees_the_import_forms_the_package_uses():
    graph = import_graph()
    assert "vqgan.train" in graph["vqgan.cli.train"]  # `from vqgan import train`, inside main()
    assert "vqgan.metrics.fid_run" in graph["vqgan.probe"]  # `from vqgan.metrics import fid_run`, inside a function
    assert "vqgan.errors" in graph["vqgan.data.make_shards"]  # function-level `from vqgan.errors import ...`
    assert "vqgan.prior.tokenize" in graph["vqgan.train_prior"]
    assert "vqgan.export" not in graph["vqgan"]  # vqgan/__init__'s TYPE_CHECKING imports never run
    assert "vqgan.data.shards" in graph["vqgan.data.sources"] and "vqgan.data" not in graph["vqgan.data.sources"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_library_never_imports_the_console_commands():
    offenders = {name: sorted(m for m in imports if m == "vqgan.cli" or m.startswith("vqgan.cli."))
                 for name, imports in import_graph().items() if not name.startswith("vqgan.cli")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_import_cycles_among_vqgan_modules():
    found = set(cycles(import_graph()))
    assert found - KNOWN_CYCLES == set(), f"new import cycles: {[sorted(c) for c in found - KNOWN_CYCLES]}"
    for pair in (("vqgan.cli.train", "vqgan.train"), ("vqgan.cli.train_prior", "vqgan.train_prior"),
                 ("vqgan.export", "vqgan.onnx_export"), ("vqgan.prior.generate", "vqgan.train_utils")):
        assert not any(set(pair) <= component for component in found), pair


def test_image_io_sits_below_training_and_sampling():
    graph = import_graph()
    assert "vqgan.image_io" in graph["vqgan.prior.generate"] and "vqgan.image_io" in graph["vqgan.train_utils"]
    assert "vqgan.train_utils" not in graph["vqgan.prior.generate"]
    assert graph["vqgan.image_io"] <= {"vqgan.utils"}  # nothing of training, sampling or the models


EVERY_MODULE = """
import importlib, json, pkgutil, warnings
import vqgan
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    names = [m.name for m in pkgutil.walk_packages(vqgan.__path__, "vqgan.")]
    for name in names:
        importlib.import_module(name)
    public = {name: type(getattr(vqgan, name)).__name__ for name in vqgan.__all__}
ours = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning) and "vqgan" in str(w.message)]
print(json.dumps({"modules": names, "public": sorted(public), "warnings": ours}))
"""


def test_every_module_imports_and_the_library_uses_no_deprecated_name():
    result = subprocess.run([sys.executable, "-c", EVERY_MODULE], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert set(report["modules"]) == set(MODULES) - {"vqgan"}  # every file under vqgan/ is a module that imports
    import vqgan

    assert report["public"] == sorted(vqgan.__all__)
    assert report["warnings"] == []
