"""The routing service on Ray Serve: an OpenAI-compatible ingress, an autoscaled router
deployment, one ray.serve.llm (vLLM) deployment per pool model, and a registry of the pool.

    client -> Ingress (routes only) -> V1Handler | AdminHandler | HealthHandler      (v1, admin_api, health)
              V1Handler -> RouterDeployment.score (@serve.batch): p per model, evidence mass
                        -> failover.plan: decision layer + policy (routing.policy.choose)
                        -> LLMServer:<model> (ray.serve.llm), failover down the order (engine_calls)
              Registry: the pool (profiles, costs, deployments), its epoch and version

protocol (request/response models), api_errors + http_io (refusals, reading bodies), openapi,
auth (keys), pool_view (an ingress replica's view: snapshot, circuits, handles), failover (one
request: resolve, plan, failover; pure), circuits (breakers and their probes), sse (streams),
registry + onboarding, router_deployment, metrics, app (build, start), admin_client (the CLI's
HTTP client of /admin). docs/service.md has the table.
"""
