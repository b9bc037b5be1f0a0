"""End to end on the CPU vLLM with the demo assets: `peftdeploy up` serves what the recipe says, and
the outputs are exactly those of the PEFT/transformers reference (float32, greedy).

Server starts (~1 min each here) are kept to three for the module:
  * serve:  recipes/demo.yaml with max_loras 1 (so more adapters are in flight than LoRA slots),
            started with `up --detach`; models, completions, chat, batching, status, port-in-use;
  * merged: recipes/demo-merged.yaml (pirate merged) with `up --detach`, vLLM eager (--enforce-eager);
  * Ctrl-C: a second, foreground `up` of the merge recipe: reports a merge cache hit, is ready, gets
            SIGINT, and leaves no process of its group behind.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import E2E_DEMO_RECIPE, cli_env, free_e2e_port, peftdeploy_cmd

pytestmark = pytest.mark.slow

# The repo's demo recipes; PEFTDEPLOY_E2E_DEMO_RECIPE may point at another serve recipe on the demo model.
DEMO = E2E_DEMO_RECIPE
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "What is the largest planet in the solar system?",
]
CHAT_PROMPTS = ["What color is the sky?", "Who wrote Romeo and Juliet?"]
MAX_TOKENS = 20


# ------------------------------------------------------------------------------------ recipes
@pytest.fixture(scope="module")
def recipes(tmp_path_factory, e2e_serve_recipe) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("recipes")
    serve = e2e_serve_recipe  # conftest: DEMO in float32, max_loras 1, name e2e-serve (shared deployment)
    merged = d / "e2e-merged.yaml"
    merged.write_text(textwrap.dedent(f"""\
        apiVersion: peftdeploy/v1
        extends: {serve}
        name: e2e-merged
        policy: {{mode: merge, merge: {{adapters: [pirate]}}}}
        serving: {{max_loras: auto, extra_args: {{enforce_eager: true}}}}
        """))  # eager: the merged weights' tokens and the merge cache are the subject, not vLLM's compile (45-60 s)
    return {"serve": serve, "merged": merged}


@pytest.fixture(scope="module")
def serve(e2e_serve):
    return e2e_serve  # the session's deployment of recipes["serve"] (conftest), shared with test_hybrid.py


@pytest.fixture(scope="module")
def merged(recipes, e2e_up, demo_model_dir):
    d = e2e_up(recipes["merged"])
    yield d
    d.down()  # ~4 GiB per vLLM server: stop it with the module (the shared `serve` stays for the session)


@pytest.fixture(scope="module")
def adapters(serve) -> list[str]:
    return [m for m in serve.models if m != serve.info["base_model"]]


def _client(dep):
    from openai import OpenAI

    return OpenAI(base_url=dep.base_url, api_key="EMPTY", max_retries=0, timeout=300)


# --------------------------------------------------------------------------------- references
REF_SCRIPT = textwrap.dedent(r'''
    import json, os, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel

    model_dir, adapters, prompts, chats, n = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), \
        json.loads(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # one under xdist (conftest)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for name, path in [("__base__", None)] + list(adapters.items()):
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if path:
            m = PeftModel.from_pretrained(m, path)
        m.eval()
        res = {"completions": [], "chat": []}
        with torch.no_grad():
            for p in prompts:
                ids = tok(p, return_tensors="pt")
                g = m.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
                res["completions"].append(g[0][ids["input_ids"].shape[1]:].tolist())
            for p in chats:
                enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
                g = m.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
                res["chat"].append(tok.decode(g[0][enc["input_ids"].shape[1]:], skip_special_tokens=True))
        out[name] = res
    print("RESULT " + json.dumps(out), flush=True)
''')


@pytest.fixture(scope="module")
def reference(serve, demo_model_dir, tmp_path_factory) -> dict:
    """PEFT/transformers greedy tokens (float32) for the base model and each served adapter."""
    from peftdeploy.launch.state import read_state
    from peftdeploy.plan import make_plan
    from peftdeploy.recipe import load_recipe

    spec = make_plan(load_recipe(serve.recipe)).launch
    paths = {a.name: a.path for a in spec.adapters}
    script = tmp_path_factory.mktemp("ref") / "ref.py"
    script.write_text(REF_SCRIPT)
    p = subprocess.run([sys.executable, str(script), spec.model, json.dumps(paths), json.dumps(PROMPTS),
                        json.dumps(CHAT_PROMPTS), str(MAX_TOKENS)], env=cli_env(), capture_output=True, text=True,
                       timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            ref = json.loads(line[7:])
            ref[serve.info["base_model"]] = ref.pop("__base__")
            assert read_state(serve.name) is not None
            return ref
    raise AssertionError(p.stderr[-4000:])


def _complete(client, model: str, prompt: str) -> list[int]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"return_token_ids": True})
    ids = r.choices[0].token_ids
    assert ids is not None, "vLLM did not return token ids"
    return list(ids)


def _strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    return [t for t in ids if t not in eos]


@pytest.fixture(scope="module")
def eos_ids(demo_model_dir) -> set[int]:
    cfg = json.loads((Path(demo_model_dir) / "generation_config.json").read_text())
    e = cfg.get("eos_token_id")
    return set(e if isinstance(e, list) else [e])


# ------------------------------------------------------------------------------------- serve
def test_models_listed(serve, adapters):
    ids = [m.id for m in _client(serve).models.list().data]
    assert serve.info["base_model"] == "e2e-serve"
    assert set(ids) == set(serve.models) and len(adapters) >= 2
    assert "pirate" in adapters


def test_completions_equal_peft_reference(serve, reference, eos_ids):
    c = _client(serve)
    for model in serve.models:
        for i, p in enumerate(PROMPTS):
            got = _strip_eos(_complete(c, model, p), eos_ids)
            want = _strip_eos(reference[model]["completions"][i], eos_ids)
            assert got == want, (model, p)


def test_chat_completions(serve, reference):
    c = _client(serve)
    for model in serve.models:
        for i, p in enumerate(CHAT_PROMPTS):
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                          max_tokens=MAX_TOKENS, temperature=0)
            text = r.choices[0].message.content
            assert text and text.strip(), (model, p)
            assert text.strip() == reference[model]["chat"][i].strip(), (model, p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batching_mixed_models(serve, reference, eos_ids, seed):
    """Concurrent requests mixing base and adapters (more adapters in flight than max_loras=1, base
    requests among them) each return exactly their own model's reference."""
    rng = random.Random(seed)
    jobs = [(m, i) for m in serve.models for i in range(len(PROMPTS))]
    jobs = (jobs * 3)[:max(24, len(jobs))]
    rng.shuffle(jobs)
    c = _client(serve)
    with cf.ThreadPoolExecutor(max_workers=len(jobs)) as ex:
        futs = {ex.submit(_complete, c, m, PROMPTS[i]): (m, i) for m, i in jobs}
        for f in cf.as_completed(futs):
            m, i = futs[f]
            assert _strip_eos(f.result(), eos_ids) == _strip_eos(reference[m]["completions"][i], eos_ids), (m, i)


