"""The layers of docs/architecture.md, enforced: every import in honellm/ points down, and no imports go in a circle.

Each module's imports are read with `ast` (nothing is imported). Imports inside functions count like the others,
unless the line (or the line above it) carries a comment saying it is there for start-up time
("# start-up time: ..."): those are deferred on purpose and still must point down, but they cannot make a circle
at import time. Imports under `if TYPE_CHECKING:` never run and are left out.

A module's layer is the longest entry of LAYERS that is its name or a package above it. The table is the one in
docs/architecture.md; change both together.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "honellm"

# From the top down. An import may go to its own layer or to any layer below, never up.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("honellm.cli", "honellm.ui", "honellm.__main__", "honellm.testing")),
    ("applications", ("honellm.compare", "honellm.serve", "honellm.export", "honellm.export_gguf")),
    ("methods", ("honellm.methods", "honellm.prompting", "honellm.tuning", "honellm.reward", "honellm.search")),
    ("evaluator", ("honellm.evaluation.evaluate",)),
    ("runtime", ("honellm.runtime",)),
    ("shared parts", ("honellm.evaluation", "honellm.generation", "honellm.training", "honellm.reward.functions",
                      "honellm.reward.reward_model")),
    ("model core", ("honellm.core", "honellm.native", "honellm.training.fastpath", "honellm.training.fused",
                    "honellm.generation.runners")),
    ("foundation", ("honellm",)),  # task, data/, config, artifact, program, errors, models, ...
]
RANK = {name: len(LAYERS) - i for i, (name, _) in enumerate(LAYERS)}
START_UP = "start-up time"


def layer_of(module: str) -> str:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    assert best is not None, module
    return best


@dataclass(frozen=True)
class Import:
    source: str       # the importing module
    target: str       # the imported module (a file of honellm/)
    path: Path
    line: int
    deferred: bool    # inside a function, marked as there for start-up time

    def where(self) -> str:
        return f"{self.path.relative_to(PACKAGE.parent)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of honellm/ that `name` is, or the closest package above it (a name imported from it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _deferred_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    lines.add(child.lineno)
    return lines


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    text = path.read_text()
    source_lines = text.splitlines()
    tree = ast.parse(text)
    skipped = _type_checking_lines(tree)
    in_function = _deferred_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from honellm.x import y`: y is a module of honellm.x, or a name defined in honellm.x
            names = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        comment = " ".join(source_lines[max(node.lineno - 2, 0): node.end_lineno or node.lineno])
        deferred = node.lineno in in_function and START_UP in comment
        for name in names:
            if not (name == "honellm" or name.startswith("honellm.")):
                continue
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.append(Import(module, target, path, node.lineno, deferred))
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


@functools.cache
def import_graph() -> tuple[Import, ...]:
    modules = all_modules()
    return tuple(imp for module, path in modules.items() for imp in imports_of(module, path, modules))


def upward_imports(graph) -> list[str]:
    return [f"{imp.where()}: {imp.source} ({layer_of(imp.source)}) imports {imp.target} ({layer_of(imp.target)})"
            for imp in graph if RANK[layer_of(imp.target)] > RANK[layer_of(imp.source)]]


def import_circles(graph) -> list[list[Import]]:
    """Each strongly connected group of modules (Tarjan), as the imports that join it."""
    edges: dict[str, list[Import]] = {}
    for imp in graph:
        if not imp.deferred:
            edges.setdefault(imp.source, []).append(imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the number of modules (~150)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for imp in edges.get(node, []):
            if imp.target not in index:
                visit(imp.target)
                low[node] = min(low[node], low[imp.target])
            elif imp.target in on_stack:
                low[node] = min(low[node], index[imp.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in list(edges):
        if node not in index:
            visit(node)
    return [[imp for imp in graph if not imp.deferred and imp.source in g and imp.target in g] for g in groups]


def test_every_module_has_a_layer():
    for module in all_modules():
        assert layer_of(module) in RANK


def test_imports_point_down():
    upward = upward_imports(import_graph())
    assert not upward, "imports that point up a layer (see docs/architecture.md):\n" + "\n".join(upward)


def test_no_import_circles():
    circles = import_circles(import_graph())
    report = "\n\n".join("\n".join(f"{imp.where()}: {imp.source} -> {imp.target}" for imp in circle)
                         for circle in circles)
    assert not circles, f"import circles (each block is one circle, by its imports):\n{report}"


def test_the_checker_sees_upward_imports_and_circles(tmp_path):
    """The checks themselves: a made-up upward import and a two-module circle are both found."""
    graph = [Import("honellm.task", "honellm.evaluation.metrics", PACKAGE / "task.py", 3, False),
             Import("honellm.runtime.a", "honellm.runtime.b", PACKAGE / "runtime" / "a.py", 1, False),
             Import("honellm.runtime.b", "honellm.runtime.a", PACKAGE / "runtime" / "b.py", 2, False)]
    assert upward_imports(graph) == ["honellm/task.py:3: honellm.task (foundation) imports "
                                     "honellm.evaluation.metrics (shared parts)"]
    assert [len(c) for c in import_circles(graph)] == [2]
    graph[2] = Import("honellm.runtime.b", "honellm.runtime.a", PACKAGE / "runtime" / "b.py", 2, True)
    assert import_circles(graph) == []


def test_deferred_imports_need_the_start_up_comment(tmp_path):
    module = tmp_path / "honellm_mod.py"
    module.write_text("def f():\n    # start-up time: torch loads only when used\n    import honellm.models\n\n"
                      "def g():\n    import honellm.task\n")
    modules = {"honellm.models": module, "honellm.task": module, "honellm.x": module}
    found = imports_of("honellm.x", module, modules)
    assert [(i.target, i.deferred) for i in found] == [("honellm.models", True), ("honellm.task", False)]


def test_the_method_table_and_the_cli_load_without_transformers():
    """`hone`'s method lookups and user errors come before any model: they must not pay for importing transformers
    (with the torch modules it pulls in, ~3.5 s of the ~6 s such an error took on 2 cores); it loads with the first
    model."""
    import os
    import subprocess
    import sys

    code = ("import sys, honellm.cli.app, honellm.methods.catalog; "
            "print(sorted(m for m in ('transformers', 'peft', 'trl', 'accelerate') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
