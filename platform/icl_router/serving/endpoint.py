"""A pool model the service does not own: an OpenAI-compatible endpoint (a provider's API, another
team's vLLM server), served behind the same handle interface as a ray.serve.llm replica.

``EndpointServer`` is one small Serve deployment per endpoint model (``Endpoint:<name>``) whose
``chat`` / ``completions`` are async generators yielding exactly what ``LLMServer`` yields: one
``ChatCompletionResponse`` / ``CompletionResponse`` (non-streaming), lists of SSE strings ending with
``data: [DONE]`` (streaming), or an ``ErrorResponse`` carrying the endpoint's status. So routing,
failover, circuits and their probes, metering and onboarding (anchors asked through the handle)
treat it as they treat a vLLM replica. The endpoint's key is read from the replica's environment
(``api_key_env``), never from the config. A refused connection or a 5xx is the endpoint being down:
the ingress fails over and opens its circuit.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from icl_router.config import ConfigError, EndpointConfig

log = logging.getLogger("ray.serve")


def endpoint_deployment_name(model_id: str) -> str:
    return "Endpoint:" + model_id.replace("/", "--").replace(".", "_")


def _error(status: int, message: str, *, type_: str = "endpoint_error", param: str | None = None) -> Any:
    from ray.serve.llm.openai_api_models import ErrorResponse

    return ErrorResponse(error={"message": message, "type": type_, "code": status, "param": param})


def _renamed(data: dict, model_id: str) -> dict:
    return {**data, "model": model_id} if "model" in data else data


@serve.deployment(ray_actor_options={"num_cpus": 0})
class EndpointServer:
    """Forwards a pool model's requests to its OpenAI-compatible endpoint (module docstring)."""

    def __init__(self, model_id: str, endpoint: dict[str, Any]) -> None:
        import httpx

        self.model_id, self.cfg = model_id, EndpointConfig.model_validate(endpoint)
        headers = {}
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                raise ConfigError(f"pool model {model_id!r}: endpoint.api_key_env names ${self.cfg.api_key_env}, which is not set in the "
                                  "replica's environment; set it (a Secret on a cluster) or drop api_key_env for an endpoint without a key")
            headers["authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(base_url=self.cfg.base_url.rstrip("/"), headers=headers,
                                        timeout=httpx.Timeout(self.cfg.timeout_s, connect=self.cfg.connect_timeout_s))
        log.info("endpoint pool model %s: %s at %s", model_id, self.cfg.model, self.cfg.base_url)

    async def chat(self, request: Any) -> AsyncIterator[Any]:
        from ray.serve.llm.openai_api_models import ChatCompletionResponse

        async for out in self._forward("/chat/completions", request, ChatCompletionResponse):
            yield out

    async def completions(self, request: Any) -> AsyncIterator[Any]:
        from ray.serve.llm.openai_api_models import CompletionResponse

        async for out in self._forward("/completions", request, CompletionResponse):
            yield out

    async def _forward(self, path: str, request: Any, response_type: Any) -> AsyncIterator[Any]:
        body = request.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        body["model"] = self.cfg.model  # the endpoint's own name for the model
        if not body.get("stream"):
            r = await self.client.post(path, json=body)  # a refused connection raises: the ingress fails over
            if r.status_code >= 400:
                yield _error(r.status_code, _message(r.text), param=_param(r.text))
                return
            yield response_type.model_validate(_renamed(r.json(), self.model_id))
            return
        async with self.client.stream("POST", path, json=body) as r:
            if r.status_code >= 400:
                yield _error(r.status_code, _message((await r.aread()).decode(errors="replace")))
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    yield ["data: [DONE]\n\n"]
                    return
                yield [f"data: {json.dumps(_renamed(json.loads(data), self.model_id))}\n\n"]

    async def check_health(self) -> None:
        """Serve's health check: the replica is up; whether the endpoint answers is the ingress's probe's business."""


def _message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        return str(err.get("message") if isinstance(err, dict) else err)[:2000]
    except (ValueError, AttributeError):
        return text[:2000] or "the endpoint answered with an error and no body"


def _param(text: str) -> str | None:
    try:
        err = json.loads(text).get("error")
        return err.get("param") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        return None


def deployment_name(model_id: str) -> str:
    """The Serve deployment of a pool model (ray.serve.llm names it ``LLMServer:<model id>``)."""
    return "LLMServer:" + model_id.replace("/", "--").replace(".", "_")


def pool_deployment_name(cfg: Any) -> str:
    """The Serve deployment of a pool model: ``LLMServer:<name>`` (ray.serve.llm) or ``Endpoint:<name>``."""
    return endpoint_deployment_name(cfg.name) if cfg.endpoint is not None else deployment_name(cfg.name)


def pool_model_app(cfg: Any) -> Any:
    """The bound Serve application of one pool model (a ``PoolModelConfig``): vLLM through ray.serve.llm
    for a ``path``, the forwarder above for an ``endpoint``."""
    if cfg.endpoint is None:
        from ray.serve.llm import build_llm_deployment

        return build_llm_deployment(cfg.build())
    return EndpointServer.options(
        name=endpoint_deployment_name(cfg.name), autoscaling_config=cfg.autoscaling.model_dump(), max_ongoing_requests=cfg.max_ongoing_requests,
    ).bind(cfg.name, cfg.endpoint.model_dump(mode="json"))
