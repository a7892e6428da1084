"""The layout of the package (docs/architecture.md) held against the code, from the source alone (``ast``):
imports point one way (no import circle, lazy imports inside functions included), the leaves of ``ops``
import nothing of ``ops`` above them, ``ops`` never imports the model-level code, every module is short
enough to read in one sitting and every folder says what lives there.

    python -m pytest tests/test_layout.py -q      # prints the circle / the offending import when it fails
"""
import ast
import os

import pytest

PKG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ebkernels")
MAX_LINES = 400
OPS_LEAVES = {"ebkernels.ops._launch", "ebkernels.ops._dispatch", "ebkernels.ops._tl", "ebkernels.ops._buffers", "ebkernels.ops._reduce",
              "ebkernels.ops._scale"}
# what ops may import from outside ops: the top-level leaves
OPS_MAY_IMPORT = {"ebkernels._backend", "ebkernels._checks", "ebkernels._registry", "ebkernels._rng",
                  "ebkernels._triton", "ebkernels.config"}


def _modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(PKG_DIR):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(PKG_DIR))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


MODULES = _modules()
NATIVE = {"ebkernels._C"}  # the compiled extension (csrc/): no Python imports of its own


def _imports(name: str, path: str) -> set:
    """The package modules ``name`` imports, anywhere in the file (module level or inside a function)."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ebkernels"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "ebkernels":
                continue
            names = [a.name for a in node.names if f"{mod}.{a.name}" not in NATIVE]
            subs = {f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES}
            if names and len(subs) < len(names):
                found.add(mod)  # a name the package (face) defines or re-exports
            found |= subs
    # an import of a.b.c loads a and a.b too, but those package faces only hand names on: count the module
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    # the top-level face (ebkernels/__init__.py) re-exports the public API: nothing inside imports it
    importers = sorted(n for n, deps in GRAPH.items() if "ebkernels" in deps)
    assert not importers, f"modules importing the package face `ebkernels` (import the module itself): {importers}"
    cycles = _cycles(GRAPH)
    assert not cycles, "import circles (lazy imports included):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("leaf", sorted(OPS_LEAVES))
def test_ops_leaves_import_no_op(leaf):
    bad = sorted(m for m in GRAPH[leaf] if m.startswith("ebkernels.ops") and m not in OPS_LEAVES)
    outside = sorted(m for m in GRAPH[leaf] if not m.startswith("ebkernels.ops") and m not in OPS_MAY_IMPORT)
    assert not bad and not outside, f"{leaf} imports {bad + outside}: a leaf imports only other leaves"


def test_ops_import_only_down():
    for name, deps in GRAPH.items():
        if name.startswith("ebkernels.ops"):
            up = sorted(m for m in deps if not m.startswith("ebkernels.ops") and m not in OPS_MAY_IMPORT)
            assert not up, f"{name} imports {up}: ops use only the top-level leaves {sorted(OPS_MAY_IMPORT)}"
        if name.startswith("ebkernels.ops.gemm"):
            assert not any(m.startswith("ebkernels.ops.fused") for m in deps), f"{name}: gemm must not import fused"


def test_modules_fit_one_sitting():
    long = {n: sum(1 for _ in open(p)) for n, p in MODULES.items()}
    long = {n: k for n, k in long.items() if k > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split by responsibility): {long}"


def test_every_folder_says_what_lives_there():
    for name, path in MODULES.items():
        if path.endswith("__init__.py"):
            doc = ast.get_docstring(ast.parse(open(path).read()))
            assert doc and len(doc.split()) >= 12, f"{path}: a one-paragraph docstring saying what lives here"
