"""Light modules never import heavy frameworks (checked in a fresh interpreter per module)."""

import subprocess
import sys

import pytest

LIGHT = [
    "icl_router.config",
    "icl_router.kinds",
    "icl_router.schemas",
    "icl_router.data.embedder",
    "icl_router.data.embed",
    "icl_router.data.generate",
    "icl_router.model",
    "icl_router.model.router",
    "icl_router.model.tiny",
    "icl_router.train.steps",
    "icl_router.routing.policy",
    "icl_router.routing.decision",
    "icl_router.routing.online",
    "icl_router.routing.marginal",
    "icl_router.graders",
    "icl_router.serving.decision_log",
    "icl_router.routing.evidence_store",
    "icl_router.cli",
]
HEAVY = ("ray", "deepspeed", "vllm")
NO_TORCH = ["icl_router.serving.decision_log", "icl_router.routing.evidence_store", "icl_router.graders", "icl_router.config", "icl_router.kinds", "icl_router.routing.decision"]  # not even torch


def heavy_imported(module: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The ``heavy`` modules in sys.modules after importing ``module`` alone; a failing import fails the test."""
    code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"importing {module} failed:\n{out.stderr[-2000:]}"
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize("module", LIGHT)
def test_light_module_imports_no_heavy_framework(module):
    heavy = (*HEAVY, "torch") if module in NO_TORCH else HEAVY
    assert heavy_imported(module, heavy) == [], f"{module} imports a heavy framework"


def test_the_check_sees_a_heavy_import():
    assert heavy_imported("ray") == ["ray"]  # the probe itself works: a light module importing ray would fail


def test_config_imports_only_kinds_and_errors_from_the_package():
    """config.py is a leaf: its module-level imports inside the package are kinds and errors (a
    config's ``build()`` imports what it builds, when called)."""
    import ast
    from pathlib import Path

    import icl_router.config as config

    tree = ast.parse(Path(config.__file__).read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("icl_router")}
    top |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names if a.name.startswith("icl_router")}
    assert top <= {"icl_router.kinds", "icl_router.errors"}, top
