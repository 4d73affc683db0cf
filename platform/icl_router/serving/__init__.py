"""The routing service on Ray Serve: an OpenAI-compatible ingress, an autoscaled router
deployment, one ray.serve.llm (vLLM) deployment per pool model, and a registry of the pool.

    client -> Ingress (/v1, /admin) -> Router.score (@serve.batch) -> p per model -> policy
                                    -> LLMServer:<model> (ray.serve.llm), failover down the order
           Registry: the pool (profiles, costs, deployments) and its version
"""
