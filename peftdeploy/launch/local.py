"""What `up`, `down` and `status` do on this machine, below the command layer: the spec with a port override,
the quantization gate, signal handling, the server log tail, a deployment's live status, and the
ready-to-paste client examples. The commands (peftdeploy/commands/serve_cmds.py, fleet_cmds.py) print."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from ..plan import Plan
    from ..plan.spec import LaunchSpec
    from ..recipe.loader import LoadedRecipe
    from .state import DeploymentState
    from .supervisor import Supervisor


STOP_GRACE = 20.0


class Stopped(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def override_port(spec: LaunchSpec, port: int | None, host: str | None = None) -> LaunchSpec:
    if port is None and host is None:
        return spec
    args = []
    for k, v in spec.args:
        if k == "--port" and port is not None:
            v = str(port)
        elif k == "--host" and host is not None:
            v = host
        args.append((k, v))
    return dataclasses.replace(spec, args=tuple(args), port=port if port is not None else spec.port,
                               host=host if host is not None else spec.host)


def base_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def api_key_env(spec: LaunchSpec) -> str | None:
    for target, source in spec.secret_env:
        if target == "VLLM_API_KEY":
            return source
    return None


def usage_examples(base_url: str, models: list[str], api_key_env: str | None) -> str:
    """Ready-to-paste curl and openai examples (the api key is referenced, never printed)."""
    model = models[1] if len(models) > 1 else models[0]
    auth = f' \\\n    -H "Authorization: Bearer ${api_key_env}"' if api_key_env else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    key_expr = f'os.environ["{api_key_env}"]' if api_key_env else '"EMPTY"'
    return "\n".join([
        "curl:",
        f"  curl {base_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
        f"    -d {shlex.quote(body)}",
        "python (openai):",
        "  import os" if api_key_env else "",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{base_url}/v1", api_key={key_expr})',
        f'  r = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])',
        "  print(r.choices[0].message.content)",
    ]).replace("\n\n", "\n")


def ppl_gate(plan: Plan, spec: LaunchSpec, merge_info: dict[str, Any], loaded: LoadedRecipe, *, quiet: bool,
             log: Callable[[str], None]) -> None:
    """quantization.max_ppl_increase: measure the quantized merge against the full-precision one (cached)
    and refuse to start the server when it lost more (exit 2, with the numbers)."""
    q = plan.recipe.quantization
    step = spec.merge
    if q.max_ppl_increase is None or step is None or not step.quantize_scheme or "quantize" not in merge_info:
        return
    from ..quantize.gate import check_ppl_gate

    dt = plan.recipe.backbone.dtype
    rep = check_ppl_gate(step.output_dir, step.quantized_dir, max_increase=q.max_ppl_increase,
                         scheme=step.quantize_scheme, method=step.quantize_method or "rtn",
                         merged_key=merge_info["key"], quantized_key=merge_info["quantize"]["key"],
                         dtype=dt if dt in ("bfloat16", "float16") else "bfloat16", recipe_file=str(loaded.path),
                         progress=None if quiet else (lambda m: log(f"gate: {m}")))
    merge_info["gate"] = rep
    if not quiet:
        log(f"gate: perplexity {rep['ppl_quantized']:.3f} vs {rep['ppl_full']:.3f} full precision "
             f"({rep['increase']:+.2%}, allowed +{q.max_ppl_increase:.2%}){' (cached)' if rep['cache_hit'] else ''}")


def install_handlers(handler) -> dict[int, Any]:
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            old[s] = signal.signal(s, handler)
        except (ValueError, OSError):  # not the main thread
            pass
    return old


def restore_handlers(old: dict[int, Any]) -> None:
    for s, h in old.items():
        try:
            signal.signal(s, h)
        except (ValueError, OSError):
            pass


def stream_log(path: Path, pos: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
            pos = f.tell()
    except OSError:
        return pos
    if data:
        sys.stderr.write(data.decode("utf-8", "replace"))
        sys.stderr.flush()
    return pos


def deployment_status(s: Any, *, timeout: float = 3.0) -> dict[str, Any]:
    """Health, models and /metrics figures of one deployment (from its state)."""
    import httpx

    from ..launch.metrics import snapshot

    d: dict[str, Any] = {"name": s.name, "endpoint": f"{s.base_url}/v1", "pid": s.pid, "mode": s.mode,
                         "log": s.log_path, "recipe": s.recipe_path, "started_at": s.started_at,
                         "uptime_s": round(time.time() - s.started_at, 1), "alive": s.alive,
                         "ready": s.ready_at is not None, "health": None, "models": None, "metrics": None}
    key = os.environ.get(s.api_key_env) if s.api_key_env else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if s.engines:  # a fleet: the router (pid above) and each engine
        from .fleet import engine_status, router_models

        d["engines"] = [engine_status(e, headers=headers, timeout=timeout) for e in s.engines]
        d["health"] = ("ok" if all(e["health"] == "ok" for e in d["engines"]) else "degraded") if d["alive"] \
            else "router gone"
        models = router_models(s.base_url, headers, timeout) if d["alive"] else None
        if models:  # the base model first (the table below labels the first one "base")
            models = sorted(models, key=lambda m: (m != s.served_model_name, s.model_names.index(m)
                                                   if m in s.model_names else len(s.model_names)))
        d["models"] = models
        return d
    if not d["alive"]:
        d["health"] = "stale (process gone)"
        return d
    try:
        r = httpx.get(s.base_url + "/health", timeout=timeout)
        d["health"] = "ok" if r.status_code == 200 else f"http {r.status_code}"
    except httpx.HTTPError as e:
        d["health"] = f"unreachable ({type(e).__name__})" if s.ready_at else "starting"
        return d
    try:
        r = httpx.get(s.base_url + "/v1/models", timeout=timeout, headers=headers)
        if r.status_code == 200:
            d["models"] = [m.get("id") for m in r.json().get("data", [])]
    except (httpx.HTTPError, ValueError):
        pass
    try:
        r = httpx.get(s.base_url + "/metrics", timeout=timeout, headers=headers)
        if r.status_code == 200:
            d["metrics"] = snapshot(r.text, s.adapters).to_dict()
    except httpx.HTTPError:
        pass
    return d


def check_locked(loaded: LoadedRecipe, plan: Plan, recipe_arg: str) -> None:
    """`up --locked`: refuse (exit 2) when anything drifted from the recipe's lock file."""
    from ..errors import LaunchError, Location
    from ..lock import drift, lock_path, read_lock

    lp = lock_path(loaded.path)
    changed = drift(read_lock(lp), plan.resolved)
    if changed:
        raise LaunchError(f"--locked: {len(changed)} thing(s) drifted from {lp}: " + "; ".join(changed),
                          fix=f"deploy what was locked (pin the revisions / versions it names), or re-lock "
                              f"on purpose with `peftdeploy lock {recipe_arg}`", location=Location(file=str(lp)))


