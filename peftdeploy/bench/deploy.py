"""Deployments the benchmark starts itself: a recipe's LaunchSpec, variants of it, a server process.

``recipe_spec`` asks the planner for the recipe's :class:`LaunchSpec` (``peftdeploy.plan.make_plan``).
``variant`` derives the comparison setups from it (no LoRA / merged model, a subset of adapters,
another ``max_loras``) by editing only the LoRA flags, so every setup shares the rest of the
engine configuration. :class:`Server` runs a spec (``peftdeploy-vllm serve ...``), waits until it
answers and stops it (process group, SIGTERM then SIGKILL).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..plan.spec import MODEL_NAMES_ENV, LaunchSpec, ServedAdapter
from ..launch.supervisor import stop_process_group
from .client import wait_ready

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.loader import LoadedRecipe
    from ..plan import Plan

__all__ = ["LORA_FLAGS", "Server", "recipe_spec", "variant", "merge_adapters"]

LORA_FLAGS = ("--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras", "--lora-modules",
              "--lora-dtype", "--fully-sharded-loras", "--lora-target-modules")


def _load(recipe: str | os.PathLike[str]) -> Any:
    from ..recipe import load_recipe

    return load_recipe(recipe)


def recipe_spec(recipe: str | os.PathLike[str], *, port: int | None = None,
                mode: str | None = "serve") -> tuple[LaunchSpec, Any]:
    """The recipe's LaunchSpec and the loaded recipe. ``mode``: "serve" (adapters unmerged, what the
    comparison derives its setups from), "merge", or None (the recipe's own policy)."""
    from ..plan import make_plan

    loaded = _load(recipe)
    plan = make_plan(loaded)
    spec = plan.launch
    if mode == "serve" and spec.mode != "serve":
        spec = _as_serve(spec, plan)
    changes: dict[str, Any] = {}
    if port is not None:
        changes["port"] = port
    spec = _set_flag(dataclasses.replace(spec, **changes), "--port", str(port or spec.port)) if changes else spec
    return spec, loaded


def _as_serve(spec: LaunchSpec, plan: Plan) -> LaunchSpec:
    """The plan chose merge: the same engine settings, serving the backbone with every adapter as LoRA."""
    res = plan.resolved
    have = {a.name for a in spec.adapters}
    adapters = list(spec.adapters)
    for a in plan.inventory.adapters:
        if a.name not in have:
            ra = res.adapter(a.name)
            adapters.append(ServedAdapter(name=a.name, path=str(ra.path), source=ra.source.spec, rank=a.max_rank))
    backbone = res.merge_base if (res.merge_base is not None and res.merge_base.path) else res.backbone
    return dataclasses.replace(spec, mode="serve", model=str(backbone.path), merge=None, adapters=tuple(adapters))


def _set_flag(spec: LaunchSpec, flag: str, value: str | None) -> LaunchSpec:
    args = [(k, v) for k, v in spec.args if k != flag]
    args.append((flag, value))
    return dataclasses.replace(spec, args=tuple(args))


def _without_lora(args: Sequence[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """args minus LoRA flags (and the bare values that follow a valueless --lora-modules)."""
    out: list[tuple[str, str | None]] = []
    in_lora = False
    for k, v in args:
        if k.startswith("-"):
            in_lora = k in LORA_FLAGS
        if not in_lora:
            out.append((k, v))
    return out


def variant(spec: LaunchSpec, *, adapters: Sequence[str] | None, max_loras: int | None = None,
            max_lora_rank: int | None = None, model: str | None = None, served_model_name: str | None = None,
            port: int | None = None, mode: str | None = None, extra_args: Sequence[tuple[str, str | None]] = ()
            ) -> LaunchSpec:
    """A copy of ``spec`` with LoRA off (``adapters=None``) or on with these adapters preloaded.

    Only LoRA flags (and the model / name / port when given) change; everything else — dtype,
    max_model_len, max_num_seqs, KV-cache and device settings — stays as the planner derived it.
    """
    args = _without_lora(spec.args)
    known = {a.name: a for a in spec.adapters}
    env = dict(spec.env)
    chosen: tuple[ServedAdapter, ...] = ()
    if adapters is not None:
        missing = [a for a in adapters if a not in known]
        if missing:
            raise KeyError(f"adapters not in the recipe: {', '.join(missing)} (known: {', '.join(known)})")
        chosen = tuple(known[a] for a in adapters)
        old = dict(spec.args)
        rank = max_lora_rank or int(old.get("--max-lora-rank") or max((a.rank for a in chosen), default=8))
        n = max_loras or int(old.get("--max-loras") or max(1, len(chosen)))
        args.append(("--enable-lora", None))
        args.append(("--max-loras", str(n)))
        args.append(("--max-lora-rank", str(rank)))
        args.append(("--max-cpu-loras", str(max(n, len(chosen)))))
        if chosen:
            args.append(("--lora-modules", None))
            args.extend((f"{a.name}={a.path}", None) for a in chosen)
    else:
        # no LoRA: the peftdeploy plugin must not resolve adapters on demand either
        env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)
    changes: dict[str, Any] = {"args": tuple(args), "adapters": chosen, "env": tuple(env.items())}
    if adapters is None:
        changes["plugin_recipe"] = None
    if model is not None:
        changes["model"] = model
    if served_model_name is not None:
        changes["served_model_name"] = served_model_name
        args2 = [(k, v) for k, v in changes["args"] if k != "--served-model-name"]
        args2.insert(0, ("--served-model-name", served_model_name))
        changes["args"] = tuple(args2)
    if mode is not None:
        changes["mode"] = mode
    out = dataclasses.replace(spec, **changes)
    if MODEL_NAMES_ENV in env:  # the traffic middleware counts the names this variant serves
        env[MODEL_NAMES_ENV] = ",".join(out.model_names)
        out = dataclasses.replace(out, env=tuple(env.items()))
    if port is not None:
        out = _set_flag(dataclasses.replace(out, port=port), "--port", str(port))
    for k, v in extra_args:
        out = _set_flag(out, k, v)
    return out


def merge_adapters(loaded: LoadedRecipe, names: Sequence[str], *, progress: bool = False) -> str:
    """Merge these adapters of the recipe into its backbone with the project's merge engine (cached);
    returns the merged model directory."""
    from ..merge.cache import merge_cached
    from ..merge.engine import AdapterInput
    from ..sources import resolve

    res = resolve(loaded, fetch="full", progress=progress)
    r = loaded.recipe
    base = res.merge_base or res.backbone
    inputs = [AdapterInput(name=n, path=str(res.adapter(n).path), weight=r.adapter(n).weight) for n in names]
    dtype = r.backbone.dtype
    result = merge_cached(str(base.path), inputs, dtype=dtype, progress=progress)
    return str(result.path)


class Server:
    """A vLLM server process for a LaunchSpec; use as a context manager."""

    def __init__(self, spec: LaunchSpec, *, log_path: str | os.PathLike[str], ready_timeout_s: float = 900.0,
                 executable: Sequence[str] | None = None, env: dict[str, str] | None = None,
                 quiet: bool = False):
        self.spec = spec
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.executable = tuple(executable or (sys.executable, "-m", "peftdeploy.launch.entry"))
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None
        self.quiet = quiet

    @property
    def url(self) -> str:
        host = self.spec.host if self.spec.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.spec.port}"

    def argv(self) -> list[str]:
        return self.spec.argv(self.executable)

    def start(self) -> "Server":
        env = dict(os.environ)
        env.update(dict(self.spec.env))
        for dst, src in self.spec.secret_env:
            if src in os.environ:
                env[dst] = os.environ[src]
        if self.spec.plugin_recipe:
            env.setdefault("PEFTDEPLOY_RECIPE", self.spec.plugin_recipe)
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        t0 = time.time()
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        try:
            wait_ready(self.url, timeout_s=self.ready_timeout_s, proc=self.proc,
                       api_key_env=dict(self.spec.secret_env).get("VLLM_API_KEY"))
        except BaseException as e:
            tail = self.log_tail()
            self.stop()
            if isinstance(e, (RuntimeError, TimeoutError)):
                raise RuntimeError(f"{e}\n--- {self.log_path} (tail) ---\n{tail}") from None
            raise
        self.ready_s = time.time() - t0
        return self

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        stop_process_group(p.pid, grace=timeout_s, proc=p)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
