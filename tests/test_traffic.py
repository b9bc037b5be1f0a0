"""Requests per served model name: the ASGI middleware vLLM's API server loads (peftdeploy.vllm_plugin.traffic),
/metrics parsing into requests_by_model / observed_shares, `status`, and `plan --observed`."""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Counter, generate_latest

from peftdeploy.launch import metrics as mx
from peftdeploy.plan.spec import MODEL_NAMES_ENV, TRAFFIC_MIDDLEWARE
from peftdeploy.vllm_plugin import traffic as tr

NAMES = ["demo", "pirate", "json"]


def _counter() -> tuple[Counter, CollectorRegistry]:
    reg = CollectorRegistry()
    return Counter(tr.METRIC, "test", ["model"], registry=reg), reg


def _count(c: Counter, model: str) -> float:
    return c.labels(model=model)._value.get()


class Recorder:
    """A tiny ASGI app: records every message it receives, then sends `response` messages."""

    def __init__(self, response: list[dict] | None = None, read_body: bool = True):
        self.received: list[dict] = []
        self.receive_fn = None
        self.read_body = read_body
        self.response = response if response is not None else [
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
            {"type": "http.response.body", "body": b'{"ok": true}'}]

    async def __call__(self, scope, receive, send):
        self.receive_fn = receive
        if self.read_body:
            while True:
                m = await receive()
                self.received.append(m)
                if m["type"] != "http.request" or not m.get("more_body"):
                    break
        for m in self.response:
            await send(m)


def _run(mw, messages: list[dict], *, path: str = "/v1/completions", method: str = "POST",
         content_type: bytes | None = b"application/json", extra_headers=()) -> tuple[list[dict], object]:
    queue = list(messages)
    sent: list[dict] = []

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # a real server blocks until the client sends more

    async def send(m):
        sent.append(m)

    headers = [(b"content-type", content_type)] if content_type else []
    headers += list(extra_headers)
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    asyncio.run(mw(scope, receive, send))
    return sent, receive