def test_status_reports_adapters(serve):
    p = subprocess.run(peftdeploy_cmd("status", serve.name, "--json"), env=cli_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)["deployments"][0]
    assert d["health"] == "ok" and set(d["models"]) == set(serve.models)
    m = d["metrics"]
    assert m["max_loras"] == 1 and m["running"] is not None and m["kv_cache_usage"] is not None
    assert set(m["per_adapter"]) == set(serve.models) - {serve.info["base_model"]}
    p = subprocess.run(peftdeploy_cmd("status"), env=cli_env(), capture_output=True, text=True, timeout=60)
    assert serve.name in p.stdout and "health: ok" in p.stdout


def test_requests_counted_per_model(serve):
    """The traffic middleware `up` loads counts requests per served name in /metrics
    (peftdeploy_requests_total): exact deltas for a known extra load, and `status --json` shows them."""
    import httpx
    from openai import NotFoundError

    from peftdeploy.launch.metrics import parse_prometheus, requests_by_model

    root = serve.base_url.removesuffix("/v1")
    base = serve.info["base_model"]

    def counts() -> dict[str, float]:
        c = requests_by_model(parse_prometheus(httpx.get(root + "/metrics", timeout=30).text))
        assert c is not None, "peftdeploy_requests_total is not in /metrics"
        return c

    before = counts()
    assert set(before) == set(serve.models) | {"__other__"}  # every served name (and only those) from the start
    c = _client(serve)
    for p in PROMPTS[:3]:
        _complete(c, "pirate", p)
    c.chat.completions.create(model=base, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    stream = c.chat.completions.create(model=base, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    with pytest.raises(NotFoundError):  # an unknown name is refused by vLLM: not a request of any model
        c.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    after = counts()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta == {**{m: 0.0 for m in serve.models}, "__other__": 0.0, "pirate": 3.0, base: 2.0}, delta

    p = subprocess.run(peftdeploy_cmd("status", serve.name, "--json"), env=cli_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout)["deployments"][0]["metrics"]
    assert m["requests_by_model"] == after
    total = sum(after.values())
    assert m["observed_shares"] == pytest.approx({k: v / total for k, v in after.items()})
    assert m["per_adapter"]["pirate"]["requests"] == after["pirate"]
    p = subprocess.run(peftdeploy_cmd("status", serve.name), env={**cli_env(), "COLUMNS": "160"},
                       capture_output=True, text=True, timeout=60)
    row = next(ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] == ["pirate"])
    assert row[-2:] == [f"{after['pirate']:g}", f"{after['pirate'] / total:.2f}"], p.stdout


def test_port_in_use_is_refused(serve, recipes):
    rec = recipes["serve"].with_name("e2e-port.yaml")
    rec.write_text(f"apiVersion: peftdeploy/v1\nextends: {recipes['serve']}\nname: e2e-port\n")
    p = subprocess.run(peftdeploy_cmd("up", str(rec), "--port", str(serve.port)), env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert f"port {serve.port}" in p.stderr and "already in use" in p.stderr and "Traceback" not in p.stderr


def test_wrong_base_adapter_is_refused(tmp_path):
    """An adapter trained on another model: plan refuses it before vLLM starts (exit 2, readable)."""
    from tests.tiny import build_tiny_llama, build_tiny_lora

    model = build_tiny_llama(tmp_path / "tiny")
    ad = build_tiny_lora(model, tmp_path / "tiny-lora", r=8)
    recipe = tmp_path / "wrong.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        apiVersion: peftdeploy/v1
        extends: {DEMO}
        name: e2e-wrong-base
        adapters:
          - name: other
            source: {ad}
        serving: {{port: {free_e2e_port()}}}
        """))
    t0 = time.monotonic()
    p = subprocess.run(peftdeploy_cmd("up", str(recipe)), env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "other" in p.stderr and "Traceback" not in p.stderr
    assert "vLLM: starting" not in p.stderr
    assert time.monotonic() - t0 < 120


# ------------------------------------------------------------------------------------ merged
def test_merged_equals_served_adapter(serve, merged, reference, eos_ids):
    """The merged model's greedy outputs equal the served pirate adapter's (and the PEFT reference)."""
    assert merged.info["mode"] == "merge" and merged.info["merge"] is not None
    assert "pirate" not in merged.models
    c_m, c_s = _client(merged), _client(serve)
    for p in PROMPTS:
        got = _strip_eos(_complete(c_m, merged.info["base_model"], p), eos_ids)
        served = _strip_eos(_complete(c_s, "pirate", p), eos_ids)
        assert got == served, p


def test_second_up_cache_hit_and_ctrl_c(merged, recipes):
    """A second `up` of the merge recipe does not re-merge; Ctrl-C stops its whole process group."""
    import psutil

    port = free_e2e_port({merged.port})
    # a second deployment of the same recipe needs its own name (state file): extend with another name
    rec = recipes["merged"].with_name("e2e-merged-2.yaml")
    rec.write_text(f"apiVersion: peftdeploy/v1\nextends: {recipes['merged']}\nname: e2e-merged-2\n")
    errf = rec.with_suffix(".err")
    # a state file left by an earlier session killed mid-test would read as this `up` being ready: clear it
    subprocess.run(peftdeploy_cmd("down", "e2e-merged-2"), env=cli_env(), capture_output=True, timeout=120)
    with open(errf, "w") as err:
        up = subprocess.Popen(peftdeploy_cmd("up", str(rec), "--port", str(port)), env=cli_env(),
                              stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            from peftdeploy.launch.state import read_state

            end = time.monotonic() + 900
            st = None
            while time.monotonic() < end:
                st = read_state("e2e-merged-2")
                if st is not None and st.ready_at:
                    break
                assert up.poll() is None, errf.read_text()
                time.sleep(0.5)
            assert st is not None and st.ready_at, errf.read_text()
            text = errf.read_text()
            assert "merge: cache hit" in text, text
            group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == st.pgid]
            assert len(group) >= 2, "API server + engine core"
            up.send_signal(signal.SIGINT)
            up.wait(timeout=120)
        finally:
            if up.poll() is None:
                up.kill()
    assert up.returncode == 130, errf.read_text()
    time.sleep(0.5)
    left = [p for p in psutil.process_iter() if _pgid(p.pid) == st.pgid and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in group)
    assert read_state("e2e-merged-2") is None


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except OSError:
        return None
