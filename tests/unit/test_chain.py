"""The deployment chain, checked the way a reviewer reads it: cluster/kuberay rendered through its
kustomization, each RayJob's entrypoint and the RayService's app args expanded with the environment
their pods get, and the configs they name loaded. Links:

- stage 1 -> stage 2 -> the service: stage 1's output is stage 2's init_from, stage 2's output is the
  router the service loads (and the one `value` reads); every job reads one dataset;
- one embedder from the embed job through both stages to the service (which takes the router's own);
- every path a job or the service reads or writes is on the volume its pods mount;
- the API and admin keys come from a Secret, under the names the serve config reads;
- one place (kustomization.yaml) sets the image, storage class and GPU type; no pool model pins a GPU type;
- a Service and an Ingress reach the service's pods.
"""

from __future__ import annotations

import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from icl_router import config as config_mod
from icl_router.cli import build_parser
from icl_router.config import ServeConfig, expand_env, load_config
from icl_router.serving.app import serve_config

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
IMAGE_REPO = "/home/ray/icl-router"  # where cluster/Dockerfile puts the repo
DATA_CLAIM = "icl-router-data"
KEY_SECRET = "icl-router-keys"


def _by_kind(rendered: list[dict], kind: str) -> list[dict]:
    return [d for d in rendered if d["kind"] == kind]


def _one(rendered: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in _by_kind(rendered, kind) if d["metadata"]["name"] == name]
    return doc


