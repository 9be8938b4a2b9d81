"""The layers of docs/architecture.md, read from the source: imports point one way (down), and
nothing below ``cxr/`` starts Ray. Every import counts, the lazy ones inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each layer may import besides itself and third-party packages (docs/architecture.md, "Layers").
ALLOWED = {
    "pipelines": set(),
    "validation": {"pipelines"},
    "trainers": {"pipelines"},
    "tuning": {"pipelines", "trainers"},
    "evaluation": {"pipelines", "validation", "trainers"},
    "cxr": {"pipelines", "validation", "trainers", "tuning", "evaluation"},
}
PROJECT = {*ALLOWED, "benchmarks", "tests"}


def _sources(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    upward = [f"{path.relative_to(ROOT)}:{line} imports {top}"
              for path in _sources(layer) for line, top in _imports(path)
              if top in PROJECT and top != layer and top not in ALLOWED[layer]]
    assert not upward, f"{layer}/ may import only {sorted(ALLOWED[layer]) or 'nothing of the project'}: " + "; ".join(upward)


def test_the_rule_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from trainers.checkpoint import load_checkpoint\n")
    assert _imports(bad) == [(2, "trainers")]


@pytest.mark.parametrize("layer", sorted(set(ALLOWED) - {"cxr"}))
def test_library_code_never_starts_ray(layer):
    calls = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for path in _sources(layer)
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"]
    assert not calls, f"ray.init() below cxr/ (the caller connects; library code runs on whatever cluster that is): {calls}"
