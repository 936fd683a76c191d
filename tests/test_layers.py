"""Imports point down the layers of DESIGN.md (with ``jaxdec/loop.py``, the pure
stepping core, below the algorithms). Every ``import`` statement is checked,
including the ones deferred into function bodies."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxdec"

# Low to high. A module may import modules of its own layer or lower ones.
LAYERS = [
    {"types", "tree"},
    {"topology"},
    {"gossip"},
    {
        "data",
        "models",
        "metrics",
        "prox",
        "clustering",
        "lowrank",
        "participation",
        "merge",
        "loop",
        "checkpoint",
        "plotting",
    },
    {"hyper", "sharding"},
    {"algorithms"},
    {"run"},
    {"cli", "launch", "__init__"},
]
# Deliberate upward imports, each deferred to call time, with the reason.
ALLOWED = {
    # jd.topology.parametrized_mixing is a convenience alias of the learnable
    # mixing matrix of jd.hyper, imported on first call (topology stays NumPy-only).
    ("topology", "hyper"),
}
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(path: Path) -> str:
    """``jaxdec/algorithms/dsgd.py`` -> ``algorithms``; ``jaxdec/run.py`` -> ``run``."""
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "jaxdec":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from jaxdec import a, b
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "jaxdec" and len(parts) > 1:
                    out.add(parts[1])
    return out


MODULES = sorted(p for p in ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = {_unit(p) for p in MODULES} - set(RANK)
    assert not missing, f"add {missing} to LAYERS (and to DESIGN's layer diagram)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    me = _unit(path)
    bad = [
        dep
        for dep in _imported_units(ast.parse(path.read_text()))
        if dep in RANK and RANK[dep] > RANK[me] and (me, dep) not in ALLOWED
    ]
    assert not bad, f"{path.name} ({me}) imports higher layers {bad}"


def test_the_checker_catches_an_upward_import():
    src = "def f():\n    from jaxdec.run import run\n"
    assert "run" in _imported_units(ast.parse(src))
    assert RANK["run"] > RANK["algorithms"]
