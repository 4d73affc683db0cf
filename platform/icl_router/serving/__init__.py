"""The routing service on Ray Serve: an OpenAI-compatible ingress, an autoscaled router
deployment, one ray.serve.llm (vLLM) deployment per pool model, and a registry of the pool.

    client -> Ingress (/v1, /admin, /health, /ready) -> Router.score (@serve.batch): p per model, evidence mass
                                                     -> decision layer + policy (routing.policy.choose)
                                                     -> LLMServer:<model> (ray.serve.llm), failover down the order
           Registry: the pool (profiles, costs, deployments), its epoch and version

protocol (wire format, limits, errors), auth (keys), failover (one request: plan + failover,
pure), circuits (breakers and their probes), sse (streams), registry, deployments (the
router replica, pool models' LLMConfigs), ingress (the routes), metrics, app (build, start).
"""
