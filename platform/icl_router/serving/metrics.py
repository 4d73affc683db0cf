"""Prometheus metrics through Ray (exported on each node's metrics port, scraped by Prometheus).

Created inside replicas (ray.serve.metrics adds the deployment, replica and app tags).
"""

from __future__ import annotations

MS_BOUNDS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]


def ingress_metrics() -> dict:
    from ray.serve import metrics

    return {
        "requests": metrics.Counter(
            "icl_router_requests", description="requests answered, by the model that answered", tag_keys=("model", "route", "status")
        ),
        "fallbacks": metrics.Counter("icl_router_fallbacks", description="failovers to the next model", tag_keys=("from_model", "to_model")),
        "errors": metrics.Counter("icl_router_client_errors", description="4xx answers by error code", tag_keys=("code",)),
    }


def router_metrics() -> dict:
    from ray.serve import metrics

    return {
        "scoring_ms": metrics.Histogram(
            "icl_router_scoring_latency_ms", description="embedding + scoring time of one batch", boundaries=MS_BOUNDS
        ),
        "batch_size": metrics.Histogram(
            "icl_router_batch_size", description="queries scored in one forward", boundaries=[1, 2, 4, 8, 16, 32, 64]
        ),
    }
