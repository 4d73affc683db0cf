"""The service configs: serve/demo.yaml and serve/production.yaml load, validate and turn into
ray.serve.llm LLMConfigs; bad configs fail naming the key."""

from pathlib import Path

import pytest

from icl_router.config import ConfigError, ServeConfig, load_config

SERVE = Path(__file__).resolve().parents[2] / "serve"


def test_demo_config_is_a_cpu_pool_with_explicit_autoscaling():
    cfg = load_config(ServeConfig, SERVE / "demo.yaml")
    assert len(cfg.pool) in (2, 3) and all(m.accelerator == "cpu" and m.accelerator_type is None for m in cfg.pool)
    # the two real pretrained LMs `make models` converts, asked the anchors as their outcomes were recorded
    assert [m.name for m in cfg.pool] == ["smollm2-135m-instruct", "gemma-3-270m"]
    assert all(m.path == f"runs/models/{m.name}" for m in cfg.pool) and cfg.onboarding.prompt_style == "short"
    assert cfg.router.autoscaling.max_replicas >= 2 and cfg.router.autoscaling.target_ongoing_requests > 0
    assert cfg.port != 8000 and cfg.ray.num_cpus >= 3 + 2 * (len(cfg.pool) - 1)


def test_production_config_is_a_gpu_pool_of_7_to_9b_models_with_keys_from_the_environment():
    cfg = load_config(ServeConfig, SERVE / "production.yaml")
    assert 3 <= len(cfg.pool) and all(m.accelerator == "gpu" and m.accelerator_type is None for m in cfg.pool)  # GPU type: the node selector
    assert all(any(s in m.path.lower() for s in ("7b", "8b", "9b")) for m in cfg.pool)
    assert cfg.router.num_gpus >= 1 and cfg.router.autoscaling.max_replicas > 1
    assert not cfg.auth.api_keys and cfg.auth.api_keys_env and cfg.auth.admin_keys_env  # no secrets in the file
    assert all(m.autoscaling.max_replicas > 1 for m in cfg.pool)


@pytest.mark.parametrize("name", ["demo.yaml", "production.yaml"])
def test_every_pool_model_builds_an_llm_config(name):
    pytest.importorskip("vllm")
    cfg = load_config(ServeConfig, SERVE / name)
    for m in cfg.pool:
        lc = m.build()
        assert lc.model_id == m.name
        auto = lc.deployment_config["autoscaling_config"]
        assert auto["target_ongoing_requests"] == m.autoscaling.target_ongoing_requests  # never ray.serve.llm's 1e9
        if m.accelerator == "cpu":
            assert lc.accelerator_config.kind == "cpu" and lc.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"]
        else:
            assert lc.accelerator_type == m.accelerator_type


@pytest.mark.parametrize(
    "override, key",
    [
        ("pool.0.accelerator_type=H100", "pool.0"),  # a GPU type on a CPU model
        ("router.autoscaling.target_ongoing_requests=0", "router.autoscaling"),
        ("router.autoscaling.min_replicas=3", "router.autoscaling"),
        ("policy.kind=fastest", "policy.kind"),
        ("auth.keys=[a]", "auth.keys"),
        ("first_output_timeout_s=0", "<root>"),
    ],
)
def test_bad_values_fail_naming_the_key(override, key, tmp_path):
    import yaml

    data = yaml.safe_load((SERVE / "demo.yaml").read_text())
    path, _, value = override.partition("=")
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    node[parts[-1]] = yaml.safe_load(value)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_config(ServeConfig, tmp_path / "bad.yaml")
    assert key in str(e.value)


def test_reserved_and_duplicate_pool_names_fail():
    base = {"router": {"path": "r"}, "pool": [{"name": "m", "path": "p"}]}
    ServeConfig.model_validate(base)
    for pool in ([{"name": "auto", "path": "p"}], [{"name": "m", "path": "p"}, {"name": "m", "path": "q"}]):
        with pytest.raises(ValueError):
            ServeConfig.model_validate({**base, "pool": pool})
    assert ServeConfig.model_validate({**base, "pool": []}).pool == []  # every model then joins by onboarding


