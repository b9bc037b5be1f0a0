"""The API key locks every route the vLLM server exposes (issue 16, item 1).

The app is the one vLLM's own server builds (`build_app`) from the argv and environment `plan` gives
`up`, so the routes are enumerated from the real app (`app.routes`), not from a fixed list: with
``serving.api_key`` every route but ``/health`` answers 401 without the key and with a wrong one, and the
runtime adapter-management routes (opened by ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, which the catalog
resolver needs) are refused even with the key.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from hubcache import TINY_LLAMA, write_adapter, write_model
from peftdeploy.plan import make_plan
from peftdeploy.recipe import load_recipe

pytest.importorskip("vllm")

KEY = "s3cret-key"


@pytest.fixture(autouse=True)
def _plugin_state_restored():
    """vLLM's build_app loads the general plugins: peftdeploy's registers its resolver in vLLM's global
    registry from the planned env (PEFTDEPLOY_RECIPE). Leave the registry and the plugin as they were."""
    from vllm.lora.resolver import LoRAResolverRegistry

    from peftdeploy import vllm_plugin

    saved, state = dict(LoRAResolverRegistry.resolvers), dict(vllm_plugin._state)
    yield
    LoRAResolverRegistry.resolvers.clear()
    LoRAResolverRegistry.resolvers.update(saved)
    vllm_plugin._state.clear()
    vllm_plugin._state.update(state)


def _planned_app(tmp: Path, monkeypatch: pytest.MonkeyPatch, key: str = KEY, serving: str = ""):
    write_model(tmp / "m", TINY_LLAMA, weights=True)
    write_adapter(tmp / "a0", TINY_LLAMA, r=8, base_model="org/tiny")
    p = tmp / "r.yaml"
    p.write_text("apiVersion: peftdeploy/v1\nname: t\nbackbone: {model: ./m, max_model_len: 256}\n"
                 "adapters:\n  - {name: a0, source: ./a0}\nserving:\n  api_key: ${GUARD_TEST_KEY}\n" + serving)
    monkeypatch.setenv("GUARD_TEST_KEY", key)
    spec = make_plan(load_recipe(p), device="cpu", host_memory="16GiB").launch
    for k, v in spec.env:
        monkeypatch.setenv(k, v)
    for k, ref in spec.secret_env:
        monkeypatch.setenv(k, os.environ.get(ref, ""))  # what `up` does
    assert dict(spec.env)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"  # dynamic loading: the worst case
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = spec.argv()
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", argv[2], *argv[3:]])
    return build_app(args, ("generate",))


def _requests(app) -> list[tuple[str, str]]:
    out = []
    for r in app.routes:
        path = re.sub(r"\{[^}]+\}", "x", getattr(r, "path", ""))
        methods = getattr(r, "methods", None) or {"GET"}  # a Mount (/metrics): GET
        out += [(m, path) for m in sorted(methods) if m != "HEAD"]
    return out


def test_api_key_locks_every_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from peftdeploy.vllm_plugin.guard import is_adapter_route

    app = _planned_app(tmp_path, monkeypatch)
    reqs = _requests(app)
    paths = {p for _, p in reqs}
    assert {"/v1/completions", "/tokenize", "/invocations", "/adapters", "/metrics", "/health"} <= paths
    c = TestClient(app, raise_server_exceptions=False)  # no lifespan: no engine, handlers may fail (500)
    open_, leaks = [], []
    for method, path in reqs:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            st = c.request(method, path, headers=headers, json={}).status_code
            if path == "/health":
                open_.append(st)
            elif st != 401:
                leaks.append((method, path, headers, st))
        st = c.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, json={}).status_code
        if st == 401 or (is_adapter_route(path) and st != 403):
            leaks.append((method, path, "right key", st))
    assert leaks == []
    assert 401 not in open_
    assert len(reqs) >= 30, reqs  # the whole app, not a handful


def test_recipe_opens_metrics_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serving.public_metrics: true lets a scraper without the key read /metrics; nothing else opens."""
    from starlette.testclient import TestClient

    monkeypatch.delenv("PEFTDEPLOY_METRICS_PUBLIC", raising=False)
    app = _planned_app(tmp_path, monkeypatch, serving="  public_metrics: true\n")
    assert os.environ.get("PEFTDEPLOY_METRICS_PUBLIC") == "1"  # from the plan's server env
    c = TestClient(app, raise_server_exceptions=False)
    assert c.get("/metrics").status_code == 200
    assert c.post("/v1/completions", json={}).status_code == 401
    assert c.post("/tokenize", json={}).status_code == 401


def test_adapter_routes_closed_without_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No api_key: the inference routes are open (as asked), but nothing loads or unloads adapters."""
    from starlette.testclient import TestClient

    app = _planned_app(tmp_path, monkeypatch, key="")
    c = TestClient(app, raise_server_exceptions=False)
    assert c.post("/adapters", json={"name": "evil", "src": str(tmp_path)}).status_code == 403
    assert c.delete("/adapters/a0").status_code == 403
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(tmp_path)}).status_code == 403
    assert c.get("/health").status_code != 401


# ------------------------------------------------------------------------------------------------
# the running server: `up --detach` of the demo recipe with an api_key, routes from its /openapi.json
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_running_server_every_route_needs_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   e2e_up, demo_model_dir, request) -> None:
    import json as _json
    import socket
    import urllib.error
    import urllib.request

    from conftest import E2E_DEMO_RECIPE, EAGER_LORA

    monkeypatch.setenv("PD_E2E_GUARD_KEY", KEY)
    for k, v in EAGER_LORA.items():  # the guard is the subject, not the LoRA model (conftest.EAGER_LORA)
        monkeypatch.setenv(k, v)
    p = tmp_path / "guard.yaml"
    p.write_text(f"apiVersion: peftdeploy/v1\nextends: {E2E_DEMO_RECIPE}\nname: e2e-guard\n"
                 "serving: {host: 127.0.0.1, api_key: '${PD_E2E_GUARD_KEY}'}\n")
    port = next(pt for pt in range(18500, 18600) if socket.socket().connect_ex(("127.0.0.1", pt)) != 0)
    d = e2e_up(p, port=port)
    request.addfinalizer(d.down)  # ~4 GiB per vLLM server: not kept for the rest of the session
    root = d.base_url.rsplit("/v1", 1)[0]

    def call(method: str, path: str, key: str | None) -> int:
        req = urllib.request.Request(root + path, method=method, data=b"{}" if method in ("POST", "PUT") else None,
                                     headers={"content-type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    with urllib.request.urlopen(urllib.request.Request(root + "/openapi.json",
                                                       headers={"Authorization": f"Bearer {KEY}"}), timeout=30) as r:
        spec = _json.load(r)
    reqs = [(m.upper(), re.sub(r"\{[^}]+\}", "x", path)) for path, ops in spec["paths"].items() for m in ops]
    reqs += [("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/adapters"),
             ("DELETE", "/adapters/pirate")]
    assert len(reqs) >= 30 and ("POST", "/tokenize") in reqs and ("POST", "/invocations") in reqs
    leaks = []
    for method, path in reqs:
        for key in (None, "wrong"):
            st = call(method, path, key)
            if (st == 401) == (path == "/health"):
                leaks.append((method, path, key, st))
        st = call(method, path, KEY)
        if st == 401 or (path.startswith("/adapters") or "lora_adapter" in path) and st != 403:
            leaks.append((method, path, "right key", st))
    assert leaks == []
    assert call("GET", "/v1/models", KEY) == 200
