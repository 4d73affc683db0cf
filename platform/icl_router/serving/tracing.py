"""OpenTelemetry spans of a routed request: ingress -> router -> pool model, the decision as attributes.

    icl_router.request   (SERVER)  one per /v1 request: route, chosen, answering model, order, policy,
                                   p per model, evidence mass, layer, guard, fallbacks, HTTP status
      icl_router.router  (CLIENT)  the router's scoring call (its replica's stage times)
      icl_router.model   (CLIENT)  one per pool model tried, in failover order (the model, how it ended)

``Tracing.from_config``: with ``tracing.otlp_endpoint`` set, an SDK tracer provider of this replica's own
(not the global one) exports in batches over OTLP (http/protobuf or grpc). Without it every ``span`` is a
shared no-op context and opentelemetry is never imported: tracing off costs one attribute check per call.
Tests pass their own tracer (an in-memory exporter's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

REQUEST, ROUTER, MODEL = "icl_router.request", "icl_router.router", "icl_router.model"
ATTR = "icl_router."  # prefix of every attribute this module sets


class _NoSpan:
    """What ``span`` yields with tracing off: takes attributes and drops them."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attrs: dict) -> None:
        pass

    def set_status(self, *a: Any, **k: Any) -> None:
        pass

    def record_exception(self, *a: Any, **k: Any) -> None:
        pass

    def is_recording(self) -> bool:
        return False


NO_SPAN = _NoSpan()


@contextlib.contextmanager
def _no_span() -> Iterator[_NoSpan]:
    yield NO_SPAN


def clean(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes OpenTelemetry takes: str/bool/int/float or lists of one of them; None dropped, keys prefixed."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if v is None:
            continue
        if isinstance(v, list | tuple):
            v = [str(x) for x in v]
        elif not isinstance(v, str | bool | int | float):
            v = str(v)
        out[k if k.startswith((ATTR, "http.")) else ATTR + k] = v
    return out


class Tracing:
    def __init__(self, tracer: Any | None = None, provider: Any | None = None) -> None:
        self.tracer, self.provider = tracer, provider

    @property
    def on(self) -> bool:
        return self.tracer is not None

    @classmethod
    def from_config(cls, cfg: Any) -> Tracing:
        """``cfg``: a ``config.TracingConfig``; no endpoint: tracing off."""
        if not cfg.otlp_endpoint:
            return cls()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        from icl_router.config import expand_env

        headers = {k: expand_env(v, where=f"tracing.headers.{k}") for k, v in cfg.headers.items()}
        if cfg.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, headers=headers or None, insecure=cfg.otlp_endpoint.startswith("http://"))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, headers=headers or None)
        provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}),
                                  sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=int(cfg.export_interval_s * 1000)))
        return cls(provider.get_tracer("icl_router.serving"), provider)

    def span(self, name: str, *, kind: str = "internal", attrs: dict[str, Any] | None = None,
             parent_headers: Any | None = None) -> contextlib.AbstractContextManager:
        """A span (the current one's child, or of a W3C ``traceparent`` in ``parent_headers``); a no-op with tracing off."""
        if self.tracer is None:
            return _no_span()
        from opentelemetry.trace import SpanKind

        context = None
        if parent_headers is not None and "traceparent" in parent_headers:
            from opentelemetry.propagate import extract

            context = extract({"traceparent": parent_headers["traceparent"], **({"tracestate": parent_headers["tracestate"]}
                                                                                  if "tracestate" in parent_headers else {})})
        return self.tracer.start_as_current_span(name, context=context, kind=getattr(SpanKind, kind.upper()), attributes=clean(attrs or {}),
                                                 record_exception=False, set_status_on_exception=False)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def decision_attrs(p: Any, *, explain: dict | None = None) -> dict[str, Any]:
    """The decision of a ``failover.Plan`` as span attributes."""
    d = p.decision
    out = {
        "chosen": d.model,
        "order": list(d.order),
        "policy": d.policy.kind,
        "scored_by": p.scored_by,
        "default": d.default,
        "layer": ("task" if p.task_layer else "plain") if p.params is not None else None,
        "scoring_ms": round(p.scoring_ms, 3),
    }
    out.update({f"{ATTR}p.{m}": round(float(v), 6) for m, v in d.p.items()})
    if explain is not None:
        out["mass"] = explain.get("evidence_mass")
        out["guard"] = explain.get("guard", {}).get("decided")
    return out
