"""`peftdeploy up | down | status`: run the planned vLLM server locally and look after it.

    peftdeploy up RECIPE [--dry-run] [--detach] [--json] [--log-file F] [--port N] [--timeout S] [--follow]
    peftdeploy down RECIPE|NAME
    peftdeploy status [NAME] [--json]

`up` = load → plan (refuse on error findings) → merge if the plan says so (cached) → start
`peftdeploy-vllm serve` with the plan's arguments and environment → wait for readiness (progress:
phase, elapsed, last log line) → print the endpoint, the model names and ready-to-paste examples →
block until Ctrl-C / SIGTERM (the server's process group is stopped: SIGTERM, then SIGKILL after a
grace period) or until the server exits.

Exit codes: 0 — stopped by the server itself with 0, or `--detach`/`--dry-run` done; 2 — a user
error (recipe, plan findings, port in use, vLLM failed to start: one paragraph + the log path);
130 / 143 — stopped by SIGINT / SIGTERM (the server was stopped cleanly); otherwise the server's
own exit code when it dies after it was ready.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..cli_common import emit_json, json_option, user_errors
from ..errors import LaunchError
from ..launch.local import (STOP_GRACE, Stopped, api_key_env, base_url, check_locked, claim, deployment_status,
                            install_handlers, model_labels, override_port, ppl_gate, ready_info, restore_handlers,
                            start_recorded, usage_examples, wait_exit, with_vllm_args)
from ..launch.metrics import OTHER_MODEL

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.spec import LaunchSpec
    from ..plan import Plan

def _err(msg: str) -> None:
    click.echo(msg, err=True)


# ------------------------------------------------------------------------------------------- helpers
def _run_merge(plan: Plan, spec: LaunchSpec, *, quiet: bool) -> tuple[Any, dict[str, Any]]:
    """Materialize the plan's MergeStep (merge, then quantize for offline schemes; hybrid: delta
    adapters), all cached, into exactly the directories the planned command names."""
    from ..launch.materialize import materialize

    return materialize(plan, spec, quiet=quiet, log=_err)


# ------------------------------------------------------------------------------------------------ up
@click.command("up")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print exactly what would run (the plan's command) and exit.")
@click.option("--detach", is_flag=True, help="Return once the server is ready; stop it with `peftdeploy down`.")
@json_option
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Server log file (default: <cache>/logs/<recipe>-<time>.log).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Override serving.port.")
@click.option("--host", default=None, help="Override serving.host.")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds to wait for readiness.")
@click.option("--follow", is_flag=True, help="Stream the server log to stderr after it is ready.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Plan for this device.")
@click.option("--locked", is_flag=True, help="Refuse to run when anything drifted from RECIPE's lock file "
              "(`peftdeploy lock`): hub commits, adapter sha256s, peftdeploy / vLLM versions.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def up_cmd(recipe: str, dry_run: bool, detach: bool, as_json: bool, log_file: str | None, port: int | None,
           host: str | None, timeout: float, follow: bool, device: str, locked: bool = False,
           vllm_args: tuple[str, ...] = ()) -> None:
    """Plan, merge if needed, and run the OpenAI-compatible server.

    `peftdeploy up RECIPE -- <vllm serve flags>` passes flags through to vLLM after the planned ones,
    checked first against the installed vLLM's own argument parser."""
    from ..launch import state as st
    from ..launch.supervisor import ProgressDisplay, Supervisor, default_log_path
    from ..plan import make_plan
    from ..recipe import load_recipe

    loaded = load_recipe(recipe)
    plan = make_plan(loaded, device=device)
    plan.raise_for_errors()
    if locked:
        check_locked(loaded, plan, recipe)
    if getattr(plan, "fleet", None) is not None:  # one engine per group behind a router (fleet_cmds.py)
        from .fleet_cmds import fleet_up

        return fleet_up(loaded, plan, dry_run=dry_run, detach=detach, as_json=as_json, log_file=log_file,
                        port=port, host=host, timeout=timeout, device=device)
    spec = with_vllm_args(override_port(plan.launch, port, host), vllm_args)
    if dry_run:
        if as_json:
            emit_json({"ok": True, "mode": plan.mode, "mode_reason": plan.mode_reason, **spec.to_dict()})
        else:
            click.echo(spec.command_line())
        return

    quiet = as_json
    if not quiet:
        _err(f"plan: mode {plan.mode} — {plan.mode_reason}")
        for f in plan.findings:
            if f.severity.value == "warning":
                _err(f"plan: warning: {f.message}")
    claim(spec)
    merge_info = None
    if spec.merge is not None:
        spec, merge_info = _run_merge(plan, spec, quiet=quiet)
        ppl_gate(plan, spec, merge_info, loaded, quiet=quiet, log=_err)

    sup = Supervisor(spec, log_path=log_file or default_log_path(spec.recipe_name))
    stopping: dict[str, Any] = {"signum": None}

    def on_signal(signum, frame):
        if stopping["signum"] is None:
            stopping["signum"] = signum
            raise Stopped(signum)
        if sup.pgid:  # second signal while stopping: no more grace
            try:
                os.killpg(sup.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    old = install_handlers(on_signal)
    state = None
    try:
        try:
            state = start_recorded(sup, spec, loaded, detach=detach)
            if not quiet:
                _err(f"vLLM: starting (pid {sup.proc.pid}, log {sup.log_path})")
            with ProgressDisplay(spec.recipe_name, enabled=not quiet) as disp:
                seconds = sup.wait_ready(timeout=timeout, on_tick=disp.update)
        except BaseException:
            if state is not None:
                st.remove_state(spec.recipe_name, pid=state.pid)
            raise
        state.ready_at = time.time()
        st.write_state(state)
        info = ready_info(spec, sup, seconds, merge_info, detach=detach)
        if as_json:
            emit_json(info)
        else:
            click.echo(f"ready in {seconds:.1f} s: {info['endpoint']}   (mode {spec.mode})")
            click.echo(f"models: {', '.join(model_labels(spec))}")
            click.echo(f"log: {sup.log_path}")
            click.echo(usage_examples(base_url(spec.host, spec.port), spec.model_names, api_key_env(spec)))
            if detach:
                click.echo(f"detached: `peftdeploy status {spec.recipe_name}`, "
                           f"`peftdeploy down {spec.recipe_name}`")
            else:
                click.echo("serving — Ctrl-C to stop" + ("" if follow else " (log in the file above; --follow streams it)"))
        sys.stdout.flush()
        if detach:
            sup.proc.returncode = 0  # do not warn about a child we leave running on purpose
            return
        rc = wait_exit(sup, follow=follow)  # foreground: until a signal or the server exits
        st.remove_state(spec.recipe_name, pid=sup.proc.pid)
        sup.stop(grace=5)  # leftovers of the group, if any
        if rc != 0:
            _err(sup.failure(rc, prefix="the vLLM server exited").render())
        sys.exit(rc if rc >= 0 else 128 - rc)
    except Stopped as s:
        if not quiet:
            _err(f"\n{signal.Signals(s.signum).name}: stopping the vLLM server (process group {sup.pgid}) ...")
        rc = sup.stop(grace=STOP_GRACE)
        if state is not None:
            st.remove_state(spec.recipe_name, pid=state.pid)
        if not quiet:
            _err(f"stopped (server exit code {rc})")
        sys.exit(128 + s.signum)
    finally:
        restore_handlers(old)
        if sup.proc is not None and sup.proc.poll() is None and not detach:
            sup.stop(grace=5)


# ---------------------------------------------------------------------------------------------- down
def _name_of(target: str) -> str:
    p = Path(target)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise LaunchError(f"recipe {target} not found", fix="give a recipe path or a deployment name")
        from ..recipe import load_recipe

        return load_recipe(p).recipe.name
    return target


@click.command("down")
@click.argument("target")
@click.option("--timeout", type=float, default=STOP_GRACE, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@json_option
@user_errors
def down_cmd(target: str, timeout: float, as_json: bool) -> None:
    """Stop a deployment started with `up` (RECIPE path or deployment NAME)."""
    from ..launch import state as st
    from ..launch.supervisor import group_alive, stop_process_group

    name = _name_of(target)
    s = st.read_state(name)
    if s is None:  # nothing to stop is not an error (exit codes: README "Exit codes")
        running = ", ".join(x.name for x in st.list_states()) or "none"
        if as_json:
            emit_json({"ok": True, "name": name, "was_running": False, "running": running})
        else:
            click.echo(f"nothing to do: no deployment named {name!r} is running (running: {running}); "
                       "`peftdeploy status` lists deployments")
        return
    was_alive = s.alive or group_alive(s.pgid)
    t0 = time.monotonic()
    if s.supervisor_pid and st.pid_alive(s.supervisor_pid) and s.supervisor_pid != os.getpid():
        try:  # a foreground `up`: let it stop its server and clean up
            os.kill(s.supervisor_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        end = time.monotonic() + timeout + 10
        while time.monotonic() < end and (group_alive(s.pgid) or st.pid_alive(s.supervisor_pid)):
            time.sleep(0.1)
    if group_alive(s.pgid):
        stop_process_group(s.pgid, grace=timeout)
    if s.engines:  # a fleet: the engines behind the router
        from ..launch.fleet import stop_engines

        stop_engines(s, grace=timeout)
    st.remove_state(name)
    out = {"ok": True, "name": name, "pid": s.pid, "was_running": was_alive,
           "seconds": round(time.monotonic() - t0, 2)}
    if as_json:
        emit_json(out)
    elif was_alive:
        click.echo(f"stopped {name} (pid {s.pid}, {out['seconds']} s)")
    else:
        click.echo(f"{name} was not running (stale state removed)")


# -------------------------------------------------------------------------------------------- status
@click.command("status")
@click.argument("name", required=False)
@json_option
@user_errors
def status_cmd(name: str | None, as_json: bool) -> None:
    """Health and per-adapter metrics of running deployments."""
    from ..launch import state as st

    if name:
        s = st.read_state(_name_of(name))
        if s is None:
            raise LaunchError(f"no deployment named {name!r}", fix="`peftdeploy status` lists deployments")
        states = [s]
    else:
        states = st.list_states()
    rows = [deployment_status(s) for s in states]
    if as_json:
        emit_json({"ok": True, "deployments": rows})
        return
    if not rows:
        click.echo("no deployments (start one with `peftdeploy up RECIPE --detach`)")
        return
    from rich.table import Table

    from ..cli_common import stdout_console

    con = stdout_console()
    for d in rows:
        con.print(f"[bold]{d['name']}[/bold]  {d['endpoint']}  pid {d['pid']}  mode {d['mode']}  "
                  f"health: {d['health']}  up {d['uptime_s']:.0f} s", markup=True, highlight=False)
        for e in d.get("engines") or []:
            con.print(f"  engine {e['name']} ({e['kind']}): {', '.join(e['models'] or [])}  port {e['port']}  pid "
                      f"{e['pid']}  health: {e['health']}" + (f"  GPUs {e['devices']}" if e.get("devices") else ""),
                      markup=False, highlight=False)
        m = d.get("metrics") or {}
        if m:
            kv = m.get("kv_cache_usage")
            con.print(f"  requests running {_n(m.get('running'))}, waiting {_n(m.get('waiting'))}, "
                      f"finished {_n(m.get('requests_finished'))}; KV cache "
                      f"{'-' if kv is None else f'{kv * 100:.1f}%'}; max_loras {m.get('max_loras') or '-'}",
                      markup=False, highlight=False)
        models = d.get("models") or []
        if models:
            t = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
            t.add_column("model")
            t.add_column("kind")
            t.add_column("loaded")
            t.add_column("running")
            t.add_column("waiting")
            counts = m.get("requests_by_model") if m else None
            shares = (m.get("observed_shares") if m else None) or {}
            if counts is not None:  # peftdeploy_requests_total (the traffic middleware `up` adds)
                t.add_column("requests", justify="right")
                t.add_column("share", justify="right")
            per = m.get("per_adapter", {}) if m else {}
            ads = set(per) | set(models[1:])
            rows = [(mid, "base" if mid not in ads or mid == models[0] else "adapter", "yes",
                     "yes" if per.get(mid, {}).get("running") else "-",
                     "yes" if per.get(mid, {}).get("waiting") else "-") for mid in models]
            if counts is not None and counts.get(OTHER_MODEL) and OTHER_MODEL not in models:
                rows.append((OTHER_MODEL, "(other names)", "-", "-", "-"))
            for row in rows:
                extra = () if counts is None else (_n(counts.get(row[0], 0.0)),
                                                   f"{shares[row[0]]:.2f}" if row[0] in shares else "-")
                t.add_row(*row, *extra)
            con.print(t)
        con.print(f"  log: {d['log']}", markup=False, highlight=False)


def _n(x: Any) -> str:
    return "-" if x is None else f"{x:g}"
