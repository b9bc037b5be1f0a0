"""`peftdeploy up` of a recipe with a `fleet` section: one engine per group replica behind vllm-router
(peftdeploy/launch/fleet.py). Called from serve_cmds.py; what `status` / `down` add for fleets is in launch/."""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from ..cli_common import emit_json
from ..errors import EXIT_RUNTIME_FAILURE, LaunchError

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.loader import LoadedRecipe
    from ..plan import Plan

RESTARTS = 3  # a foreground fleet restarts a dead engine this often, then leaves its models refused


def fleet_up(loaded: LoadedRecipe, plan: Plan, *, dry_run: bool, detach: bool, as_json: bool, log_file: str | None,
             port: int | None, host: str | None, timeout: float, device: str) -> None:
    from ..launch import state as st
    from ..launch.local import Stopped, api_key_env, base_url, install_handlers, restore_handlers
    from .serve_cmds import _err
    from ..launch.fleet import Router, engines_state, plan_engines, start_fleet, stop_fleet
    from ..launch.materialize import materialize
    from ..launch.supervisor import ProgressDisplay, default_log_path
    from ..plan.report import render_fleet
    from ..plan.fleet import CPU_BIND_ENV

    engines, rhost, rport = plan_engines(loaded, plan, device=device, port=port, host=host, log=_err)
    f = plan.fleet
    if dry_run:
        if as_json:
            emit_json({"ok": True, "fleet": f.to_dict(), "router": {"host": rhost, "port": rport},
                       "engines": [{"name": e.name, "group": e.group, "models": e.models, "port": e.spec.port,
                                    "devices": e.devices, **e.spec.to_dict()} for e in engines]})
        else:
            click.echo(f"router: vllm-router --host {rhost} --port {rport} --enable-igw")
            for e in engines:
                click.echo(f"engine {e.name} ({', '.join(e.models)}): {e.spec.command_line()}")
        return
    quiet = as_json
    if not quiet:
        from ..cli_common import stdout_console

        render_fleet(f, stdout_console())
    name = loaded.recipe.name
    existing = st.read_state(name)
    if existing is not None:
        if existing.alive:
            raise LaunchError(f"deployment {name!r} is already running at {existing.base_url} (pid {existing.pid})",
                              fix=f"stop it first: peftdeploy down {name}")
        st.remove_state(name)
    import dataclasses
    from pathlib import Path

    merged: dict[str, Any] = {}
    for e in engines:
        if e.spec.merge is not None:
            if e.group not in merged:
                merged[e.group] = materialize(e.plan, e.spec, quiet=quiet, log=_err)[0]
            e.spec = dataclasses.replace(e.spec, model=merged[e.group].model, merge=merged[e.group].merge)
    base_log = Path(log_file) if log_file else default_log_path(name)
    log_dir = base_log.parent / base_log.stem  # <logs>/<name>-<time>/{router,<engine>}.log
    router = Router(rhost, rport, log_dir / "router.log")
    stopping: dict[str, Any] = {"signum": None}

    def on_signal(signum, frame):
        if stopping["signum"] is None:
            stopping["signum"] = signum
            raise Stopped(signum)

    old = install_handlers(on_signal)
    state = None
    try:
        with ProgressDisplay(name, enabled=not quiet) as disp:
            seconds = start_fleet(engines, router, log_dir=log_dir, timeout=timeout,
                                  on_tick=disp.update)
        models = [m for e in engines for m in e.models]
        models = list(dict.fromkeys(models))
        state = st.DeploymentState(
            name=name, pid=router.proc.pid, pgid=router.proc.pid, host=rhost, port=rport,
            log_path=str(router.log_path), model_names=models, served_model_name=plan.launch.served_model_name,
            adapters=[a.name for a in loaded.recipe.adapters], mode="fleet", recipe_path=str(loaded.path),
            recipe_hash=plan.launch.recipe_hash, supervisor_pid=None if detach else os.getpid(),
            api_key_env=api_key_env(plan.launch), command_line=None, engines=engines_state(engines))
        state.ready_at = time.time()
        st.write_state(state)
        base = base_url(rhost, rport)
        info = {"ok": True, "name": name, "endpoint": f"{base}/v1", "models": models, "mode": "fleet",
                "router": {"pid": router.proc.pid, "log": str(router.log_path)},
                "engines": state.engines, "fleet": f.to_dict(), "ready_seconds": round(seconds, 2),
                "detached": detach}
        if as_json:
            emit_json(info)
        else:
            click.echo(f"ready in {seconds:.1f} s: {base}/v1   (fleet of {len(engines)} engines behind vllm-router)")
            for e in engines:
                click.echo(f"  {e.name}: {', '.join(e.models)} -> {e.sup.base_url}"
                           + (f" ({'CUDA_VISIBLE_DEVICES' if plan.device == 'cuda' else CPU_BIND_ENV}={e.devices})"
                              if e.devices else "") + f"  log {e.sup.log_path}")
            click.echo(f"router log: {router.log_path}")
        sys.stdout.flush()
        if detach:
            for e in engines:
                e.sup.proc.returncode = 0
            router.proc.returncode = 0
            return
        restarts: dict[str, int] = {}
        while True:  # foreground: restart a dead engine (its models are refused by the router meanwhile)
            if router.proc.poll() is not None:
                _err(f"vllm-router exited ({router.proc.returncode}); stopping the fleet (log {router.log_path})")
                stop_fleet(engines, None)
                st.remove_state(name, pid=router.proc.pid)
                sys.exit(EXIT_RUNTIME_FAILURE)  # a runtime failure (README "Exit codes"), not a user error
            for e in engines:
                rc = e.sup.proc.poll()
                if rc is None:
                    continue
                n = restarts.get(e.name, 0)
                if n >= RESTARTS:
                    continue
                restarts[e.name] = n + 1
                _err(f"engine {e.name} exited ({rc}); restarting ({n + 1}/{RESTARTS}), its models "
                     f"({', '.join(e.models)}) are refused by the router meanwhile")
                e.sup.stop(grace=5)
                try:
                    e.sup.start()
                    e.sup.wait_ready(timeout=timeout)
                    for m in e.models:
                        router.register(e.sup.base_url, m)
                    state.engines = engines_state(engines)
                    st.write_state(state)
                except LaunchError as err:
                    _err(f"engine {e.name} did not come back: {err.message}")
            time.sleep(0.5)
    except Stopped as s:
        if not quiet:
            _err(f"\n{signal.Signals(s.signum).name}: stopping the fleet ...")
        stop_fleet(engines, router)
        if state is not None:
            st.remove_state(name, pid=state.pid)
        sys.exit(128 + s.signum)
    finally:
        restore_handlers(old)
        if not detach:
            stop_fleet(engines, router, grace=5)
