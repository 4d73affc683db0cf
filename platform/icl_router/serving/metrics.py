"""Prometheus metrics through Ray (exported on each node's metrics port with the ``ray_`` prefix).

Created inside replicas (ray.serve.metrics adds the deployment, replica and app tags). A
Ray Counter named ``x`` is exported as the counter ``ray_x_total``.
"""

from __future__ import annotations

from typing import Any

MS_BOUNDS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
LATENCY_BOUNDS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]


def requests_counter() -> object:
    """Every response of the ingress, by HTTP status and OpenAI error code ("" for a success)."""
    from ray.serve import metrics

    return metrics.Counter("icl_router_requests", description="responses by HTTP status and error code", tag_keys=("code", "error"))


def ingress_metrics() -> dict:
    from ray.serve import metrics

    return {
        "answers": metrics.Counter(
            "icl_router_answers", description="requests a pool model answered, by that model", tag_keys=("model", "route", "status")
        ),
        "fallbacks": metrics.Counter(
            "icl_router_fallbacks", description="models skipped or failed, by reason", tag_keys=("from_model", "reason")
        ),
        "open_circuits": metrics.Gauge("icl_router_open_circuits", description="parts (pool models, the router) this ingress skips now"),
        "ready": metrics.Gauge("icl_router_ready", description="1 once the router and a pool model answered, else 0"),
        "limited": metrics.Counter(
            "icl_router_limited", description="requests refused by a key's limit, by key name and reason (rate, budget)", tag_keys=("key", "reason")
        ),
        "spend": metrics.Counter(
            "icl_router_spend", description="spend in the pool's cost units, by key name and answering model", tag_keys=("key", "model")
        ),
        "latency": metrics.Histogram(
            "icl_router_request_latency_ms", description="ingress time to a pool model's answer (streaming: its first chunk), by route",
            boundaries=LATENCY_BOUNDS, tag_keys=("route",),
        ),
        "prior_accuracy": metrics.Gauge(
            "icl_router_prior_accuracy", description="a routable model's accuracy on the anchors (its profile): what routing assumes", tag_keys=("model",)
        ),
        **outcome_metrics(metrics),
        "shadow": metrics.Counter(
            "icl_router_shadow_decisions", description="shadow decisions logged, by candidate and agreement with the live router", tag_keys=("candidate", "agree")
        ),
        "shadow_dropped": metrics.Counter(
            "icl_router_shadow_dropped", description="shadow rows dropped: the log directory could not be written, or too many decisions in flight"
        ),
        "log_dropped": metrics.Counter(
            "icl_router_log_dropped", description="decision-log rows dropped (a full disk, an unwritable directory), by kind", tag_keys=("kind",)
        ),
        "feedback": metrics.Counter(
            "icl_router_feedback", description="feedback stored on routed requests, by the model that answered and what it gave (correct, score, reference)",
            tag_keys=("model", "kind"),
        ),
        "feedback_score": metrics.Counter(
            "icl_router_feedback_score", description="sum of feedback outcomes (correct as 1/0, or the score) by the model that answered: "
            "divided by icl_router_feedback_total{kind!='reference'}, its outcome accuracy", tag_keys=("model",),
        ),
    }


def outcome_metrics(metrics: Any) -> dict:
    """Production outcomes of a model's answers (``count_outcome``): fed by feedback and re-profiled traffic.
    Accuracy per model = score_total / outcomes_total."""
    return {
        "outcomes": metrics.Counter("icl_router_outcomes", description="graded outcomes of answered requests, by model and source", tag_keys=("model", "source")),
        "outcome_score": metrics.Counter(
            "icl_router_outcome_score", description="sum of those outcomes' scores (0..1), by model and source", tag_keys=("model", "source")
        ),
    }


def count_outcome(m: dict, model: str, score: float, source: str = "feedback") -> None:
    """One graded outcome of ``model`` (score in [0, 1]) into the outcome counters of ``m`` (``ingress_metrics()``)."""
    tags = {"model": model, "source": source}
    m["outcomes"].inc(tags=tags)
    if score > 0:
        m["outcome_score"].inc(float(score), tags=tags)


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


class CountResponses:
    """Counts every response by HTTP status and error code (``icl_router_requests_total``).

    It makes its own counter, in the replica, on the first request: Serve ships the app and the
    deployment class to the replica separately, so a global they both wrote would not be shared."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.counter = inner, None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.inner(scope, receive, send_status)
        finally:
            if self.counter is None:
                self.counter = requests_counter()
            error = scope.get("state", {}).get("error_code", "" if status[0] < 400 else "internal_error")
            self.counter.inc(tags={"code": str(status[0]), "error": error})
