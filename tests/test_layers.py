"""The package's layers run one way: each package imports only packages below it (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import tmpdiff

# Bottom to top; a module may import its own package and any package to its left.
LAYERS = ("formats", "models", "engines", "export", "runtime", "eval", "calibration", "commands", "cli")
ROOT = Path(tmpdiff.__file__).parent


def _imports() -> list[tuple[str, str, int]]:
    """(importing module, imported tmpdiff module, line) for every import in the package, lazy ones included."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            edges += [(module, name, node.lineno) for name in names if name == "tmpdiff" or name.startswith("tmpdiff.")]
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_belongs_to_a_layer():
    stray = sorted({m for m, _, _ in _imports() if _layer(m) not in LAYERS and not m.endswith("__init__")})
    assert not stray, f"modules outside the layers: {stray}"


def test_no_import_goes_up_or_sideways_into_the_package_root():
    upward = [f"{m}:{line} imports {target}" for m, target, line in _imports()
              if _layer(target) not in LAYERS or LAYERS.index(_layer(target)) > LAYERS.index(_layer(m))]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_formats_needs_neither_torch_nor_a_stage():
    heavy = {"torch", "onnx", "onnxruntime", "diffusers", "modelopt", "tensorrt"}
    found = []
    for path in sorted((ROOT / "formats").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in heavy]
    assert not found, found


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule above is not vacuous: an engines module importing the runtime is caught."""
    edges = [("tmpdiff.engines.x", "tmpdiff.runtime.runner", 1), ("tmpdiff.runtime.y", "tmpdiff.engines.base", 1)]
    upward = [e for e in edges if LAYERS.index(_layer(e[1])) > LAYERS.index(_layer(e[0]))]
    assert upward == [edges[0]]


def test_no_import_cycle_between_modules():
    """Lazy imports included: no module reaches itself through the package's imports (e.g. engines.base <-> trt)."""
    modules = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for source, target, _ in _imports():
        source = source.removesuffix(".__init__")
        if target in modules and target != source:
            graph[source].add(target)
    cycles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt], done)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module], done)
    assert not cycles, cycles[:3]