def test_app_args_take_a_config_path_with_overrides_or_inline_fields():
    from icl_router.serving.app import serve_config

    cfg = serve_config({"config": str(SERVE / "demo.yaml"), "overrides": ["port=9123", "router.max_batch_size=4"]})
    assert (cfg.port, cfg.router.max_batch_size) == (9123, 4)
    assert serve_config({"router": {"path": "r"}, "pool": [{"name": "m", "path": "p"}]}).pool[0].name == "m"
    with pytest.raises(ConfigError, match="beside 'config'"):
        serve_config({"config": str(SERVE / "demo.yaml"), "port": 1})


def test_app_args_overrides_name_the_pods_settings(monkeypatch):
    """A RayService's overrides read `$NAME` from the pod's environment (cluster/kuberay's settings ConfigMap)."""
    from icl_router.serving.app import serve_config

    monkeypatch.setenv("ICL_ROUTER_ROUTER", "/mnt/data/icl-router/routers/stage2")
    cfg = serve_config({"config": str(SERVE / "production.yaml"), "overrides": ["router.path=$ICL_ROUTER_ROUTER", "app_name=a"]})
    assert cfg.router.path == "/mnt/data/icl-router/routers/stage2" and cfg.app_name == "a"
    monkeypatch.delenv("ICL_ROUTER_ROUTER")
    with pytest.raises(ConfigError, match=r"app args overrides\[0\] 'router.path=\$\{ICL_ROUTER_ROUTER\}': \$ICL_ROUTER_ROUTER is not set"):
        serve_config({"config": str(SERVE / "production.yaml"), "overrides": ["router.path=${ICL_ROUTER_ROUTER}"]})


def test_the_rayservice_probes_are_the_services_health_and_ready():
    import yaml

    doc = yaml.safe_load((SERVE.parent / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    port = serve_cfg["http_options"]["port"]
    for group in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port}
        assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": port}
        # liveness must outlast a slow start (else the pod restarts while its models load)
        live = c["livenessProbe"]
        assert live["initialDelaySeconds"] + live["periodSeconds"] * live["failureThreshold"] >= 900
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in head  # KubeRay submits the app only once the head is ready


def test_serve_timeouts_and_limits_are_checked():
    base = {"router": {"path": "r"}, "pool": [{"name": "m", "path": "p"}]}
    for bad in ({"probe_interval_s": 0}, {"router_timeout_s": -1}, {"max_body_bytes": 10}, {"deploy_timeout_s": 0}):
        with pytest.raises(ValueError):
            ServeConfig.model_validate({**base, **bad})
    with pytest.raises(ValueError, match="cost_weight"):
        ServeConfig.model_validate({**base, "policy": {"kind": "cost"}})
    assert ServeConfig.model_validate({**base, "policy": {"kind": "cost", "cost_weight": 100}}).policy.cost_weight == 100


def test_a_pool_model_is_a_path_or_an_endpoint():
    from icl_router.config import PoolModelConfig

    ep = {"base_url": "https://api.example.com/v1", "model": "gpt-x", "api_key_env": "EXAMPLE_KEY"}
    m = PoolModelConfig(name="hosted", endpoint=ep, cost=0.004)
    assert m.path is None and m.endpoint.model == "gpt-x"
    bad = {
        "give exactly one of path": {"name": "m"},
        "give exactly one of path ": {"name": "m", "path": "/m", "endpoint": ep},
        r"\['engine_kwargs'\] configure a vLLM replica": {"name": "m", "endpoint": ep, "engine_kwargs": {"dtype": "float32"}},
        "base_url must start with http": {"name": "m", "endpoint": {**ep, "base_url": "api.example.com"}},
        "endpoint.modle: unknown key": {"name": "m", "endpoint": {**ep, "modle": "x"}},
    }
    for msg, data in bad.items():
        with pytest.raises(ConfigError, match=msg.strip()):
            from icl_router.config import build_config

            build_config(PoolModelConfig, data)


def test_a_model_in_a_directory_skips_the_download_task_and_a_hub_id_keeps_it(tmp_path):
    """ray.serve.llm's node initialisation (a Ray task per node that downloads the model) is skipped
    only when the source is a directory on disk."""
    pytest.importorskip("vllm")
    import asyncio

    from icl_router.config import PoolModelConfig

    for source, runs in ((str(tmp_path), False), ("HuggingFaceTB/SmolLM2-135M-Instruct", True)):
        lc = PoolModelConfig(name="m", path=source).build()
        callback = lc.get_or_create_callback()
        asyncio.run(callback.run_callback("on_before_node_init"))
        assert callback.ctx.run_init_node is runs, source
