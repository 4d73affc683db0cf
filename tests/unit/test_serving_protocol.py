"""The service's wire format without Ray: what a request body may hold, what is refused (status, code
and the field named), the routing field against a pool, the keys, and the OpenAPI schema."""

import asyncio
import json
from dataclasses import dataclass, field

import pytest

from icl_router.config import AuthConfig
from icl_router.routing.decision import DecisionParams
from icl_router.routing.policy import Policy
from icl_router.serving.api_errors import ApiError
from icl_router.serving.auth import Keys
from icl_router.serving.failover import candidates, resolve
from icl_router.serving.http_io import parse_body, read_body, require_json
from icl_router.serving.protocol import (
    MAX_JSON_DEPTH,
    ChatBody,
    CompletionBody,
    RegisterBody,
    RoutingOptions,
)

MSGS = [{"role": "user", "content": "hi"}]


def refused(raw: bytes | dict, cls=ChatBody) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_body(raw if isinstance(raw, bytes) else json.dumps(raw).encode(), cls)
    return e.value


@pytest.mark.parametrize(
    "raw, code, param",
    [
        (b"[" * 100_000, "invalid_json", None),  # the issue's RecursionError
        (json.dumps({"model": "auto", "messages": MSGS, "x": [[[[]]]] * 1}).replace("[[[[]]]]", "[" * 40 + "]" * 40).encode(), "invalid_json", None),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "invalid_json", None),
        (b'{"model": "auto", "temperature": 1' + b"0" * 5000 + b"}", "invalid_json", None),  # an integer too long to parse
        (b"\xff\xfe{", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        ({"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "invalid_value", "messages.0.content.0.text"),
        ({"model": "auto", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "invalid_value",
         "messages.0.content.0.type"),
        ({"model": "auto", "messages": [{"role": "user", "content": "hi", "colour": 1}]}, "invalid_value", "messages.0.colour"),
        ({"model": "auto", "messages": MSGS, "n": 1000}, "invalid_value", "n"),
        ({"model": "auto", "messages": MSGS, "max_tokens": 0}, "invalid_value", "max_tokens"),
        ({"model": "auto", "messages": MSGS, "stop": ["a", "b", "c", "d", "e"]}, "invalid_value", "stop"),
        ({"model": "auto", "messages": MSGS, "routing": {"min_gain": 2}}, "invalid_value", "routing.min_gain"),
        ({"model": "auto", "messages": MSGS, "routing": {"policy": "fastest"}}, "invalid_value", "routing.policy"),
        ({"model": "auto", "messages": MSGS, "routing": {"surprise": 1}}, "invalid_value", "routing.surprise"),
        ({"model": "auto", "messages": MSGS, "routing": {"task": ""}}, "invalid_value", "routing.task"),
        ({"model": "auto", "messages": MSGS, "routing": {"task": ["math"]}}, "invalid_value", "routing.task"),
        ({"messages": MSGS}, "invalid_value", "model"),
    ],
)
def test_bad_chat_bodies_are_400s_naming_the_field(raw, code, param):
    e = refused(raw)
    assert (e.status, e.code, e.param) == (400, code, param), e.message


def test_json_nesting_is_bounded_and_ordinary_bodies_pass():
    deep = {"model": "auto", "messages": MSGS}
    node = deep
    for _ in range(MAX_JSON_DEPTH - 1):  # the body is level 1
        node["extra"] = {}
        node = node["extra"]
    assert parse_body(json.dumps(deep).encode(), ChatBody).model == "auto"  # exactly at the limit
    node["extra"] = {}
    assert refused(deep).code == "invalid_json"
    body = parse_body(json.dumps({"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                  "ignore_eos": True, "routing": {"policy": "cost", "cost_weight": 2}}).encode(), ChatBody)
    assert body.routing.policy == "cost" and body.model_dump(exclude_none=True)["ignore_eos"] is True  # vLLM's own fields pass on


def test_completion_prompts_are_bounded():
    assert refused({"model": "auto", "prompt": ["q"] * 2000}, CompletionBody).param == "prompt"  # the issue's 2,000 prompts
    assert refused({"model": "auto", "prompt": []}, CompletionBody).param == "prompt"
    assert parse_body(json.dumps({"model": "auto", "prompt": ["a", "b"]}).encode(), CompletionBody).prompt == ["a", "b"]


def test_register_bodies():
    assert refused({"model": "bad name!", "profile": [True]}, RegisterBody).param == "model"
    assert refused({"model": "m", "profile": [1, 0]}, RegisterBody).param == "profile.0"  # StrictBool: no 1/0
    ok = parse_body(json.dumps({"model": "org/m-7b.v2", "profile": {"q1": True}, "serving": {"path": "/m"}}).encode(), RegisterBody)
    assert ok.serving == {"path": "/m"}  # checked against the pool-model config by the registry


# ---- the request's transport ---------------------------------------------------------------


def request(headers: dict[str, str], chunks: list[bytes]):
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    parts = [*chunks]

    async def receive():
        return {"type": "http.request", "body": parts.pop(0) if parts else b"", "more_body": bool(parts)}

    return Request(scope, receive)


def test_content_type_and_body_size():
    for media in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        require_json(request({"content-type": media}, []))
    for media in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        with pytest.raises(ApiError) as e:
            require_json(request(media, []))
        assert (e.value.status, e.value.code) == (415, "unsupported_media_type")
    assert asyncio.run(read_body(request({}, [b"x" * 600, b"y" * 400]), 1000)) == b"x" * 600 + b"y" * 400
    for headers, chunks in (({"content-length": str(30 * 2**20)}, []), ({}, [b"x" * 600, b"y" * 401])):  # declared, or streamed (chunked)
        with pytest.raises(ApiError) as e:
            asyncio.run(read_body(request(headers, chunks), 1000))
        assert (e.value.status, e.value.code) == (413, "request_too_large")


def test_keys(monkeypatch):
    monkeypatch.setenv("EXTRA_KEYS", " sk-env , ")
    keys = Keys.from_config(AuthConfig(api_keys=["sk-a"], api_keys_env="EXTRA_KEYS", admin_keys=["sk-adm"]))
    assert list(keys.api) == ["sk-a", "sk-env"]
    keys.check("Bearer sk-env")
    keys.check("bearer sk-adm", admin=True)
    keys.check("Bearer sk-adm", either=True)
    for header, kw in ((None, {}), ("Bearer sk-adm", {}), ("sk-a", {}), ("Bearer sk-a", {"admin": True})):
        with pytest.raises(ApiError) as e:
            keys.check(header, **kw)
        assert (e.value.status, e.value.code) == (401, "invalid_api_key")
    assert Keys({}, {}, frozenset({"api", "admin"})).check(None) == "open"  # opened on purpose (auth.open; tests/unit/test_auth.py)


# ---- the routing field against a pool ---------------------------------------------------------


@dataclass
class Snap:
    routable: list[str] = field(default_factory=lambda: ["a", "b"])
    models: dict = field(default_factory=lambda: {"a": 1, "b": 1, "c": 1})
    decision: DecisionParams | None = None


@pytest.mark.parametrize(
    "routing, snap, param",
    [
        ({"policy": "threshold"}, Snap(), "routing.policy"),  # needs its value
        ({"budget": 0.1}, Snap(), "routing.budget"),  # a value for another policy than the default highest
        ({"min_gain": 0.1}, Snap(), "routing.min_gain"),  # no decision layer in this router directory
        ({"default_model": "a"}, Snap(), "routing.default_model"),
    ],
)
def test_resolve_refuses_what_does_not_fit(routing, snap, param):
    with pytest.raises(ApiError) as e:
        resolve(RoutingOptions(**routing), snap, default=Policy())
    assert (e.value.status, e.value.param) == (400, param)


def test_resolve_applies_overrides_on_the_stored_decision_layer():
    stored = DecisionParams(tau=0.05, prior_weight=3.0, min_gain=0.02)
    policy, params = resolve(RoutingOptions(min_gain=0.1, default_model="b"), Snap(decision=stored), default=Policy("margin", margin=0.05))
    assert policy == Policy("margin", margin=0.05) and params == stored.replace(min_gain=0.1, default_model="b")
    policy, _ = resolve(RoutingOptions(margin=0.2), Snap(), default=Policy("margin", margin=0.05))  # the default policy's value replaced
    assert policy.margin == pytest.approx(0.2)
    policy, _ = resolve(RoutingOptions(policy="cost", cost_weight=5.0), Snap(), default=Policy())
    assert (policy.kind, policy.cost_weight) == ("cost", 5.0)


def test_candidates():
    assert candidates(RoutingOptions(), Snap()) == ["a", "b"]
    assert candidates(RoutingOptions(models=["b", "b"]), Snap()) == ["b"]
    assert candidates(RoutingOptions(), Snap(), exclude="a") == ["b"]
    for r, snap, status, param in (
        (RoutingOptions(models=["zz"]), Snap(), 400, "routing.models"),  # unknown
        (RoutingOptions(models=["c"]), Snap(), 400, "routing.models"),  # known, not routable
        (RoutingOptions(default_model="c"), Snap(), 400, "routing.default_model"),
        (RoutingOptions(), Snap(routable=[]), 503, None),
    ):
        with pytest.raises(ApiError) as e:
            candidates(r, snap)
        assert (e.value.status, e.value.param) == (status, param)


# ---- the OpenAPI schema -------------------------------------------------------------------------


def test_the_schema_documents_every_route_its_body_and_its_errors():
    from icl_router.serving.ingress import app
    from icl_router.serving.openapi import service_schema

    schema = service_schema(app.routes)
    ops = {(m.upper(), p): op for p, item in schema["paths"].items() for m, op in item.items()}
    assert set(ops) == {
        ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/feedback"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
        ("GET", "/health"), ("GET", "/ready"), ("GET", "/admin/models"), ("POST", "/admin/models"),
        ("GET", "/admin/models/{name}"), ("DELETE", "/admin/models/{name}"),
    }  # /openapi.json itself is not in it
    for (method, path), op in ops.items():
        assert "422" not in op["responses"]  # bad input is a 400 here
        if method == "POST":
            assert {"400", "413", "415"} <= set(op["responses"]) and "requestBody" in op
        if path.startswith(("/v1", "/admin")):
            assert "401" in op["responses"]
    comps = schema["components"]["schemas"]
    assert comps["Message"]["additionalProperties"] is False and "name" not in comps["ServingConfig"]["properties"]
    assert comps["RegisterBody"]["properties"]["serving"]["anyOf"][0] == {"$ref": "#/components/schemas/ServingConfig"}
    json.dumps(schema)  # serialisable as it is
