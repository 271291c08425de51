"""The three wings' rules (docs/architecture.md), read from the source with ``ast``:

* ``pisa_kernels`` (the library) imports the standard library, torch, triton and the pack's own
  declared requirements (requirements.txt: safetensors for the capture files), nothing of the
  project's other packages, never ComfyUI;
* ``pisa_comfy`` (the glue) never imports the lab, ``pisa_lab``;
* no import cycle between the project's modules (lazy imports inside functions included);
* no script or lab module assigns to an attribute of a library module: a kernel variant or limit
  is an argument of a function, never a module switch flipped from outside.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pisa_kernels", "pisa_comfy", "pisa_lab")


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the three packages and ``nodes``."""
    out = {"nodes": ROOT / "nodes.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Absolute dotted names imported by a module (relative ones resolved; a relative import that
    climbs above the packages, as ``..pisa_kernels`` from ``pisa_comfy``, names the sibling), with
    their line numbers."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, path).split(".")
                base = base[:len(base) - (node.level - 1)] if node.level - 1 <= len(base) else []
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            out += [(f"{mod}.{a.name}" if mod else a.name, node.lineno) for a in node.names]
    return [(m, ln) for m, ln in out if m]


def _project_target(mod: str) -> str | None:
    """The project module an import refers to (longest known prefix), or None."""
    parts = mod.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


def test_the_scan_sees_the_project():
    assert {"pisa_kernels.api", "pisa_comfy.dispatch", "pisa_lab.bench", "pisa_lab.e2e.cli"} <= set(MODULES)
    # pisa_comfy reaches the library relatively (``from ..pisa_kernels import ...``): resolved to it
    assert "pisa_kernels.errors" in {_project_target(m) for m, _ in
                                     _imports("pisa_comfy.library", MODULES["pisa_comfy.library"])}


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith("pisa_kernels")])
def test_library_imports_only_torch_triton_and_requirements(name):
    declared = {line.split("#")[0].strip().split("=")[0].split("<")[0].split(">")[0].strip()
                for line in (ROOT / "requirements.txt").read_text().splitlines()} - {""}
    allowed = {"torch", "triton", "pisa_kernels"} | declared | set(sys.stdlib_module_names)
    bad = [(m, ln) for m, ln in _imports(name, MODULES[name]) if m.split(".")[0] not in allowed]
    assert not bad, f"{name} imports {bad}: the library may import the standard library, torch, triton and " \
                    f"requirements.txt ({sorted(declared)}) only"


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith("pisa_comfy") or m == "nodes"])
def test_glue_never_imports_the_lab(name):
    bad = [(m, ln) for m, ln in _imports(name, MODULES[name]) if m.split(".")[0] == "pisa_lab"]
    assert not bad, f"{name} imports the lab: {bad}"


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = {_project_target(m) for m, _ in _imports(name, path)} - {None, name}
        # a package's own __init__ importing its submodules is how packages export: not a cycle
        graph[name] = {d for d in deps if not (name == _package_of(d, MODULES[d]) or d.startswith(name + "."))}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _library_aliases(tree: ast.AST) -> set[str]:
    """Local names bound to a library module (``from pisa_kernels import api``, ``import ... as tk``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pisa_kernels"):
            names |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name.startswith("pisa_kernels")}
    return names


def _module_switches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    aliases = _library_aliases(tree)
    hits = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id in aliases:
                    hits.append(f"{path.name}:{node.lineno} {el.value.id}.{el.attr}")
    return hits


def test_no_tool_flips_a_library_switch():
    files = sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "pisa_lab").rglob("*.py"))
    hits = [h for f in files for h in _module_switches(f)]
    assert not hits, f"module attributes of the library assigned from outside: {hits}"


def test_switch_finder_finds_one(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("from pisa_kernels import triton_kernels as tk\nfrom pisa_kernels import api\n"
                 "import pisa_kernels.routing as r\nfrom pisa_kernels.limits import BLOCK_SIZES\n"
                 "tk.USE_TMA, tk.GROUP = False, 2\napi.X += 1\nr.Y = 0\nBLOCK_SIZES.z = 1\n")
    assert sorted(h.split(" ")[1] for h in _module_switches(f)) == ["api.X", "r.Y", "tk.GROUP", "tk.USE_TMA"]
