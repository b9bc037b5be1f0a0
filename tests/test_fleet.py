"""The `fleet` recipe section and its planner (peftdeploy/plan/fleet.py): pure, deterministic, no vLLM."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftdeploy.plan import fleet as fl
from peftdeploy.plan import policy

ROOT = Path(__file__).resolve().parents[1]
DEMO_FLEET = ROOT / "recipes" / "demo-fleet.yaml"


def _recipe(tmp_path: Path, body: str, name: str = "r.yaml"):
    from peftdeploy.recipe import load_recipe

    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return load_recipe(p).recipe


BASE = """\
    apiVersion: peftdeploy/v1
    name: f
    backbone: {model: hf://org/model}
    adapters:
      - {name: a, source: hf://org/a}
      - {name: b, source: hf://org/b}
      - {name: c, source: hf://org/c}
"""


def _fleet(tmp_path, policy_yaml: str, fleet_yaml: str, device="cuda", kernels="vllm"):
    r = _recipe(tmp_path, BASE + f"    policy: {policy_yaml}\n    fleet: {fleet_yaml}\n")
    return fl.plan_fleet(r, device=device, kernels=kernels)


# ------------------------------------------------------------------------------------------ recipe
def test_no_fleet_is_the_old_recipe(tmp_path):
    """Backward compatible: without `fleet` nothing changes (no fleet plan, the same recipe hash)."""
    r = _recipe(tmp_path, BASE)
    assert r.fleet is None and fl.plan_fleet(r) is None
    assert "fleet" not in r.model_dump(exclude_defaults=True)


@pytest.mark.parametrize("fleet_yaml, where, words", [
    ("{replicas: 2, dedicatd: auto}", "fleet.dedicatd", "did you mean 'dedicated'"),
    ("{replicas: 0}", "fleet.replicas", ""),
    ("{replicas: 2, dedicated: [zz]}", "fleet.dedicated[0]", "not an adapter"),
    ("{replicas: 2, dedicated: [a, a]}", "fleet.dedicated[1]", "twice"),
    ("{replicas: 2, dedicated: [a, b]}", "fleet.replicas", "fewer than the groups it needs (3"),
    ("{replicas: 2, max_replicas: 1}", "fleet.max_replicas", ">= fleet.replicas"),
])
def test_bad_fleet_is_a_clear_error(tmp_path, fleet_yaml, where, words):
    from peftdeploy.errors import RecipeError

    with pytest.raises(RecipeError) as ei:
        _recipe(tmp_path, BASE + f"    fleet: {fleet_yaml}\n")
    msg = ei.value.render()
    assert where in msg and words in msg and "r.yaml:" in msg


def test_fleet_refuses_merge_mode(tmp_path):
    from peftdeploy.errors import RecipeError

    with pytest.raises(RecipeError, match="decides merge or multi-LoRA per replica group"):
        _recipe(tmp_path, BASE + "    policy: {mode: merge}\n    fleet: {replicas: 2}\n")


def test_schema_has_fleet():
    from peftdeploy.recipe import json_schema

    s = json_schema()
    assert "fleet" in s["$defs"]["Recipe"]["properties"]
    assert s["$defs"]["Fleet"]["additionalProperties"] is False
    committed = json.loads((ROOT / "peftdeploy" / "data" / "recipe.schema.json").read_text())
    assert committed == s


# ------------------------------------------------------------------------------------------ planner
def test_hot_adapter_gets_a_merged_group(tmp_path):
    # vLLM's CPU kernels (active 0.35): a merged engine for the 60% adapter beats two multi-LoRA engines
    f = _fleet(tmp_path, "{mode: auto, traffic: {a: 0.6, b: 0.3, c: 0.1}}", "{replicas: 2}", device="cpu",
               kernels="vllm")
    assert [(g.kind, g.adapters, g.replicas) for g in f.groups] == [("merged", ("a",), 1), ("lora", ("b", "c"), 1)]
    assert [g.name for g in f.groups] == ["f-a", "f-lora"]
    assert f.groups[1].models == ("f", "b", "c")  # the base model is served by the multi-LoRA group
    active = policy.ratios("cpu", "vllm")["active"]
    # bottleneck: min(1 * 1.0 / 0.6, 1 * active / 0.4) / 2 engines
    assert f.predicted == pytest.approx(min(1 / 0.6, active / 0.4) / 2)
    assert f.baseline == pytest.approx(active)  # every request needs LoRA on a shared engine
    assert f.gain == pytest.approx(f.predicted / f.baseline) and f.gain > 1  # the measured ratios set how much
    assert "a on merged engines" in f.reason and "docs/bench" in f.source


def test_fast_lora_kernels_keep_the_hot_adapter_on_multilora(tmp_path):
    """peftdeploy's CPU kernels (the LoRA model compiled, active 0.94): the same traffic is predicted faster on two
    multi-LoRA engines than with the 60% adapter alone on one merged engine, which it would overload."""
    f = _fleet(tmp_path, "{mode: auto, traffic: {a: 0.6, b: 0.3, c: 0.1}}", "{replicas: 2}", device="cpu",
               kernels="peftdeploy")
    active = policy.ratios("cpu", "peftdeploy")["active"]
    assert min(1 / 0.6, active / 0.4) / 2 < active  # what a merged group for `a` would give
    assert [(g.kind, g.adapters, g.replicas) for g in f.groups] == [("lora", ("a", "b", "c"), 2)]
    assert f.predicted == pytest.approx(active, abs=1e-9)
    assert f"a merged engine for a (60% of the traffic) is predicted {min(1 / 0.6, active / 0.4) / 2:.2f}×" in f.reason


def test_uniform_traffic_shares_one_multilora_group(tmp_path):
    f = _fleet(tmp_path, "{mode: auto}", "{replicas: 2}")
    assert [(g.kind, g.replicas) for g in f.groups] == [("lora", 2)]
    assert f.predicted == pytest.approx(f.baseline) and "no adapter's share fills one of 2 engines" in f.reason


def test_engines_go_to_the_most_loaded_group(tmp_path):
    f = _fleet(tmp_path, "{mode: auto, traffic: {a: 0.8, b: 0.1, c: 0.1}}", "{replicas: 4}")
    assert [(g.name, g.replicas) for g in f.groups] == [("f-a", 3), ("f-lora", 1)]
    assert sum(g.replicas for g in f.groups) == 4


def test_explicit_dedicated_and_base_traffic(tmp_path):
    f = _fleet(tmp_path, "{mode: auto, traffic: {a: 0.1, b: 0.1, c: 0.1, base: 0.7}}",
               "{replicas: 3, dedicated: [c]}")
    assert [(g.kind, g.adapters) for g in f.groups] == [("merged", ("c",)), ("lora", ("a", "b"))]
    assert f.groups[0].reason == "named in fleet.dedicated"
    assert "and the base model" in f.groups[1].reason


def test_deterministic_and_pure(tmp_path):
    two = BASE.replace("      - {name: c, source: hf://org/c}\n", "")
    body = two + "    policy: {mode: auto, traffic: {a: 0.5, b: 0.5}}\n    fleet: {replicas: 2}\n"
    a, b = (fl.plan_fleet(_recipe(tmp_path, body, n)).to_dict() for n in ("x.yaml", "y.yaml"))
    assert a == b
    # a alone merged gains nothing (b still needs a whole multi-LoRA engine); a and b both merged: 1.0
    assert [(g["kind"], g["adapters"]) for g in a["groups"]] == [("merged", ["a"]), ("merged", ["b"])]
    assert a["predicted"] == pytest.approx(1.0)


def test_group_recipes(tmp_path):
    r = _recipe(tmp_path, BASE + "    policy: {mode: auto, traffic: {a: 0.6, b: 0.3, c: 0.1}}\n"
                                 "    fleet: {replicas: 2}\n")
    f = fl.plan_fleet(r)
    m, lo = (fl.group_recipe(r, f, g) for g in f.groups)
    assert m.policy.mode == "merge" and m.policy.merge.adapters == ["a"] and [x.name for x in m.adapters] == ["a"]
    assert lo.policy.mode == "serve" and [x.name for x in lo.adapters] == ["b", "c"]
    assert lo.policy.traffic == {"b": 0.3, "c": 0.1} and m.fleet is None and lo.fleet is None


def test_assign_devices(tmp_path):
    f = _fleet(tmp_path, "{mode: auto, traffic: {a: 0.6, b: 0.3, c: 0.1}}", "{replicas: 2}")
    assert fl.assign_devices(f, ["0", "1"], 1) == [("f-a", 0, "0"), ("f-lora", 0, "1")]
    assert fl.assign_devices(f, ["0", "1", "2", "3"], 2) == [("f-a", 0, "0,1"), ("f-lora", 0, "2,3")]
    with pytest.raises(ValueError, match="2 engine"):
        fl.assign_devices(f, ["0"], 1)


def test_assign_cpu_cores():
    # one core each when there are just enough; with more, the last core stays free (vLLM keeps one too)
    assert fl.assign_cpu_cores(2, [1, 0]) == ["0", "1"]
    assert fl.assign_cpu_cores(2, [0, 1, 2]) == ["0", "1"]
    assert fl.assign_cpu_cores(2, list(range(8))) == ["0,1,2,3", "4,5,6"]
    assert fl.assign_cpu_cores(1, [4, 5, 6, 7]) == ["4,5,6"]
    assert fl.assign_cpu_cores(3, [0, 1]) is None and fl.assign_cpu_cores(0, [0]) is None


def test_cpu_fleet_engines_get_their_own_cores(monkeypatch):
    import os

    from peftdeploy.launch import fleet as lf
    from peftdeploy.plan.spec import LaunchSpec

    def engines(env=()):
        spec = LaunchSpec(recipe_name="r", recipe_hash="-", mode="serve", model="/m", model_source="/m",
                          served_model_name="r", host="127.0.0.1", port=8000, device="cpu", env=tuple(env))
        return [lf.Engine("g", "lora", i, spec, None, ["r"]) for i in range(2)]

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    monkeypatch.setattr(lf, "_one_per_core", lambda cpus: cpus)
    es = engines()
    assert lf._bind_cpu_cores(es) is None
    assert [dict(e.spec.env)["VLLM_CPU_OMP_THREADS_BIND"] for e in es] == ["0,1", "2,3"]
    assert [e.devices for e in es] == ["0,1", "2,3"]
    # the user's own binding (environment or recipe env) is left alone
    es = engines([("VLLM_CPU_OMP_THREADS_BIND", "0-3")])
    assert lf._bind_cpu_cores(es) is None and [e.devices for e in es] == [None, None]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    es = engines()
    assert lf._bind_cpu_cores(es) is None and "VLLM_CPU_OMP_THREADS_BIND" not in dict(es[0].spec.env)
    # too few cores: vLLM's binding, and a note that says so
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    note = lf._bind_cpu_cores(engines())
    assert note and "2 CPU engines on 1 core" in note and "fleet.replicas" in note


# --------------------------------------------------------------------------------------- plan / up CLI
def test_plan_prints_and_json_carries_the_fleet(demo_model_dir):
    from peftdeploy.cli import main

    res = CliRunner().invoke(main, ["plan", str(DEMO_FLEET), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    f = json.loads(res.output)["fleet"]
    assert [(g["name"], g["kind"], g["models"]) for g in f["groups"]] == [
        ("demo-fleet-pirate", "merged", ["pirate"]), ("demo-fleet-lora", "lora", ["demo-fleet", "json", "shout"])]
    assert f["groups"][0]["reason"] == "named in fleet.dedicated"
    # named, not chosen: with the compiled CPU LoRA model, two multi-LoRA engines are predicted faster (README)
    assert f["predicted"] == pytest.approx(min(1 / 0.6, policy.ratios("cpu", "peftdeploy")["active"] / 0.4) / 2, abs=1e-4)
    assert f["predicted"] < f["baseline"]
    res = CliRunner().invoke(main, ["plan", str(DEMO_FLEET), "--device", "cpu"])
    assert "fleet (2 engines" in res.output and "fleet: 0.8" in res.output


def test_up_dry_run_one_engine_per_group(demo_model_dir, monkeypatch):
    """Engines on the ports after the router's, served names = the models the router sends them, and on a
    multi-GPU machine one CUDA_VISIBLE_DEVICES per engine."""
    from peftdeploy.cli import main

    res = CliRunner().invoke(main, ["up", str(DEMO_FLEET), "--dry-run", "--json", "--port", "18570"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["router"] == {"host": "127.0.0.1", "port": 18570}
    eng = {e["name"]: e for e in d["engines"]}
    p, lo = eng["demo-fleet-pirate-0"], eng["demo-fleet-lora-0"]
    assert (p["port"], lo["port"]) == (18571, 18572)
    assert p["served_model_name"] == "pirate" and p["mode"] == "merge" and "--enable-lora" not in p["argv"]
    assert lo["served_model_name"] == "demo-fleet" and [a["name"] for a in lo["adapters"]] == ["json", "shout"]
    assert '"base_model_name":"demo-fleet"' in " ".join(lo["argv"])
    assert lo["env"]["PEFTDEPLOY_MODEL_NAMES"] == "demo-fleet,json,shout"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    res = CliRunner().invoke(main, ["up", str(DEMO_FLEET), "--dry-run", "--json", "--device", "cuda"])
    assert res.exit_code == 0, res.output
    assert [e["env"]["CUDA_VISIBLE_DEVICES"] for e in json.loads(res.output)["engines"]] == ["4", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")
    res = CliRunner().invoke(main, ["up", str(DEMO_FLEET), "--dry-run", "--device", "cuda"])
    assert res.exit_code == 2 and "2 engine(s) of 1 GPU(s) each, but 1 GPU(s)" in res.output


# `peftdeploy up` of the demo fleet in the foreground with the engines swapped for the fake process tree of
# test_launch.py and the router for a stand-in that records registrations (no vLLM, no vllm-router)
FLEET_UP_SCRIPT = '''
import json, subprocess, sys, types
import peftdeploy.launch.fleet as lf
import peftdeploy.launch.materialize as lm
import peftdeploy.launch.supervisor as sv

fake, calls, recipe, port = sys.argv[1:5]
sv.Supervisor._http_ready = lambda self, expected: "Route:" in open(self.log_path).read()
orig_init = sv.Supervisor.__init__
def init(self, spec, **kw):
    orig_init(self, spec, argv=[sys.executable, fake, "2", "0"], **kw)
sv.Supervisor.__init__ = init
def start(self):
    self.proc = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"],
                                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def register(self, url, model_id):
    with open(calls, "a") as f:
        f.write(json.dumps([url, model_id]) + "\\n")
lf.Router.start, lf.Router.wait_up, lf.Router.register = start, lambda self, timeout=60.0: None, register
lm.materialize = lambda plan, spec, quiet=False, log=None: (types.SimpleNamespace(model=spec.model, merge=spec.merge),)
from peftdeploy.cli import main
main(["up", recipe, "--port", port])
'''


def test_foreground_fleet_restarts_a_dead_engine(tmp_path, demo_model_dir, monkeypatch):
    """README: a foreground `up` of a fleet restarts a dead engine (up to 3 times) and registers it with the
    router again; the other group is left alone; SIGTERM then stops everything (exit 143)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from peftdeploy.demo import demo_cache_dir
    from peftdeploy.launch import state as st
    from tests.conftest import free_e2e_port_run
    from tests.test_launch import FAKE

    (tmp_path / "fake.py").write_text(FAKE)
    (tmp_path / "up.py").write_text(FLEET_UP_SCRIPT)
    calls = tmp_path / "registered.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PEFTDEPLOY_DEMO_DIR=str(demo_cache_dir()))  # the built demo
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "cache"))  # the state files the driver writes
    port = free_e2e_port_run(3)  # the router and the two engines' ports
    up = subprocess.Popen([sys.executable, str(tmp_path / "up.py"), str(tmp_path / "fake.py"), str(calls),
                           str(DEMO_FLEET), str(port)], env={**env, "PEFTDEPLOY_CACHE": str(tmp_path / "cache")},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def ready_state(until: float):
            while time.monotonic() < until:
                s = st.read_state("demo-fleet")
                if s is not None and s.ready_at:
                    return s
                assert up.poll() is None, up.communicate()
                time.sleep(0.1)
            raise AssertionError("the fleet was not ready")

        s = ready_state(time.monotonic() + 120)
        before = {e["group"]: e for e in s.engines}
        lora, pirate = before["demo-fleet-lora"], before["demo-fleet-pirate"]
        os.killpg(lora["pgid"], signal.SIGKILL)
        end = time.monotonic() + 60
        after = before
        while time.monotonic() < end:
            s = st.read_state("demo-fleet")
            after = {e["group"]: e for e in s.engines} if s else after
            if after["demo-fleet-lora"]["pid"] != lora["pid"]:
                break
            assert up.poll() is None, up.communicate()
            time.sleep(0.2)
        new = after["demo-fleet-lora"]
        assert new["pid"] != lora["pid"] and psutil.pid_exists(new["pid"]), "the dead engine was not restarted"
        assert not psutil.pid_exists(lora["pid"])
        assert after["demo-fleet-pirate"]["pid"] == pirate["pid"]  # the other group is left alone
        regs = [tuple(json.loads(x)) for x in calls.read_text().splitlines()]
        url = f"http://127.0.0.1:{lora['port']}"
        assert [m for u, m in regs if u == url] == ["demo-fleet", "json", "shout"] * 2  # registered again
        assert [m for u, m in regs if u != url] == ["pirate"]
        r = CliRunner().invoke(__import__("peftdeploy.cli", fromlist=["main"]).main, ["status", "demo-fleet", "--json"])
        eng = {e["group"]: e for e in json.loads(r.output)["deployments"][0]["engines"]}
        assert eng["demo-fleet-lora"]["alive"] is True and eng["demo-fleet-pirate"]["alive"] is True
        up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=60)
        assert up.returncode == 143, (out, err)
        assert "engine demo-fleet-lora-0 exited (-9); restarting (1/3)" in err and "Traceback" not in err
        for e in after.values():
            assert not psutil.pid_exists(e["pid"]) or psutil.Process(e["pid"]).status() == psutil.STATUS_ZOMBIE
        assert st.read_state("demo-fleet") is None
    finally:  # whatever failed: no process of this test is left behind
        if up.poll() is None:
            up.kill()
            up.communicate(timeout=60)
        s = st.read_state("demo-fleet")
        for pgid in ([s.pgid] + [e["pgid"] for e in s.engines]) if s else []:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_foreground_fleet_router_death_is_a_runtime_failure(tmp_path, demo_model_dir, monkeypatch):
    """The router of a foreground fleet dies: the engines are stopped, the state removed, exit 1 (a runtime
    failure in README's exit-code table), no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from peftdeploy.demo import demo_cache_dir
    from peftdeploy.launch import state as st
    from tests.conftest import free_e2e_port_run
    from tests.test_launch import FAKE

    (tmp_path / "fake.py").write_text(FAKE)
    (tmp_path / "up.py").write_text(FLEET_UP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PEFTDEPLOY_DEMO_DIR=str(demo_cache_dir()),
               PEFTDEPLOY_CACHE=str(tmp_path / "cache"))
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "cache"))
    up = subprocess.Popen([sys.executable, str(tmp_path / "up.py"), str(tmp_path / "fake.py"),
                           str(tmp_path / "registered.jsonl"), str(DEMO_FLEET), str(free_e2e_port_run(3))], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s = None
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and not (s and s.ready_at):
            s = st.read_state("demo-fleet")
            assert up.poll() is None, up.communicate()
            time.sleep(0.1)
        assert s is not None and s.ready_at, "the fleet was not ready"
        os.killpg(s.pgid, signal.SIGKILL)  # the router
        out, err = up.communicate(timeout=90)
        assert up.returncode == 1, (out, err)
        assert "vllm-router exited (-9); stopping the fleet" in err and "Traceback" not in err
        for e in s.engines:
            assert not psutil.pid_exists(e["pid"]) or psutil.Process(e["pid"]).status() == psutil.STATUS_ZOMBIE
        assert st.read_state("demo-fleet") is None
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate(timeout=60)
        for pgid in ([s.pgid] + [e["pgid"] for e in s.engines]) if s else []:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
