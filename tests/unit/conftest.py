"""Fixtures of the cluster tests (test_manifests.py, test_chain.py): the KubeRay CRDs as strict
validators, and cluster/kuberay rendered through its kustomization the way `kubectl apply -k` renders it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
CRDS = REPO.parent / "shared" / "kuberay"
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


def close_schema(schema):
    """A copy of an OpenAPI schema in which every object listing its properties admits no others."""
    if isinstance(schema, dict):
        out = {k: close_schema(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [close_schema(v) for v in schema]
    return schema


@pytest.fixture(scope="session")
def validators():
    """kind -> a strict validator of the whole object (loading the three CRDs takes seconds: once)."""
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs {CRDS} are absent (expected ../shared/kuberay beside the repo)")
    out = {}
    for kind, plural in KINDS.items():
        crd = yaml.load((CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=yaml.CSafeLoader)  # 3 MB: C parser
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft7Validator(close_schema(v1["schema"]["openAPIV3Schema"]))
    return out


@pytest.fixture(scope="session")
def rendered() -> list[dict]:
    """Every object of cluster/kuberay after its kustomization (kubectl's built-in kustomize, offline)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is absent: cluster/kuberay is rendered with `kubectl kustomize` (the machine image ships it)")
    out = subprocess.run([kubectl, "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize cluster/kuberay failed: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]



@pytest.fixture(scope="session")
def settings(rendered) -> dict[str, str]:
    """The icl-router-settings ConfigMap's data: the environment every Ray container gets (envFrom)."""
    (cm,) = [d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "icl-router-settings"]
    return dict(cm["data"])
