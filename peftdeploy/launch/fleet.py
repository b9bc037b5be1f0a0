"""A fleet on one machine: one vLLM engine per replica of each group (plan/fleet.py) behind vllm-router.

Router: `vllm-router` (PyPI, the vLLM project's Rust router; extra ``peftdeploy[fleet]``) in its multi-model
mode (``--enable-igw``): every engine is registered once per OpenAI model id it answers (``POST /workers``
with ``model_id``), and a request goes to an engine of its ``model``. Chosen over the LiteLLM proxy (dozens of
dependencies, rewrites requests through its provider layer) and a local Ray Serve app (a Ray cluster, and its
LLM router starts engines itself, not the planned ones): one wheel, forwards the request body unchanged, health-
checks the engines. The multi-LoRA group is registered first: a name the router does not know (a catalog
adapter, resolved on first request) goes to it. Note: in this mode the router's ``/v1/models`` answers
``{"models": [ids]}`` rather than OpenAI's list shape.

Engines listen on loopback at serving.port + 1, + 2, ...; the router on serving.host:serving.port. On a
machine with several GPUs each engine gets its own ``CUDA_VISIBLE_DEVICES`` (``assign_devices``); on CPU its
own cores (``VLLM_CPU_OMP_THREADS_BIND``, ``assign_cpu_cores``).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LaunchError
from ..plan.fleet import CPU_BIND_ENV, assign_cpu_cores
from ..plan.spec import MODEL_NAMES_ENV, LaunchSpec
from .supervisor import Supervisor, check_port_free, default_log_path, stop_process_group

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.loader import LoadedRecipe
    from ..plan import Plan

ROUTER_EXTRA = "peftdeploy[fleet]"


@dataclass
class Engine:
    group: str
    kind: str
    index: int
    spec: LaunchSpec
    plan: Plan
    models: list[str]
    devices: str | None = None
    sup: Supervisor | None = None

    @property
    def name(self) -> str:
        return f"{self.group}-{self.index}"


def rename_served(spec: LaunchSpec, name: str) -> LaunchSpec:
    """The spec with its base / merged model served as `name` (flags, adapters' base_model_name, env)."""
    old_ref, new_ref = f'"base_model_name":"{spec.served_model_name}"', f'"base_model_name":"{name}"'
    args = []
    for k, v in spec.args:
        if k == "--served-model-name":
            v = name
        k = k.replace(old_ref, new_ref) if k.startswith("{") else k  # 2nd..nth --lora-modules JSON
        v = v.replace(old_ref, new_ref) if v and v.startswith("{") else v
        args.append((k, v))
    env = tuple((k, ",".join([name, *(a.name for a in spec.adapters)]) if k == MODEL_NAMES_ENV else v)
                for k, v in spec.env)
    return dataclasses.replace(spec, served_model_name=name, args=tuple(args), env=env)


def with_port(spec: LaunchSpec, host: str, port: int) -> LaunchSpec:
    args = tuple((k, str(port) if k == "--port" else host if k == "--host" else v) for k, v in spec.args)
    return dataclasses.replace(spec, args=args, host=host, port=port)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES, else nvidia-smi's list."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [x for x in cvd.split(",") if x.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [x.strip() for x in out.splitlines() if x.strip()]


def plan_engines(loaded: LoadedRecipe, plan: Plan, *, device: str, port: int | None, host: str | None,
                 gpu_memory: Any = None, log: Callable[[str], None] | None = None) -> tuple[list[Engine], str, int]:
    """(engines, router host, router port): one planned LaunchSpec per engine of every group; `log` gets notes."""
    from ..plan import make_plan
    from ..plan.fleet import MERGED, assign_devices, group_recipe

    f = plan.fleet
    r = loaded.recipe
    rhost = host or r.serving.host
    rport = port or r.serving.port
    engines: list[Engine] = []
    k = 0
    for g in f.groups:
        gl = dataclasses.replace(loaded, recipe=group_recipe(r, f, g))
        gp = make_plan(gl, device=device, gpu_memory=gpu_memory)
        if gp.errors:
            e = gp.errors[0]
            raise LaunchError(f"fleet group {g.name}: plan found {len(gp.errors)} error(s); first: {e.message}",
                              fix=e.fix, location=e.location)
        spec = rename_served(gp.launch, g.adapters[0] if g.kind == MERGED else plan.launch.served_model_name)
        for i in range(g.replicas):
            k += 1
            engines.append(Engine(g.name, g.kind, i, with_port(spec, "127.0.0.1", rport + k), gp,
                                  list(spec.model_names)))
    if plan.device == "cuda":
        per = max(1, r.serving.tensor_parallel_size)
        try:
            devs = assign_devices(f, visible_gpus(), per)
        except ValueError as e:
            raise LaunchError(f"fleet: {e}", fix="lower fleet.replicas, or run on a machine with more GPUs") from None
        for e, (_, _, d) in zip(engines, devs):
            e.devices = d
            e.spec = dataclasses.replace(e.spec, env=(*e.spec.env, ("CUDA_VISIBLE_DEVICES", d)))
    elif plan.device == "cpu":
        note = _bind_cpu_cores(engines)
        if note and log:
            log(note)
    return engines, rhost, rport


def _one_per_core(cpus: list[int]) -> list[int]:
    """One logical CPU per physical core (the first of its SMT siblings), as vLLM's own x86 binding uses."""
    out, seen = [], set()
    for c in cpus:
        try:
            sib = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            sib = str(c)
        if sib not in seen:
            seen.add(sib)
            out.append(c)
    return out


def _bind_cpu_cores(engines: list[Engine]) -> str | None:
    """Give each CPU engine its own cores (plan.fleet.assign_cpu_cores); a VLLM_CPU_OMP_THREADS_BIND the user
    set (environment or the recipe's env) is left to them, and too few cores leave vLLM's binding, with a note."""
    if CPU_BIND_ENV in os.environ or any(k == CPU_BIND_ENV for e in engines for k, _ in e.spec.env):
        return None
    usable = _one_per_core(sorted(os.sched_getaffinity(0)))
    cores = assign_cpu_cores(len(engines), usable)
    if cores is None:
        return (f"note: {len(engines)} CPU engines on {len(usable)} core(s) share cores (vLLM's own binding); "
                f"lower fleet.replicas, or set {CPU_BIND_ENV} yourself")
    for e, c in zip(engines, cores):
        e.devices = c
        e.spec = dataclasses.replace(e.spec, env=(*e.spec.env, (CPU_BIND_ENV, c)))
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_executable() -> str:
    cand = Path(sys.executable).parent / "vllm-router"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("vllm-router")
    if found:
        return found
    raise LaunchError("a fleet runs behind vllm-router, which is not installed",
                      fix=f"pip install '{ROUTER_EXTRA}' (or: pip install vllm-router)")


class Router:
    """vllm-router in multi-model mode, in its own process group; engines registered per model id."""

    def __init__(self, host: str, port: int, log_path: Path):
        self.host, self.port, self.log_path = host, port, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        h = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{h}:{self.port}"

    def start(self) -> None:
        exe = router_executable()
        check_port_free(self.host, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # its Prometheus exporter listens too (default 29000, often taken): a free loopback port
        argv = [exe, "--host", self.host, "--port", str(self.port), "--enable-igw", "--policy", "round_robin",
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(_free_port()), "--log-level", "warning"]
        with open(self.log_path, "ab", buffering=0) as log:
            log.write(f"# peftdeploy up (fleet router): {' '.join(argv)}\n".encode())
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, close_fds=True)

    def wait_up(self, timeout: float = 60.0) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise LaunchError(f"vllm-router exited with code {self.proc.returncode} before it listened",
                                  fix=f"see its log: {self.log_path}")
            try:
                httpx.get(self.base_url + "/workers", timeout=2.0)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise LaunchError(f"vllm-router did not listen on {self.base_url} within {timeout:.0f} s",
                          fix=f"see its log: {self.log_path}")

    def register(self, url: str, model_id: str) -> None:
        import httpx

        r = httpx.post(self.base_url + "/workers", json={"url": url, "model_id": model_id}, timeout=10.0)
        if r.status_code >= 300 or not r.json().get("success", True):
            raise LaunchError(f"vllm-router refused engine {url} for model {model_id!r}: {r.text[:300]}",
                              fix=f"see its log: {self.log_path}")

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is not None:
            stop_process_group(self.proc.pid, grace=grace, proc=self.proc)


def engine_sort_key(e: Engine) -> tuple[int, str, int]:
    """Multi-LoRA engines register first: the router sends unknown names to the first engine it knows."""
    return (0 if e.kind == "lora" else 1, e.group, e.index)


def start_fleet(engines: list[Engine], router: Router, *, log_dir: Path | None, timeout: float,
                on_tick: Any = None) -> float:
    """Start every engine, wait until all are ready, then the router, and register the engines. Returns
    seconds. Everything started is stopped again when a step fails."""
    t0 = time.monotonic()
    try:
        for e in engines:
            check_port_free(e.spec.host, e.spec.port)
        for e in engines:
            log = (log_dir / f"{e.name}.log") if log_dir else default_log_path(e.name)
            e.sup = Supervisor(e.spec, log_path=log)
            e.sup.start()
        pending = list(engines)
        while pending:
            e = pending[0]
            left = max(1.0, timeout - (time.monotonic() - t0))
            e.sup.wait_ready(timeout=left, on_tick=on_tick)
            pending.pop(0)
        router.start()
        router.wait_up()
        for e in sorted(engines, key=engine_sort_key):
            for m in e.models:
                router.register(e.sup.base_url, m)
    except BaseException:
        stop_fleet(engines, router)
        raise
    return time.monotonic() - t0


def stop_fleet(engines: list[Engine], router: Router | None, grace: float = 20.0) -> None:
    if router is not None:
        router.stop()
    for e in engines:
        if e.sup is not None and e.sup.proc is not None:
            e.sup.stop(grace=grace)


def engines_state(engines: list[Engine]) -> list[dict[str, Any]]:
    from .state import _create_time

    return [{"name": e.name, "group": e.group, "kind": e.kind, "pid": e.sup.proc.pid, "pgid": e.sup.pgid,
             "pid_create_time": _create_time(e.sup.proc.pid), "host": e.spec.host, "port": e.spec.port,
             "models": e.models, "log": str(e.sup.log_path), "devices": e.devices,
             "command_line": e.spec.command_line()} for e in engines if e.sup is not None and e.sup.proc is not None]


def engine_status(e: dict[str, Any], *, headers: dict[str, str], timeout: float = 3.0) -> dict[str, Any]:
    """One engine of a fleet: alive (pid), health, models."""
    import httpx

    from .state import pid_alive

    d = {k: e.get(k) for k in ("name", "group", "kind", "pid", "port", "models", "log", "devices")}
    d["alive"] = pid_alive(e.get("pid"), e.get("pid_create_time"))
    d["health"] = None
    if not d["alive"]:
        d["health"] = "dead (process gone): the router refuses its models"
        return d
    url = f"http://{e.get('host', '127.0.0.1')}:{e['port']}"
    try:
        r = httpx.get(url + "/health", timeout=timeout)
        d["health"] = "ok" if r.status_code == 200 else f"http {r.status_code}"
    except httpx.HTTPError as ex:
        d["health"] = f"unreachable ({type(ex).__name__})"
    return d


def router_models(base_url: str, headers: dict[str, str], timeout: float = 3.0) -> list[str] | None:
    import httpx

    try:
        r = httpx.get(base_url + "/v1/models", timeout=timeout, headers=headers)
        if r.status_code != 200:
            return None
        j = r.json()
    except (httpx.HTTPError, ValueError):
        return None
    if isinstance(j.get("models"), list):  # vllm-router's multi-model mode
        return [str(x) for x in j["models"]]
    return [m.get("id") for m in j.get("data", [])]


def stop_engines(s: Any, grace: float) -> None:
    from .supervisor import group_alive, stop_process_group

    for e in s.engines:
        if e.get("pgid") and group_alive(e["pgid"]):
            stop_process_group(e["pgid"], grace=grace)