def _body(obj, chunks: int = 1) -> list[dict]:
    data = json.dumps(obj).encode()
    step = max(1, -(-len(data) // chunks))
    parts = [data[i:i + step] for i in range(0, len(data), step)]
    return [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]


# ------------------------------------------------------------------------------------ middleware
def test_body_replayed_exactly_and_counted():
    c, _ = _counter()
    app = Recorder()
    mw = tr.TrafficMiddleware(app, NAMES, counter=c)
    msgs = _body({"model": "pirate", "prompt": "x" * 1000, "max_tokens": 3}, chunks=3)
    assert len(msgs) == 3
    sent, _ = _run(mw, msgs)
    assert app.received == msgs  # the same messages, same order, same more_body flags
    assert sent == app.response
    assert _count(c, "pirate") == 1 and _count(c, "demo") == 0 and _count(c, tr.OTHER) == 0
    _run(mw, _body({"model": "pirate", "prompt": "y"}))
    assert _count(c, "pirate") == 2


def test_every_label_exists_from_the_start():
    c, reg = _counter()
    tr.TrafficMiddleware(Recorder(), NAMES, counter=c)
    text = generate_latest(reg).decode()
    for n in [*NAMES, "__other__"]:
        assert f'peftdeploy_requests_total{{model="{n}"}} 0.0' in text


def test_streaming_response_passes_through():
    c, _ = _counter()
    chunks = [{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}]
    chunks += [{"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True} for i in range(5)]
    chunks.append({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    app = Recorder(response=chunks)
    sent, _ = _run(tr.TrafficMiddleware(app, NAMES, counter=c),
                   _body({"model": "json", "messages": [], "stream": True}, chunks=2), path="/v1/chat/completions")
    assert sent == chunks
    assert _count(c, "json") == 1  # once per request, not per chunk


def test_unknown_and_missing_model():
    c, _ = _counter()
    mw = tr.TrafficMiddleware(Recorder(), NAMES, counter=c)
    _run(mw, _body({"model": "nope", "prompt": "x"}))
    _run(mw, _body({"model": ["pirate"], "prompt": "x"}))  # not a string
    assert _count(c, "__other__") == 2 and _count(c, "pirate") == 0
    _run(mw, _body({"prompt": "x"}))  # vLLM serves the base model when model is absent
    _run(mw, _body({"model": None, "prompt": "x"}))
    assert _count(c, "demo") == 2
    mw0 = tr.TrafficMiddleware(Recorder(), [], counter=c)  # no names known: all are "__other__"
    _run(mw0, _body({"model": "pirate"}))
    _run(mw0, _body({"prompt": "x"}))
    assert _count(c, "__other__") == 4 and _count(c, "pirate") == 0


@pytest.mark.parametrize("ctype", [b"text/plain", b"multipart/form-data; boundary=x"])
def test_non_json_passes_through_untouched(ctype):
    c, _ = _counter()
    app = Recorder()
    msgs = [{"type": "http.request", "body": b'{"model": "pirate"}', "more_body": False}]
    sent, receive = _run(tr.TrafficMiddleware(app, NAMES, counter=c), msgs, content_type=ctype)
    assert app.receive_fn is receive  # not even wrapped: the body was never read by the middleware
    assert app.received == msgs and sent == app.response
    assert _count(c, "pirate") == 0 and _count(c, "__other__") == 1  # a request all the same


def test_json_with_charset_and_no_content_type_are_parsed():
    c, _ = _counter()
    mw = tr.TrafficMiddleware(Recorder(), NAMES, counter=c)
    _run(mw, _body({"model": "pirate"}), content_type=b"application/json; charset=utf-8")
    _run(mw, _body({"model": "pirate"}), content_type=None)
    assert _count(c, "pirate") == 2


@pytest.mark.parametrize("path,method", [("/v1/models", "GET"), ("/metrics", "GET"), ("/v1/load_lora_adapter", "POST"),
                                         ("/v1/completions", "GET")])
def test_other_routes_untouched(path, method):
    c, _ = _counter()
    app = Recorder()
    msgs = _body({"model": "pirate"})
    sent, receive = _run(tr.TrafficMiddleware(app, NAMES, counter=c), msgs, path=path, method=method)
    assert app.receive_fn is receive and app.received == msgs and sent == app.response
    assert sum(_count(c, n) for n in [*NAMES, "__other__"]) == 0


def test_large_body_is_not_buffered_beyond_the_cap():
    c, _ = _counter()
    app = Recorder()
    mw = tr.TrafficMiddleware(app, NAMES, max_body_bytes=64, counter=c)
    msgs = _body({"model": "pirate", "prompt": "z" * 500}, chunks=10)
    _run(mw, msgs)
    assert app.received == msgs  # the first chunks replayed, the rest straight from the client
    assert _count(c, "__other__") == 1 and _count(c, "pirate") == 0
    # a declared content-length over the cap: not read at all
    app2 = Recorder()
    sent, receive = _run(tr.TrafficMiddleware(app2, NAMES, max_body_bytes=64, counter=c), msgs,
                         extra_headers=[(b"content-length", b"520")])
    assert app2.receive_fn is receive and app2.received == msgs
    assert _count(c, "__other__") == 2


def test_bad_json_and_disconnect():
    c, _ = _counter()
    app = Recorder()
    mw = tr.TrafficMiddleware(app, NAMES, counter=c)
    bad = [{"type": "http.request", "body": b'{"model": "pir', "more_body": False}]
    _run(mw, bad)
    assert app.received == bad and _count(c, "__other__") == 1
    deep = [{"type": "http.request", "body": b"[" * 100000 + b"]" * 100000, "more_body": False}]
    app = Recorder()
    _run(tr.TrafficMiddleware(app, NAMES, counter=c), deep)
    assert app.received == deep and _count(c, "__other__") == 2
    # the client goes away mid-body: the app sees the same disconnect; no response, nothing counted
    app = Recorder(response=[])
    msgs = [{"type": "http.request", "body": b'{"model": ', "more_body": True}, {"type": "http.disconnect"}]
    sent, _ = _run(tr.TrafficMiddleware(app, NAMES, counter=c), msgs)
    assert app.received == msgs and sent == [] and _count(c, "pirate") == 0 and _count(c, "__other__") == 2


@pytest.mark.parametrize("status,counted", [(200, 1), (201, 1), (400, 0), (401, 0), (404, 0), (500, 0)])
def test_only_successful_requests_are_counted(status, counted):
    c, _ = _counter()
    app = Recorder(response=[{"type": "http.response.start", "status": status, "headers": []},
                             {"type": "http.response.body", "body": b"{}"}])
    _run(tr.TrafficMiddleware(app, NAMES, counter=c), _body({"model": "pirate"}))
    assert _count(c, "pirate") == counted


def test_counter_failure_never_breaks_a_request():
    class Broken:
        def labels(self, **kw):
            raise RuntimeError("boom")

    app = Recorder()
    mw = tr.TrafficMiddleware(app, NAMES, counter=Broken())  # init fails: counting is off
    msgs = _body({"model": "pirate"})
    sent, receive = _run(mw, msgs)
    assert app.received == msgs and sent == app.response and app.receive_fn is receive

    class BreaksOnInc:
        def labels(self, **kw):
            return self

        def inc(self):
            raise RuntimeError("boom")

    app = Recorder()
    sent, _ = _run(tr.TrafficMiddleware(app, NAMES, counter=BreaksOnInc()), msgs)
    assert app.received == msgs and sent == app.response


def test_default_registry_and_import_path():
    """vLLM imports the class by the path `up` plans, and /metrics serves prometheus_client's default
    registry (single API-server process): the counter lives there."""
    import importlib

    from prometheus_client import REGISTRY

    mod, _, cls = TRAFFIC_MIDDLEWARE.rpartition(".")
    assert getattr(importlib.import_module(mod), cls) is tr.TrafficMiddleware
    assert tr.requests_counter() is tr.requests_counter()
    mw = tr.TrafficMiddleware(Recorder(), ["zz-default-test"])
    before = REGISTRY.get_sample_value("peftdeploy_requests_total", {"model": "zz-default-test"})
    assert before is not None
    _run(mw, _body({"model": "zz-default-test"}))
    assert REGISTRY.get_sample_value("peftdeploy_requests_total", {"model": "zz-default-test"}) == before + 1


def test_starlette_app_with_streaming_and_large_body():
    """Through a real Starlette app (what vLLM's FastAPI app is built on): the handler reads the
    exact JSON body; a streamed response arrives intact."""
    pytest.importorskip("starlette")
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    seen: list[bytes] = []

    async def completions(request: Request):
        body = await request.body()
        seen.append(body)
        if json.loads(body).get("stream"):
            async def gen():
                for i in range(4):
                    yield f"data: {i}\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        return JSONResponse({"n": len(body)})

    c, _ = _counter()
    app = tr.TrafficMiddleware(Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]),
                               NAMES, max_body_bytes=1 << 20, counter=c)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            big = json.dumps({"model": "pirate", "prompt": "w" * (3 << 20)}).encode()  # over the cap
            r1 = await client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
            small = json.dumps({"model": "json", "prompt": "hi", "stream": True}).encode()
            r2 = await client.post("/v1/completions", content=small, headers={"content-type": "application/json"})
            return big, r1, small, r2

    big, r1, small, r2 = asyncio.run(go())
    assert seen == [big, small]
    assert r1.json() == {"n": len(big)}
    assert r2.text == "".join(f"data: {i}\n\n" for i in range(4))
    assert _count(c, "__other__") == 1 and _count(c, "json") == 1 and _count(c, "pirate") == 0


def test_model_names_from_env(tmp_path):
    assert tr.model_names_from_env({MODEL_NAMES_ENV: "demo, pirate,,json"}) == ["demo", "pirate", "json"]
    root = Path(__file__).resolve().parents[1]
    assert tr.model_names_from_env({"PEFTDEPLOY_RECIPE": str(root / "recipes" / "demo.yaml")}) == \
        ["demo", "pirate", "json", "shout"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: nope\n")
    assert tr.model_names_from_env({"PEFTDEPLOY_RECIPE": str(bad)}) == []
    assert tr.model_names_from_env({}) == []


# --------------------------------------------------------------------------------------- metrics
TRAFFIC_METRICS = """\
# HELP peftdeploy_requests_total Requests
# TYPE peftdeploy_requests_total counter
peftdeploy_requests_total{model="demo"} 2.0
peftdeploy_requests_total{model="pirate"} 14.0
peftdeploy_requests_total{model="json"} 4.0
peftdeploy_requests_total{model="shout"} 0.0
peftdeploy_requests_total{model="__other__"} 0.0
peftdeploy_requests_created{model="demo"} 1.7e+09
vllm:num_requests_running{engine="0",model_name="demo"} 0.0
"""


def test_snapshot_requests_and_shares():
    snap = mx.snapshot(TRAFFIC_METRICS, ["pirate", "json", "shout"])
    assert snap.requests_by_model == {"demo": 2, "pirate": 14, "json": 4, "shout": 0, "__other__": 0}
    assert snap.observed_shares == {"demo": 0.1, "pirate": 0.7, "json": 0.2, "shout": 0.0, "__other__": 0.0}
    assert snap.per_adapter["pirate"] == {"running": False, "waiting": False, "requests": 14, "share": 0.7}
    assert snap.per_adapter["shout"]["requests"] == 0 and snap.per_adapter["shout"]["share"] == 0
    d = snap.to_dict()
    assert json.loads(json.dumps(d))["requests_by_model"]["pirate"] == 14
    # two API-server processes (multiprocess exposition may carry a pid label): summed per model
    two = 'peftdeploy_requests_total{model="a",pid="1"} 1.0\npeftdeploy_requests_total{model="a",pid="2"} 2.0\n'
    assert mx.snapshot(two).requests_by_model == {"a": 3}
    # without the middleware: None (not zero); all zero: no shares
    none = mx.snapshot('vllm:num_requests_running{engine="0",model_name="m"} 0.0\n', ["a"])
    assert none.requests_by_model is None and none.observed_shares is None
    assert none.per_adapter["a"] == {"running": False, "waiting": False, "requests": None, "share": None}
    zero = mx.snapshot('peftdeploy_requests_total{model="a"} 0.0\n', ["a"])
    assert zero.requests_by_model == {"a": 0} and zero.observed_shares is None


def test_traffic_from_requests_per_mode():
    counts = {"demo": 2, "pirate": 14, "json": 4, "shout": 0, "__other__": 5}
    ads = ["pirate", "json", "shout"]
    shares, n, left = mx.traffic_from_requests(counts, recipe_name="demo", served_model_name="demo", mode="serve",
                                               adapter_names=ads)
    assert shares == {"base": 0.1, "pirate": 0.7, "json": 0.2, "shout": 0.0} and n == 20 and left == {"__other__": 5}
    # hybrid: the hot adapter is the served model, the recipe's name is the base (an exact delta)
    h = {"pirate": 14, "demo": 2, "json": 4}
    shares, n, _ = mx.traffic_from_requests(h, recipe_name="demo", served_model_name="pirate", mode="hybrid",
                                            merge_adapters=["pirate"], adapter_names=ads)
    assert shares == {"pirate": 0.7, "base": 0.1, "json": 0.2} and n == 20
    # merge: the served (merged) model is the merged adapter; adapters served on top are themselves
    shares, n, _ = mx.traffic_from_requests({"demo": 9, "json": 1}, recipe_name="demo", served_model_name="demo",
                                            mode="merge", merge_adapters=["pirate"], adapter_names=ads)
    assert shares == {"pirate": 0.9, "json": 0.1} and n == 10
    with pytest.raises(ValueError, match="pirate, json"):
        mx.traffic_from_requests({"demo": 3}, recipe_name="demo", served_model_name="demo", mode="merge",
                                 merge_adapters=["pirate", "json"], adapter_names=ads)
    # names the recipe no longer has are left out
    shares, n, left = mx.traffic_from_requests({"demo": 1, "gone": 3}, recipe_name="demo", served_model_name="demo",
                                               mode="serve", adapter_names=ads)
    assert shares == {"base": 1.0} and n == 1 and left == {"gone": 3}


# -------------------------------------------------------------------------------- status, plan --observed
class _Metrics(http.server.BaseHTTPRequestHandler):
    text = ""

    def do_GET(self):  # noqa: N802
        body = {"/metrics": self.text.encode(), "/health": b"",
                "/v1/models": json.dumps({"data": [{"id": n} for n in ["demo", "pirate", "json", "shout"]]}).encode()
                }.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_server(tmp_path, monkeypatch, demo_model_dir):
    """A fake deployment of recipes/demo.yaml (state file + an HTTP server answering /metrics)."""
    from peftdeploy.launch import state as st

    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PEFTDEPLOY_DEMO_DIR", str(demo_model_dir.parent))  # the built demo model
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def deploy(text: str, **kw):
        _Metrics.text = text
        st.write_state(st.DeploymentState(
            name="demo", pid=os.getpid(), pgid=os.getpgid(0), host="127.0.0.1", port=srv.server_address[1],
            log_path=str(tmp_path / "x.log"), model_names=["demo", "pirate", "json", "shout"],
            served_model_name=kw.pop("served_model_name", "demo"), adapters=["pirate", "json", "shout"],
            ready_at=1.0, **kw))

    yield deploy
    srv.shutdown()


ROOT = Path(__file__).resolve().parents[1]


def test_status_shows_requests_and_shares(fake_server):
    from peftdeploy.commands.serve_cmds import status_cmd

    fake_server(TRAFFIC_METRICS)
    r = CliRunner().invoke(status_cmd, ["demo", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)["deployments"][0]["metrics"]
    assert m["requests_by_model"]["pirate"] == 14 and m["observed_shares"]["pirate"] == 0.7
    assert m["per_adapter"]["json"]["requests"] == 4
    r = CliRunner().invoke(status_cmd, ["demo"], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln.split() for ln in r.output.splitlines() if ln.strip()}
    assert "requests" in lines["model"] and "share" in lines["model"]
    assert lines["pirate"][-2:] == ["14", "0.70"] and lines["demo"][-2:] == ["2", "0.10"]
    assert lines["shout"][-2:] == ["0", "0.00"]


def _plan(args):
    from peftdeploy.commands.plan_cmd import plan_cmd

    return CliRunner().invoke(plan_cmd, args, env={"COLUMNS": "200"})


def test_plan_observed_replaces_traffic(fake_server, tmp_path):
    rec = tmp_path / "auto.yaml"
    rec.write_text(f"apiVersion: peftdeploy/v1\nextends: {ROOT / 'recipes' / 'demo.yaml'}\npolicy:\n  mode: auto\n"
                   "  traffic: {pirate: 0.2, json: 0.4, shout: 0.4}\n")
    # all requests to one adapter and none to the base: auto merges it
    fake_server('peftdeploy_requests_total{model="demo"} 0.0\npeftdeploy_requests_total{model="pirate"} 30.0\n'
                'peftdeploy_requests_total{model="json"} 0.0\npeftdeploy_requests_total{model="__other__"} 2.0\n')
    r = _plan([str(rec), "--observed", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "traffic: observed from the running deployment (30 requests): pirate 1.00, base 0.00, json 0.00" in r.output
    assert "left out (not models of this recipe): __other__ 2" in r.output
    assert "replaces the recipe's policy.traffic: pirate 0.2, json 0.4, shout 0.4" in r.output
    assert "mode: merge" in r.output and "sends all requests to pirate" in r.output
    r = _plan([str(rec), "--observed", "--device", "cpu", "--json"])
    d = json.loads(r.output)
    assert d["mode"] == "merge" and d["merge_adapters"] == ["pirate"]
    assert d["traffic"]["shares"] == {"base": 0.0, "pirate": 1.0, "json": 0.0} and d["traffic"]["requests"] == 30
    # without --observed the recipe's own traffic decides
    assert json.loads(_plan([str(rec), "--device", "cpu", "--json"]).output)["mode"] == "serve"
    # spread traffic: served
    fake_server(TRAFFIC_METRICS)
    d = json.loads(_plan([str(rec), "--observed", "--device", "cpu", "--json"]).output)
    assert d["mode"] == "serve" and d["traffic"]["shares"] == {"base": 0.1, "pirate": 0.7, "json": 0.2, "shout": 0.0}


def test_plan_observed_errors(fake_server, tmp_path, monkeypatch):
    demo = str(ROOT / "recipes" / "demo.yaml")
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "empty-cache"))
    r = _plan([demo, "--observed", "--device", "cpu"])
    assert r.exit_code == 2 and "no deployment of recipe 'demo' is running" in r.output
    assert "fix: start it with `peftdeploy up" in r.output and "Traceback" not in r.output
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "cache"))
    fake_server('vllm:num_requests_running{engine="0",model_name="demo"} 0.0\n')  # started without the middleware
    r = _plan([demo, "--observed", "--device", "cpu"])
    assert r.exit_code == 2 and "does not export peftdeploy_requests_total" in r.output and "peftdeploy down demo" in r.output
    fake_server('peftdeploy_requests_total{model="demo"} 0.0\npeftdeploy_requests_total{model="__other__"} 3.0\n')
    r = _plan([demo, "--observed", "--device", "cpu", "--json"])
    assert r.exit_code == 2
    e = json.loads(r.output)["errors"][0]
    assert "counted no requests for this recipe's models yet" in e["error"] and "__other__ 3" in e["error"]
    assert e["file"] == demo
    # a merge of two adapters: its requests cannot be split between them
    fake_server('peftdeploy_requests_total{model="demo"} 5.0\n', mode="merge", merge_adapters=["pirate", "json"])
    r = _plan([demo, "--observed", "--device", "cpu"])
    assert r.exit_code == 2 and "cannot be attributed to one adapter" in r.output and "policy.traffic" in r.output


# ------------------------------------------------------------------------------ issue 16, item 9
def test_catalog_adapters_and_invocations_are_counted(monkeypatch):
    """An adapter the resolver loaded on demand is counted under its name (not __other__); so are SageMaker
    /invocations, by body model or the adapter header."""
    import peftdeploy.vllm_plugin as plugin

    class Core:
        resolved_names = {"from-catalog"}

    monkeypatch.setitem(plugin._state, "core", Core())
    c, _ = _counter()
    mw = tr.TrafficMiddleware(Recorder(), NAMES, counter=c)
    _run(mw, _body({"model": "from-catalog", "prompt": "x"}))
    _run(mw, _body({"model": "never-resolved", "prompt": "x"}))
    _run(mw, _body({"model": "pirate", "prompt": "x"}), path="/invocations")
    _run(mw, _body({"prompt": "x"}), path="/invocations",
         extra_headers=[(b"X-Amzn-SageMaker-Adapter-Identifier", b"json")])
    assert _count(c, "from-catalog") == 1 and _count(c, "__other__") == 1
    assert _count(c, "pirate") == 1 and _count(c, "json") == 1


@pytest.mark.parametrize("field", ["n", "best_of"])
def test_n_above_the_cap_is_refused(monkeypatch, field):
    monkeypatch.setenv("PEFTDEPLOY_MAX_N", "8")
    c, _ = _counter()
    app = Recorder()
    sent, _ = _run(tr.TrafficMiddleware(app, NAMES, counter=c), _body({"model": "pirate", field: 10000}))
    assert sent[0]["status"] == 400 and b"at most 8" in sent[1]["body"] and app.received == []
    sent, _ = _run(tr.TrafficMiddleware(Recorder(), NAMES, counter=c), _body({"model": "pirate", field: 8}))
    assert sent[0]["status"] == 200
