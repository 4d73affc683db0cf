"""Light modules never import heavy frameworks (checked in a fresh interpreter)."""

import subprocess
import sys

import pytest

LIGHT = ["icl_router.config", "icl_router.schemas", "icl_router.model", "icl_router.routing.policy", "icl_router.graders", "icl_router.cli"]
HEAVY = ["ray", "deepspeed", "vllm"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_module_imports_no_heavy_framework(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if "ModuleNotFoundError" in out.stderr and module.split(".")[-1] in out.stderr:
        pytest.fail(f"{module} does not exist yet: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"
