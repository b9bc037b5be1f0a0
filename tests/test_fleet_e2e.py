"""End to end on the CPU vLLM: `peftdeploy up` of the demo fleet (recipes/demo-fleet.yaml: pirate merged on an
engine of its own, json + shout on a multi-LoRA engine) behind vllm-router.

The one test module that starts two vLLM engines at once (the product's behaviour: a fleet); both run the
135M demo model with max_num_seqs 4, vLLM-eager (serving.extra_args.enforce_eager added to the shipped
recipe). Every request through the router is answered by the engine of its model (each engine's own
peftdeploy_requests_total says which one answered) with the greedy tokens of the PEFT/transformers reference;
the router lists every model; `status` shows each group; a killed engine is reported by `status`, its models
are refused by the router (an error, fast) while the others still answer; `down` leaves no process behind.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import E2E_PORTS, EAGER_LORA, ROOT, cli_env, peftdeploy_cmd, start_detached
from tests.test_up_e2e import REF_SCRIPT

pytestmark = pytest.mark.slow

FLEET = ROOT / "recipes" / "demo-fleet.yaml"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]
MAX_TOKENS = 16


def _free_run(n: int = 3) -> int:
    """A port p with p .. p+n-1 free (the router and its engines), in the e2e range."""
    slots = max(1, (len(E2E_PORTS) - n + 1) // n)
    for p in range(E2E_PORTS.start + (os.getpid() % slots) * n, E2E_PORTS.stop - n + 1):
        ok = True
        for q in range(p, p + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
                    break
        if ok:
            return p
    raise RuntimeError("no free port run")


@pytest.fixture(scope="module")
def reference(demo_model_dir, tmp_path_factory) -> dict:
    from peftdeploy.plan import make_plan
    from peftdeploy.recipe import load_recipe

    spec = make_plan(load_recipe(ROOT / "recipes" / "demo.yaml")).launch
    paths = {a.name: a.path for a in spec.adapters}
    script = tmp_path_factory.mktemp("ref") / "ref.py"
    script.write_text(REF_SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(demo_model_dir), json.dumps(paths), json.dumps(PROMPTS),
                        "[]", str(MAX_TOKENS)], env=cli_env(), capture_output=True, text=True, timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            ref = json.loads(line[7:])
            ref["demo-fleet"] = ref.pop("__base__")
            return ref
    raise AssertionError(p.stderr[-4000:])


@pytest.fixture(scope="module")
def fleet(demo_model_dir, tmp_path_factory):
    # routing is the subject, not vLLM's compile: both engines eager (the merged pirate engine's compile is 25-60 s
    # of the start here); the recipe is demo-fleet.yaml as shipped plus serving.extra_args.enforce_eager
    recipe = tmp_path_factory.mktemp("fleet") / FLEET.name
    recipe.write_text(f"apiVersion: peftdeploy/v1\nextends: {FLEET}\nserving: {{extra_args: {{enforce_eager: true}}}}\n")
    t0 = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        for k in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            mp.delenv(k, raising=False)  # a test worker's own (conftest): the fleet binds its engines itself
        for k, v in EAGER_LORA.items():  # routing is the subject, not the LoRA model (conftest.EAGER_LORA)
            mp.setenv(k, v)
        d = start_detached(recipe, port=_free_run(), timeout=1200)
    d.extra["up_seconds"] = time.monotonic() - t0
    yield d
    d.down()


def _eos(model_dir: Path) -> set[int]:
    e = json.loads((Path(model_dir) / "generation_config.json").read_text()).get("eos_token_id")
    return set(e if isinstance(e, list) else [e])


def _complete(base: str, model: str, prompt: str) -> httpx.Response:
    return httpx.post(f"{base}/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})


def _counts(port: int) -> dict[str, float]:
    from peftdeploy.launch.metrics import parse_prometheus, requests_by_model

    return requests_by_model(parse_prometheus(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)) or {}


def _status() -> dict:
    p = subprocess.run(peftdeploy_cmd("status", "demo-fleet", "--json"), env=cli_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["deployments"][0]


def test_fleet_routes_by_model(fleet, reference, demo_model_dir):
    info = fleet.info
    assert info["mode"] == "fleet" and set(info["models"]) == {"demo-fleet", "pirate", "json", "shout"}
    eng = {e["group"]: e for e in info["engines"]}
    assert set(eng) == {"demo-fleet-pirate", "demo-fleet-lora"}
    assert eng["demo-fleet-pirate"]["models"] == ["pirate"] and eng["demo-fleet-pirate"]["kind"] == "merged"
    assert eng["demo-fleet-lora"]["models"] == ["demo-fleet", "json", "shout"]
    if len(os.sched_getaffinity(0)) >= 2:  # each CPU engine on cores of its own (plan.fleet.assign_cpu_cores)
        cores = [set(e["devices"].split(",")) for e in eng.values()]
        assert all(cores) and not cores[0] & cores[1], cores
    # the router lists every model of every group (vllm-router's multi-model /v1/models: {"models": [...]})
    listed = httpx.get(fleet.base_url + "/models", timeout=10).json()
    assert set(listed.get("models") or [m["id"] for m in listed["data"]]) == set(info["models"])

    before = {g: _counts(e["port"]) for g, e in eng.items()}
    eos = _eos(demo_model_dir)
    for model in ("pirate", "json", "shout", "demo-fleet"):
        for i, prompt in enumerate(PROMPTS):
            r = _complete(fleet.base_url, model, prompt)
            assert r.status_code == 200, r.text
            got = [t for t in r.json()["choices"][0]["token_ids"] if t not in eos]
            want = [t for t in reference[model]["completions"][i] if t not in eos]
            assert got == want, (model, prompt)
    # which engine answered: each engine counts the requests it served, per model
    after = {g: _counts(e["port"]) for g, e in eng.items()}
    served = {g: {m: after[g].get(m, 0) - before[g].get(m, 0) for m in info["models"]} for g in eng}
    assert served["demo-fleet-pirate"] == {"pirate": 2, "json": 0, "shout": 0, "demo-fleet": 0}
    assert served["demo-fleet-lora"] == {"pirate": 0, "json": 2, "shout": 2, "demo-fleet": 2}

    st = _status()
    assert st["health"] == "ok" and {e["group"]: e["health"] for e in st["engines"]} == {
        "demo-fleet-pirate": "ok", "demo-fleet-lora": "ok"}


def test_killed_engine_is_reported_and_refused(fleet):
    import psutil

    eng = {e["group"]: e for e in fleet.info["engines"]}
    lora = eng["demo-fleet-lora"]
    os.killpg(lora["pgid"], signal.SIGKILL)
    end = time.monotonic() + 30
    while time.monotonic() < end and psutil.pid_exists(lora["pid"]) and \
            psutil.Process(lora["pid"]).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.2)
    st = _status()
    by = {e["group"]: e for e in st["engines"]}
    assert st["health"] == "degraded"
    assert by["demo-fleet-lora"]["alive"] is False and "dead" in by["demo-fleet-lora"]["health"]
    assert by["demo-fleet-pirate"]["health"] == "ok"
    t0 = time.monotonic()
    r = _complete(fleet.base_url, "json", PROMPTS[0])
    assert r.status_code >= 500 and time.monotonic() - t0 < 30  # refused, not hanging
    assert _complete(fleet.base_url, "pirate", PROMPTS[0]).status_code == 200  # the other group still answers
    p = fleet.down()
    assert p.returncode == 0, p.stderr
    for e in fleet.info["engines"]:
        assert not psutil.pid_exists(e["pid"]) or psutil.Process(e["pid"]).status() == psutil.STATUS_ZOMBIE
    router = fleet.info["router"]["pid"]
    assert not psutil.pid_exists(router) or psutil.Process(router).status() == psutil.STATUS_ZOMBIE