def with_vllm_args(spec: LaunchSpec, vllm_args: tuple[str, ...]) -> LaunchSpec:
    """The spec with `up -- <vllm flags>` appended after the planned ones (checked by the installed vLLM's
    own parser; flags the plan manages are refused)."""
    if not vllm_args:
        return spec
    from ..plan.engine_args import MANAGED_ARGS
    from .passthrough import check

    passed = check(vllm_args, managed=MANAGED_ARGS)
    return dataclasses.replace(spec, args=(*spec.args, *((a, None) for a in passed)))


def claim(spec: LaunchSpec) -> None:
    """Refuse to start a second deployment of the same name (a stale state file is removed) or on a port in
    use — before a possibly long merge."""
    from ..errors import LaunchError
    from . import state as st
    from .supervisor import check_port_free

    existing = st.read_state(spec.recipe_name)
    if existing is not None:
        if existing.alive:
            raise LaunchError(f"deployment {spec.recipe_name!r} is already running at {existing.base_url} "
                              f"(pid {existing.pid})", fix=f"stop it first: peftdeploy down {spec.recipe_name}")
        st.remove_state(spec.recipe_name)  # stale
    check_port_free(spec.host, spec.port)


def start_recorded(sup: Supervisor, spec: LaunchSpec, loaded: LoadedRecipe, *, detach: bool) -> DeploymentState:
    """Start the server and write its state file (what `status` / `down` read); returns the state."""
    from . import state as st

    sup.start()
    state = st.DeploymentState(
        name=spec.recipe_name, pid=sup.proc.pid, pgid=sup.pgid, host=spec.host, port=spec.port,
        log_path=str(sup.log_path), model_names=spec.model_names, served_model_name=spec.served_model_name,
        adapters=[a.name for a in spec.adapters], mode=spec.mode,
        merge_adapters=list(spec.merge.adapters) if spec.merge is not None else [],
        recipe_path=str(loaded.path),
        recipe_hash=spec.recipe_hash, supervisor_pid=None if detach else os.getpid(),
        api_key_env=api_key_env(spec), command_line=spec.command_line())
    st.write_state(state)
    return state


def ready_info(spec: LaunchSpec, sup: Supervisor, seconds: float, merge_info: dict[str, Any] | None, *,
               detach: bool) -> dict[str, Any]:
    """What `up --json` prints once the server is ready."""
    base = base_url(spec.host, spec.port)
    return {"ok": True, "name": spec.recipe_name, "endpoint": f"{base}/v1", "models": spec.model_names,
            "base_model": spec.served_model_name, "adapters": [a.name for a in spec.adapters],
            "mode": spec.mode, "pid": sup.proc.pid, "pgid": sup.pgid, "log": str(sup.log_path),
            "ready_seconds": round(seconds, 2), "merge": merge_info, "detached": detach}


def model_labels(spec: LaunchSpec) -> list[str]:
    """Each served model name with what it is (base, merged, adapter, hybrid delta)."""
    if spec.mode == "hybrid":
        return [f"{spec.served_model_name} (merged into the backbone, no LoRA)",
                *(f"{a.name} ({'base' if a.name == spec.recipe_name else 'adapter'}, exact delta LoRA)"
                  for a in spec.adapters)]
    return [f"{spec.served_model_name} (base{' merged' if spec.mode == 'merge' else ''})",
            *(a.name for a in spec.adapters)]


def wait_exit(sup: Supervisor, *, follow: bool) -> int:
    """Foreground `up`: block until the server exits (streaming its log with `follow`); its exit code."""
    tail_pos = sup.log_path.stat().st_size if follow else 0
    while True:
        rc = sup.proc.poll()
        if follow:
            tail_pos = stream_log(sup.log_path, tail_pos)
        if rc is not None:
            return rc
        time.sleep(0.25)
