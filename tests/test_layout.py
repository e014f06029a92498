"""The package's layout rules, read from the code's import statements (see ``wand/__init__``).

Every import counts, also those inside functions (a lazy import is still an arrow); imports
under ``if TYPE_CHECKING:`` count for the side rules and cycles but never run, so they do not
count for what a process loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import ROOT

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "numpy", "safetensors")
FILLING = ("wand.load.cpu", "wand.load.gpu", "wand.load.tensorfile", "wand.common.views")
# (importer, imported) → why the rules allow it
EXCEPTIONS = {
    ("wand.tools.chaos.files", "wanctl.cli"): "the chaos suite's files phase runs `wanctl load` "
    "itself, in processes forked from its pre-imported fork server",
    ("wand.tools.chaos.preload", "wanctl.cli"): "the fork server imports the CLI once, so that "
    "each forked `wanctl load` starts in milliseconds",
}


@cache
def modules() -> dict[str, Path]:
    """Dotted name → file of every module of wand and wanctl."""
    found = {}
    for top in ("wand", "wanctl"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _target(name: str) -> str | None:
    """The module of ours that an imported dotted name is, or lies in."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


class _Imports(ast.NodeVisitor):
    """(imported name, at module level and executed, type-checking only) per import."""

    def __init__(self) -> None:
        self.found: list[tuple[str, bool, bool]] = []
        self._depth = 0  # inside functions
        self._typing = 0  # inside `if TYPE_CHECKING:`

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        typing = isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        self._typing += typing
        for child in node.body:
            self.visit(child)
        self._typing -= typing
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        assert node.level == 0, "relative imports are not used here"
        for alias in node.names:
            self._add(f"{node.module}.{alias.name}", fallback=node.module)

    def _add(self, name: str, fallback: str | None = None) -> None:
        top = self._depth == 0 and not self._typing
        if (
            fallback is not None
            and _target(name) is None
            and not name.startswith(("wand", "wanctl"))
        ):
            name = fallback  # from torch import nn → torch
        self.found.append((name, top, bool(self._typing)))


@cache
def imports(module: str) -> tuple[tuple[str, bool, bool], ...]:
    visitor = _Imports()
    visitor.visit(ast.parse(modules()[module].read_text()))
    return tuple(visitor.found)


def arrows(module: str, top_only: bool = False) -> set[str]:
    """The modules of ours ``module`` imports (only those run at import time: ``top_only``)."""
    out = set()
    for name, top, _ in imports(module):
        target = _target(name)
        if target is not None and target != module and (top or not top_only):
            out.add(target)
    return out


def closure(start: str, top_only: bool = False) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in arrows(todo.pop(), top_only) - seen:
            seen.add(m)
            todo.append(m)
    return seen


def side(module: str) -> str:
    """``wanctl``, a folder of ``wand`` (``daemon``, ``client``…), or ``wand`` for the
    package's own modules (its face: ``wand``, ``wand.run``)."""
    parts = module.split(".")
    if parts[0] == "wanctl":
        return "wanctl"
    folder = len(parts) > 1 and (ROOT / "wand" / parts[1]).is_dir()
    return parts[1] if folder else "wand"


def _in(module: str, *sides: str) -> bool:
    return side(module) in sides


# side → the sides its modules may import (besides their own); the README's "Code layout"
ALLOWED = {
    "common": set(),
    "slabs": {"common"},
    "load": {"common", "slabs"},
    "wan": {"common", "load"},
    "daemon": {"common", "slabs", "load", "wan"},
    "client": {"common", "slabs", "load", "wan"},
    "tools": {"common", "slabs", "load", "wan", "daemon", "client", "wand", "wanctl"},
    "wanctl": {"common", "slabs", "load", "wan", "daemon", "client", "tools", "wand"},
    "wand": {"common", "client"},  # the package's face: the client API, imported lazily
}


def test_each_side_imports_only_what_its_folder_allows():
    bad = [
        f"{m} → {c}"
        for m in modules()
        for c in arrows(m)
        if side(c) != side(m) and side(c) not in ALLOWED[side(m)]
    ]
    assert not bad, bad


def test_the_daemon_never_imports_the_client():
    bad = {(m, c) for m in modules() if _in(m, "daemon") for c in closure(m) if _in(c, "client")}
    assert not bad, f"daemon modules reach the client library: {sorted(bad)}"


def test_slabs_and_common_import_neither_load_daemon_nor_client():
    bad = {
        (m, c)
        for m in modules()
        if _in(m, "slabs", "common")
        for c in closure(m)
        if _in(c, "load", "daemon", "client", "tools", "wan", "wanctl")
    }
    assert not bad, f"{sorted(bad)}"


def test_the_library_imports_neither_wanctl_nor_the_tools():
    bad = [
        (m, c)
        for m in modules()
        if m.startswith("wand")
        for c in arrows(m)
        if (_in(c, "wanctl") or (_in(c, "tools") and not _in(m, "tools")))
        and (m, c) not in EXCEPTIONS
    ]
    assert not bad, f"{bad}"


def test_no_cycles():
    """Tarjan's strongly connected components of the import graph: all of size one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in arrows(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while (n := stack.pop()) != m:
                component.append(n)
            if component:
                cycles.append(sorted([m, *component]))

    for m in modules():
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_the_daemon_entry_point_imports_nothing_heavy():
    """What ``wand`` loads before it reads a checkpoint: no torch, no model library, no
    client, no loader. (They come with ``wand.load``'s fill paths and ``wand.wan``, which
    the daemon imports only when it must really read a checkpoint.)"""
    loaded = {"wand.daemon.main", *closure("wand.daemon.main", top_only=True)}
    assert not [m for m in loaded if _in(m, "client", "wan", "tools", "wanctl")]
    assert not loaded & set(FILLING)
    heavy = {
        (m, name.split(".")[0])
        for m in loaded
        for name, top, _ in imports(m)
        if top and name.split(".")[0] in HEAVY
    }
    assert not heavy, f"imported when the daemon starts: {sorted(heavy)}"


@pytest.mark.parametrize(
    "module, forbidden",
    [("wand.daemon.main", ("wand.client",)), ("wanctl.cli", ()), ("wand", ("wand.client",))],
)
def test_what_a_fresh_process_loads(module, forbidden):
    """The same, as Python sees it: importing the daemon, wanctl (``status``, ``ls``, ``run``…)
    or the ``wand`` package loads none of the heavy libraries and no fill path."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    heavy = sorted({m.split(".")[0] for m in out} & set(HEAVY))
    ours = [m for m in out if m.startswith(("wand.wan", *FILLING, *forbidden))]
    assert not heavy and not ours, (heavy, ours)
