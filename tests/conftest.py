"""Shared fixtures: the demo model (built once), and `peftdeploy up --detach` deployments for
end-to-end tests (a free port in 18000-18099, stopped with `peftdeploy down` at the end)."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ parallel sessions (pytest-xdist)
# scripts/test.sh runs the suite on two workers (`-n 2 --dist loadscope`, grouped below). Each worker keeps to its own
# slice of the e2e port range and its own CPU cores for vLLM's OpenMP threads, so two CPU engines never
# share a core (vLLM's auto binding would put both on core 0); a value the caller set wins.
def _worker() -> tuple[int, int]:
    """(index, count) of this xdist worker; (0, 1) without xdist."""
    wid = os.environ.get("PYTEST_XDIST_WORKER", "")
    return (int(wid[2:]), max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))) \
        if wid.startswith("gw") else (0, 1)


def _split(items: list, k: int, n: int) -> list:
    """The k-th of n contiguous, near-equal runs of items (empty when there are fewer items than n)."""
    q, r = divmod(len(items), n)
    lo = k * q + min(k, r)
    return items[lo:lo + q + (k < r)]


WORKER, WORKERS = _worker()
if WORKERS > 1:
    _lo, _, _hi = os.environ.get("PEFTDEPLOY_E2E_PORTS", "18000-18099").partition("-")
    _mine = _split(list(range(int(_lo), int(_hi) + 1)), WORKER, WORKERS)
    os.environ["PEFTDEPLOY_E2E_PORTS"] = f"{_mine[0]}-{_mine[-1]}"
    _cores = _split(sorted(os.sched_getaffinity(0)), WORKER, WORKERS)
    if _cores:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, _cores)))
    # torch/BLAS in a worker and in the processes it starts (PEFT references, merges, quantizers) use that
    # worker's share of the cores: with as many OpenMP threads as the machine has cores, every parallel region
    # waits for the thread the other worker's engine preempts (the PEFT reference of test_up_e2e: 65 s with 2
    # threads beside a busy core, 29 s with 1; the tokens are the same).
    _n = str(max(1, len(_cores)))
    for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_k, _n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tests of one module run on one worker (module fixtures start their servers once); modules that share a
# session server are one group (test_up_quantized_e2e too: its `up`s share the merged pirate cache entry with
# test_up_e2e's merged deployments, and the Ctrl-C test's cache hit was once missed with them on two workers).
# Heaviest groups first, so the two workers finish together (measured durations, 2026-12-07); the rest keep
# their collection order (scripts/test.sh passes --no-loadscope-reorder, else xdist orders groups by their
# number of tests). The groups are made by our own scheduler, not by xdist_group marks: xdist 3.8 writes the
# group into `item._nodeid`, which pytest 9 no longer reads, so with pytest 9 `--dist loadgroup` spreads one
# module over both workers.
SHARED_GROUPS = {"test_up_e2e": "e2e-serve", "test_hybrid": "e2e-serve", "test_bench": "e2e-serve",
                 "test_up_quantized_e2e": "e2e-serve"}
HEAVY_FIRST = ("e2e-serve", "test_lora_kernels_cpu", "test_render_ray_e2e", "test_quantize", "test_plugin_e2e",
               "test_fleet_e2e", "test_guard", "test_plan_vllm", "test_install", "test_demo")


def _group(nodeid: str) -> str:
    """The work unit of a test: its module, or the shared group its module is in."""
    mod = Path(nodeid.split("::", 1)[0]).stem
    return SHARED_GROUPS.get(mod, mod)


def pytest_collection_modifyitems(config, items):
    rank = {g: i for i, g in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda it: rank.get(_group(it.nodeid), len(rank)))  # stable: collection order within a rank


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` with our groups (module, or SHARED_GROUPS) as the scopes."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return GroupScheduling(config, log)


# Tests whose subject is not the served LoRA model's numerics or speed (the API-key guard, the plugin's resolver,
# fleet routing, the Ray Serve render) run it eagerly: with peftdeploy's CPU kernels the LoRA model is compiled by
# default (lora_kernels/cpu_compile.py), about a minute per cold engine start on a loaded CI core. The compiled path
# is what test_lora_kernels_cpu's e2e (against vLLM's kernels and PEFT; the demo's styles are read from its answers),
# test_up_e2e's e2e-serve (against PEFT; `bench --url` runs on it too) and test_hybrid (hybrid against e2e-serve)
# serve and check. Deployments without LoRA (merged, quantized, a fleet's merged engine) that vLLM would compile
# itself run with serving.extra_args.enforce_eager where the compile is not the subject (test_up_e2e's merged,
# test_up_quantized_e2e, test_fleet_e2e).
EAGER_LORA = {"PEFTDEPLOY_LORA_COMPILE": "0"}


def _e2e_ports() -> range:
    """18000-18099, or PEFTDEPLOY_E2E_PORTS=LO-HI (inclusive) so parallel sessions keep to their own range."""
    lo, _, hi = os.environ.get("PEFTDEPLOY_E2E_PORTS", "18000-18099").partition("-")
    return range(int(lo), int(hi) + 1)


E2E_PORTS = _e2e_ports()


def free_e2e_port(exclude: set[int] = frozenset()) -> int:
    ports = [p for p in E2E_PORTS if p not in exclude]
    random.Random(os.getpid()).shuffle(ports)
    for p in ports:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError(f"no free port in {E2E_PORTS.start}-{E2E_PORTS.stop - 1}")


def free_e2e_port_run(n: int) -> int:
    """A port p with p .. p+n-1 all free, in the e2e range (a fleet's router and engines take consecutive ports:
    free_e2e_port alone may give a p whose p+1 is this worker's session server)."""
    def free(q: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", q))
                return True
            except OSError:
                return False

    starts = list(range(E2E_PORTS.start, E2E_PORTS.stop - n + 1))
    random.Random(os.getpid()).shuffle(starts)
    for p in starts:
        if all(free(q) for q in range(p, p + n)):
            return p
    raise RuntimeError(f"no {n} consecutive free ports in {E2E_PORTS.start}-{E2E_PORTS.stop - 1}")


def peftdeploy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftdeploy.cli", *args]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class Deployment:
    """A running `peftdeploy up --detach` deployment (what `up --json` printed)."""

    name: str
    recipe: Path
    port: int
    info: dict
    up_stderr: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.info["endpoint"]  # http://127.0.0.1:PORT/v1

    @property
    def models(self) -> list[str]:
        return list(self.info["models"])

    def down(self) -> subprocess.CompletedProcess:
        return subprocess.run(peftdeploy_cmd("down", self.name), env=cli_env(), capture_output=True, text=True,
                              timeout=120)


def _log_tail(text: str, n: int = 40) -> str:
    """The end of the server log a failed `up` names (CI keeps only what the assertion prints), with the
    memory left on the machine and the vLLM processes still running."""
    import re

    out = ""
    m = re.search(r"full log: (\S+\.log)", text)
    if m and Path(m.group(1)).is_file():
        lines = Path(m.group(1)).read_text(errors="replace").splitlines()
        out += f"\n--- last {n} lines of {m.group(1)}\n" + "\n".join(lines[-n:])
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[:3]
        ps = subprocess.run(["ps", "-eo", "pid,rss,etimes,args"], capture_output=True, text=True).stdout
        vllm = [ln[:160] for ln in ps.splitlines() if "vllm" in ln.lower() or "VLLM" in ln]
        out += "\n--- " + " | ".join(x.strip() for x in mem) + "\n--- vLLM processes:\n" + "\n".join(vllm)
    except OSError:
        pass
    return out


def start_detached(recipe: Path, *, port: int | None = None, timeout: float = 900) -> Deployment:
    port = port or free_e2e_port()
    proc = subprocess.run(peftdeploy_cmd("up", str(recipe), "--detach", "--json", "--port", str(port),
                                         "--timeout", str(timeout)),
                          env=cli_env(), capture_output=True, text=True, timeout=timeout + 300)
    if proc.returncode != 0:
        raise AssertionError(f"peftdeploy up {recipe} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                             + _log_tail(proc.stdout + proc.stderr))
    info = json.loads(proc.stdout)
    return Deployment(name=info["name"], recipe=recipe, port=port, info=info, up_stderr=proc.stderr)


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model (demo://smollm2-135m), built once into the peftdeploy cache."""
    from peftdeploy.demo import build_demo_model

    return build_demo_model(progress=False)


@pytest.fixture(scope="session")
def e2e_up():
    """Factory: `e2e_up(recipe_path) -> Deployment`; every deployment is stopped at session end."""
    started: list[Deployment] = []

    def _up(recipe: Path, **kw) -> Deployment:
        d = start_detached(Path(recipe), **kw)
        started.append(d)
        return d

    yield _up
    for d in reversed(started):
        d.down()


# The plain (unmerged, multi-LoRA) deployment of the demo recipe, shared by the end-to-end modules
# that compare against it (test_up_e2e.py, test_hybrid.py): one server start for the session.
# PEFTDEPLOY_E2E_DEMO_RECIPE may point at another serve recipe on the demo model.
E2E_DEMO_RECIPE = Path(os.environ.get("PEFTDEPLOY_E2E_DEMO_RECIPE", ROOT / "recipes" / "demo.yaml")).resolve()


@pytest.fixture(scope="session")
def e2e_serve_recipe(tmp_path_factory) -> Path:
    """recipes/demo.yaml in float32 with max_loras 1 (more adapters in flight than LoRA slots)."""
    p = tmp_path_factory.mktemp("e2e-recipes") / "e2e-serve.yaml"
    p.write_text(f"apiVersion: peftdeploy/v1\nextends: {E2E_DEMO_RECIPE}\nname: e2e-serve\n"
                 "backbone: {dtype: float32}\nserving: {max_loras: 1, host: 127.0.0.1}\n")
    return p


@pytest.fixture(scope="session")
def e2e_serve(e2e_serve_recipe, e2e_up, demo_model_dir) -> Deployment:
    """`up --detach` of e2e_serve_recipe, started on first use, stopped at session end."""
    return e2e_up(e2e_serve_recipe)
