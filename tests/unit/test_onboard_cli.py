"""`icl-router onboard` without a cluster: the serving block it builds from the config, and how it follows
the service, against a stand-in HTTP service whose states advance one step per GET (no clock involved)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from icl_router.config import ConfigError, ServeConfig
from icl_router.serving.admin_client import OnboardError, admin_key, onboard, service_url, serving_block

KEY = "sk-admin"


def _cfg(**fields) -> ServeConfig:
    return ServeConfig.model_validate({
        "router": {"path": "/r"}, "auth": {"admin_keys": [KEY]}, "port": 8123,
        "pool": [{"name": "m-old", "path": "/models/m-old", "cost": 0.01, "engine_kwargs": {"dtype": "float32", "max_model_len": 512}}],
        **fields,
    })


def test_the_serving_block_copies_a_pool_model_then_overrides_it():
    cfg = _cfg()
    block = serving_block(cfg, like="m-old", serving="{engine_kwargs: {max_model_len: 2048}}", path="/models/m-new")
    assert block["path"] == "/models/m-new" and "name" not in block and "cost" not in block
    assert block["engine_kwargs"] == {"dtype": "float32", "max_model_len": 2048}
    with pytest.raises(ConfigError, match="--like 'nope'.*m-old"):
        serving_block(cfg, like="nope", serving=None, path="/x")
    with pytest.raises(ConfigError, match="--serving: a mapping"):
        serving_block(cfg, like=None, serving="[1, 2]", path="/x")
    with pytest.raises(ConfigError, match="give --path"):
        serving_block(cfg, like=None, serving=None, path=None)
    assert service_url(cfg, None) == "http://127.0.0.1:8123" and service_url(cfg, "http://h:1/v1/") == "http://h:1"
    assert admin_key(cfg) == KEY


class _Service:
    """POST /admin/models answers ``post``; each GET /admin/models/m-new answers the next of ``rows``
    (the last one again once they run out). Records what it was sent."""

    def __init__(self, post: tuple[int, dict], rows: list[tuple[int, dict]]):
        self.post, self.rows, self.got = post, list(rows), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.got.append(("POST", self.path, self.headers.get("authorization"), body))
                self._send(*outer.post)

            def do_GET(self):
                outer.got.append(("GET", self.path, self.headers.get("authorization"), None))
                self._send(*(outer.rows.pop(0) if len(outer.rows) > 1 else outer.rows[0]))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _row(state: str, graded: int | None = None, **extra) -> tuple[int, dict]:
    progress = None if graded is None else {"graded": graded, "k": 4, "resumed": extra.pop("resumed", 0)}
    return 200, {"id": "m-new", "state": state, "routable": state == "ready", "progress": progress, "error": None, **extra}


def _onboard(service: _Service, said: list[str]) -> dict:
    return onboard(_cfg(), model="m-new", serving={"path": "/models/m-new"}, cost=0.5, url=service.url, timeout_s=60, poll_s=0, say=said.append)


def test_onboard_posts_once_and_follows_the_states_to_ready():
    rows = [_row("deploying"), _row("deploying"), (503, {}), _row("profiling", 0), _row("profiling", 2, resumed=2), _row("ready", 4)]
    service, said = _Service((202, {"model": "m-new", "state": "deploying"}), rows), []
    try:
        out = _onboard(service, said)
    finally:
        service.close()
    assert out["state"] == "ready" and out["routable"] and out["seconds"] >= 0
    posts = [g for g in service.got if g[0] == "POST"]
    assert posts == [("POST", "/admin/models", f"Bearer {KEY}", {"model": "m-new", "serving": {"path": "/models/m-new"}, "cost": 0.5})]
    steps = [s.split(" at ")[0] for s in said]  # a 503 (the registry restarting) is waited out; each change is said once
    assert steps == ["onboard: m-new: deploying (POST answered 202)", "onboard: m-new: deploying", "onboard: m-new: profiling 0/4 graded",
                     "onboard: m-new: profiling 2/4 graded (2 resumed from written outcomes)", "onboard: m-new: ready"]


@pytest.mark.parametrize(
    "post, rows, match",
    [
        ((400, {"error": {"message": "cannot be profiled on the router's anchors", "param": "profile"}}), [_row("ready")],
         "refused 'm-new' with 400: cannot be profiled.*param profile"),
        ((202, {"state": "deploying"}), [_row("deploying"), (200, {**_row("failed")[1], "error": "deploying: no such model"})],
         "failed: deploying: no such model.*POST it again"),
        ((202, {"state": "deploying"}), [(404, {})], "left the pool"),
    ],
)
def test_onboard_says_why_it_stopped(post, rows, match):
    service = _Service(post, rows)
    try:
        with pytest.raises(OnboardError, match=match):
            _onboard(service, [])
    finally:
        service.close()


def test_no_service_is_a_clear_error():
    with pytest.raises(OnboardError, match="no service answers at http://127.0.0.1:9"):
        onboard(_cfg(), model="m-new", serving={"path": "/x"}, cost=None, url="http://127.0.0.1:9", timeout_s=1, poll_s=0, say=print)


def test_router_anchors_writes_anchors_parquet_and_names_what_cannot_be_graded(tmp_path, capsys):
    """For a router directory written before anchors.parquet: the anchors' rows from its dataset."""
    from dataclasses import asdict

    import pyarrow as pa

    from icl_router import schemas as S
    from icl_router.cli import main
    from icl_router.data.dataset import Dataset
    from icl_router.model.router_dir import META_FILE, RouterMeta, read_anchor_queries

    ids = ["q0", "q1", "q2"]
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / META_FILE).write_text(json.dumps(asdict(RouterMeta("emb", 4, "vector", "pairs", 1, 2, 3, ["q2", "q0"]))))
    Dataset(tmp_path / "ds").write_queries(pa.table({
        S.QUERY_ID: ids, S.TEXT: ["a", "b", "c"], S.TASK: ["t"] * 3, S.SPLIT: ["train"] * 3,
        S.GOLD: ["1", None, "3"], S.GRADER: ["exact_match", "exact_match", "gsm8k"],
    }))
    main(["router-anchors", "--router", str(tmp_path / "router"), "--dataset", str(tmp_path / "ds")])
    out = json.loads(capsys.readouterr().out)
    assert out["anchors"] == 2 and out["cannot_grade"] is None
    assert read_anchor_queries(tmp_path / "router").column(S.GOLD).to_pylist() == ["3", "1"]
    (tmp_path / "router" / META_FILE).write_text(json.dumps(asdict(RouterMeta("emb", 4, "vector", "pairs", 1, 2, 3, ["q1"]))))
    main(["router-anchors", "--router", str(tmp_path / "router"), "--dataset", str(tmp_path / "ds")])
    why = json.loads(capsys.readouterr().out)["cannot_grade"]
    assert "1 of the router's 1 anchors cannot be graded" in why and "q1 (grader='exact_match', no gold)" in why
