"""The import direction of the packages (docs/architecture.md), no import cycle, and a light spmd.config.

spmd's sub-packages form layers: a module may import its own sub-package and the layers below it, never
one above. traces/, validation/ and docs/ import spmd; spmd never imports them. Lazy imports (inside
functions) count like the others; only imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LAYERS = ("config", "plan", "kernels", "obs", "parallel", "weights", "model", "engines", "runtime")
TOP = len(LAYERS)  # spmd/__init__.py and spmd/__main__.py sit above every layer
OUTSIDE = ("traces", "validation", "docs", "tests", "conftest")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (from X import name: X, or X.name when it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    skip, me = _type_checking_lines(tree), module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if _is_module(sub) else base)
    return found


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


def _files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_spmd_never_imports_the_tools_around_it():
    bad = [f"{module_name(p)} imports {n}" for p in _files("spmd") for n in imports(p)
           if n.split(".")[0] in OUTSIDE]
    assert not bad, "\n".join(bad)


def test_layers_import_only_downwards():
    bad = []
    for p in _files("spmd"):
        me = module_name(p)
        for n in imports(p):
            if n.startswith("spmd.") and layer(n) > layer(me):
                bad.append(f"{me} ({LAYERS[layer(me)] if layer(me) < TOP else 'top'}) imports {n}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {module_name(p): {n for n in imports(p) if n.startswith("spmd")} for p in _files("spmd")}
    cycles = _cycles(graph)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a module importing itself)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_checker_sees_a_wrong_direction(tmp_path):
    """The checks above would fail on an upward import and on a cycle (not vacuous)."""
    assert layer("spmd.runtime.world") > layer("spmd.model.moe") > layer("spmd.config.cli")
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert "spmd.config.errors" in imports(ROOT / "spmd" / "config" / "cli.py")
    assert "spmd.runtime.world" in imports(ROOT / "spmd" / "runtime" / "run.py")


def test_config_imports_neither_torch_nor_mpi4py():
    code = "import sys, spmd.config; print(sorted(m for m in ('torch', 'mpi4py', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_spmd_variables_are_read_in_config_env_only():
    """Every SPMD_* name spmd/ mentions is one of spmd.config.env.VARIABLES, and only that module reads the
    environment for one (others call env.read)."""
    from spmd.config.env import VARIABLES

    unknown, direct = [], []
    for p in _files("spmd"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"SPMD_[A-Z0-9_]+", node.value) and node.value not in VARIABLES:
                unknown.append(f"{module_name(p)}: {node.value}")
            if isinstance(node, ast.Call) and p.name != "env.py" and _reads_environ(node):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("SPMD_") or \
                        isinstance(arg, ast.Name) and arg.id.endswith("_ENV"):
                    direct.append(f"{module_name(p)}:{node.lineno}")
    assert not unknown and not direct, (unknown, direct)


def _reads_environ(call: ast.Call) -> bool:
    text = ast.unparse(call.func)
    return text.endswith("environ.get") or text in ("os.getenv", "getenv")