def _pod_specs(doc: dict) -> dict[str, dict]:
    """group name -> pod template of a RayCluster (or a RayService's cluster): 'head' and each worker group."""
    spec = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
    out = {"head": spec["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    return out


def _env(container: dict, configmaps: dict[str, dict]) -> dict[str, Any]:
    """A container's environment: envFrom ConfigMaps, then env (a secretKeyRef stays as its reference)."""
    env: dict[str, Any] = {}
    for src in container.get("envFrom", []):
        env.update(configmaps[src["configMapRef"]["name"]])
    for e in container.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else e["valueFrom"]
    return env


def _data_mounts(template: dict) -> list[PurePosixPath]:
    """Where a pod mounts the shared volume (the PersistentVolumeClaim every pod reads the chain from)."""
    claims = {v["name"] for v in template["spec"].get("volumes", []) if v.get("persistentVolumeClaim", {}).get("claimName") == DATA_CLAIM}
    return [PurePosixPath(m["mountPath"]) for c in template["spec"]["containers"] for m in c.get("volumeMounts", []) if m["name"] in claims]


def _on(path: str, mounts: list[PurePosixPath]) -> bool:
    return PurePosixPath(path).is_absolute() and any(PurePosixPath(path).is_relative_to(m) for m in mounts)


@pytest.fixture(scope="module")
def configmaps(rendered) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["data"] for d in _by_kind(rendered, "ConfigMap")}


@pytest.fixture(scope="module")
def jobs(rendered, configmaps) -> dict[str, Any]:
    """job name -> its config as the head's shell hands it to icl-router (the driver runs on the head)."""
    cluster = _one(rendered, "RayCluster", "icl-router")
    head_env = _env(_pod_specs(cluster)["head"]["spec"]["containers"][0], configmaps)
    out = {}
    for doc in _by_kind(rendered, "RayJob"):
        job = doc["metadata"]["labels"]["icl-router/job"]
        argv = shlex.split(expand_env(doc["spec"]["entrypoint"], env=head_env, where=f"RayJob {job} entrypoint"))
        args = build_parser().parse_args(["submit", argv[1], "--address", "http://x:8265", "--config", str(REPO / argv[3]), *argv[4:]])
        out[job] = load_config(getattr(config_mod, args.config_class), REPO / argv[3], argv[4:])
    return out


@pytest.fixture(scope="module")
def service(rendered, configmaps) -> tuple[ServeConfig, dict]:
    """(the serve config the RayService's app builder makes in its pods, the RayService)."""
    doc = _one(rendered, "RayService", "icl-router-serve")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    args = dict(app["args"])
    args["config"] = str(REPO / PurePosixPath(args["config"]).relative_to(IMAGE_REPO))
    envs = [_env(t["spec"]["containers"][0], configmaps) for t in _pod_specs(doc).values()]
    overrides = [expand_env(o, env=envs[0], where="RayService overrides") for o in args.get("overrides", [])]
    assert all([expand_env(o, env=e, where="RayService overrides") for o in args.get("overrides", [])] == overrides for e in envs), \
        "the RayService's pods see different settings: the app builder may run on any of them"
    return serve_config({**args, "overrides": overrides}), doc


def test_the_chain_has_every_step(jobs):
    assert {"embed", "anchors", "profile", "train-stage1", "train-stage2"} <= set(jobs)


def test_stage1_feeds_stage2_feeds_the_service(jobs, service):
    cfg, _ = service
    s1, s2 = jobs["train-stage1"], jobs["train-stage2"]
    assert (s1.stage, s2.stage) == (1, 2)
    assert s2.init_from == s1.output, "stage 2 must start from the router stage 1 writes"
    assert cfg.router.path == s2.output, "the service must load the router stage 2 writes"
    assert jobs["value"].router == s2.output
    datasets = {job: cfg_.dataset for job, cfg_ in jobs.items() if hasattr(cfg_, "dataset") and job != "evaluate"}
    assert len(set(datasets.values())) == 1, f"every job of the chain reads one dataset, got {datasets}"
    assert s1.output != s2.output and s1.output != s1.dataset


def test_one_embedder_from_embed_to_serving(jobs, service):
    cfg, _ = service
    names = {"embed": jobs["embed"].embedder, "train-stage1": jobs["train-stage1"].embedder, "train-stage2": jobs["train-stage2"].embedder}
    assert len(set(names.values())) == 1, f"the embeddings the stages read are the embed job's: one embedder name, got {names}"
    # the service embeds queries with the embedder its router directory records (stage 2's): a second
    # name here would be a second embedder
    assert cfg.router.embedder in (None, names["embed"]), f"serve router.embedder {cfg.router.embedder!r} is not the chain's {names['embed']!r}"


def _paths(cfg: Any) -> dict[str, str]:
    keys = ("dataset", "output", "init_from", "storage_path", "router", "data_root", "cache_dir")
    return {k: getattr(cfg, k) for k in keys if isinstance(getattr(cfg, k, None), str)}


def test_every_path_is_on_a_volume_the_pods_mount(rendered, jobs, service, configmaps):
    cluster = _one(rendered, "RayCluster", "icl-router")
    # a job's driver runs on the head and its tasks, actors and Train workers on any worker group
    for group, template in _pod_specs(cluster).items():
        mounts = _data_mounts(template)
        assert mounts, f"RayCluster group {group} mounts no {DATA_CLAIM} volume"
        for job, cfg in jobs.items():
            off = {k: v for k, v in _paths(cfg).items() if not _on(v, mounts)}
            assert not off, f"{job}: {off} are not on the volume group {group} mounts at {[str(m) for m in mounts]}"
        env = _env(template["spec"]["containers"][0], configmaps)
        assert _on(env["HF_HOME"], mounts), "one hub cache on the volume, shared by every pod"
    cfg, doc = service
    onboarding = cfg.onboarding.dir or f"{cfg.router.path}/onboarding"
    for group, template in _pod_specs(doc).items():
        mounts = _data_mounts(template)
        for what, path in {"router.path": cfg.router.path, "onboarding.dir": onboarding}.items():
            assert _on(path, mounts), f"serve {what}={path} is not on the volume the RayService group {group} mounts"


def test_keys_come_from_a_secret_under_the_names_serving_reads(service, configmaps):
    cfg, doc = service
    assert not cfg.auth.api_keys and not cfg.auth.admin_keys, "serve/production.yaml must carry no key"
    names = (cfg.auth.api_keys_env, cfg.auth.admin_keys_env)
    assert names == ("ICL_ROUTER_API_KEYS", "ICL_ROUTER_ADMIN_KEYS")
    for group, template in _pod_specs(doc).items():
        env = _env(template["spec"]["containers"][0], configmaps)
        for name in names:
            ref = env.get(name)
            assert isinstance(ref, dict) and ref["secretKeyRef"]["name"] == KEY_SECRET and not ref["secretKeyRef"].get("optional"), \
                f"RayService group {group}: {name} must come from the Secret {KEY_SECRET} (secretKeyRef), got {ref!r}"
        hf = env.get("HF_TOKEN")
        assert isinstance(hf, dict) and "secretKeyRef" in hf, f"RayService group {group}: HF_TOKEN (gated models) from a Secret"


def test_image_storage_class_and_gpu_type_are_set_in_one_place(rendered, settings):
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    want = f"{image['newName']}:{image['newTag']}"

    def images(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [i for v in node.values() for i in images(v)]
        return [i for v in node for i in images(v)] if isinstance(node, list) else []

    found = [i for d in rendered for i in images(d)]
    assert found and set(found) == {want}, f"every container runs the kustomization's image {want}, got {sorted(set(found))}"
    (pvc,) = _by_kind(rendered, "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == settings["ICL_ROUTER_STORAGE_CLASS"]
    for doc in _by_kind(rendered, "RayCluster") + _by_kind(rendered, "RayService"):
        for group, template in _pod_specs(doc).items():
            gpus = template["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            selector = template["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.product")
            assert selector == (settings["ICL_ROUTER_GPU_PRODUCT"] if gpus else None), f"{doc['kind']} group {group}: GPU type {selector!r}"


def test_no_pool_model_pins_a_gpu_type(jobs, service):
    cfg, _ = service
    pinned = [m.name for m in cfg.pool if m.accelerator_type] + [m.name for m in jobs["profile"].models if m.accelerator_type]
    assert not pinned, f"{pinned} set accelerator_type: the GPU type is the worker groups' node selector (kustomization.yaml)"


def test_the_gpu_configs_agree_as_files():
    """The configs alone (no cluster settings, e.g. `icl-router submit` to a cluster of one's own) make the same chain."""
    s1 = load_config(config_mod.TrainConfig, REPO / "jobs/train-stage1/config.gpu.yaml")
    s2 = load_config(config_mod.TrainConfig, REPO / "jobs/train-stage2/config.gpu.yaml")
    embed = load_config(config_mod.EmbedConfig, REPO / "jobs/embed/config.gpu.yaml")
    profile = load_config(config_mod.ProfileConfig, REPO / "jobs/profile/config.gpu.yaml")
    prod = load_config(ServeConfig, REPO / "serve/production.yaml")
    assert s2.init_from == s1.output and prod.router.path == s2.output
    assert embed.embedder == s1.embedder == s2.embedder and prod.router.embedder is None
    assert embed.dataset == profile.dataset == s1.dataset == s2.dataset
    assert s1.storage_path == s2.storage_path and s1.storage_path.startswith("/mnt/data/")


def test_a_service_and_an_ingress_reach_the_api(rendered, service):
    cfg, doc = service
    svc = _one(rendered, "Service", "icl-router-api")
    http = yaml.safe_load(doc["spec"]["serveConfigV2"])["http_options"]["port"]
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == http == cfg.port
    workers = _pod_specs(doc)
    for group, template in workers.items():
        labels = {**template.get("metadata", {}).get("labels", {}), "ray.io/serve": "true"}  # KubeRay sets ray.io/serve on serving pods
        assert svc["spec"]["selector"].items() <= labels.items(), f"the Service does not select RayService group {group}"
    # and it selects nothing of the training cluster
    for template in _pod_specs(_one(rendered, "RayCluster", "icl-router")).values():
        assert not svc["spec"]["selector"].items() <= {**template.get("metadata", {}).get("labels", {}), "ray.io/serve": "true"}.items()
    ing = _one(rendered, "Ingress", "icl-router-api")
    backends = [p for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends and all(p["backend"]["service"] == {"name": "icl-router-api", "port": {"name": port["name"]}} for p in backends)
    assert {p["path"] for p in backends} == {"/v1"}, "the example publishes the OpenAI API only; /admin stays inside the cluster"


def test_a_broken_link_is_caught(rendered, configmaps):
    """The checks can fail: stage 2 pointed at another stage-1 directory, a path off the volume."""
    doc = next(d for d in _by_kind(rendered, "RayJob") if d["metadata"]["labels"]["icl-router/job"] == "train-stage2")
    env = {**configmaps["icl-router-settings"], "ICL_ROUTER_STAGE1": "/mnt/data/icl-router/routers/other"}
    argv = shlex.split(expand_env(doc["spec"]["entrypoint"], env=env, where="x"))
    s2 = load_config(config_mod.TrainConfig, REPO / argv[3], argv[4:])
    assert s2.init_from != load_config(config_mod.TrainConfig, REPO / "jobs/train-stage1/config.gpu.yaml").output
    cluster = _one(rendered, "RayCluster", "icl-router")
    assert not _on("/tmp/runs", _data_mounts(_pod_specs(cluster)["head"])) and not _on("runs/x", [PurePosixPath("/")])
