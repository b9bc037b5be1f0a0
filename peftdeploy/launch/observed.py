"""Traffic a running deployment observed (`plan --observed`): its /metrics request counters turned into the
`policy.traffic` shares the planner sizes slots for, with what was left out and why."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.loader import LoadedRecipe


def with_observed_traffic(loaded: LoadedRecipe) -> tuple[Any, dict[str, Any]]:
    """(the recipe with policy.traffic replaced by the shares its running deployment observed, what was
    observed). Raises LaunchError (exit 2) when the deployment is not running or has nothing to say."""
    import dataclasses
    import os

    import httpx

    from ..errors import LaunchError, Location
    from . import state as st
    from .metrics import fetch_metrics, parse_prometheus, requests_by_model, traffic_from_requests

    r = loaded.recipe
    where = Location(file=str(loaded.path))
    s = st.read_state(r.name)
    if s is None or not s.alive:
        raise LaunchError(f"--observed: no deployment of recipe {r.name!r} is running"
                          + (" (its state file names a process that is gone)" if s is not None else ""),
                          fix=f"start it with `peftdeploy up {loaded.path} --detach` and send it traffic, or plan "
                              "without --observed (policy.traffic from the recipe)", location=where)
    key = os.environ.get(s.api_key_env) if s.api_key_env else None
    try:
        text = fetch_metrics(s.base_url, api_key=key)
    except httpx.HTTPError as e:
        raise LaunchError(f"--observed: cannot read {s.base_url}/metrics of deployment {r.name!r} "
                          f"({type(e).__name__}: {e})",
                          fix=f"check it with `peftdeploy status {r.name}` (log: {s.log_path})", location=where) from None
    counts = requests_by_model(parse_prometheus(text))
    if counts is None:
        raise LaunchError(f"--observed: deployment {r.name!r} at {s.base_url} does not export "
                          "peftdeploy_requests_total (it was started without peftdeploy's traffic middleware)",
                          fix=f"restart it: `peftdeploy down {r.name}` then `peftdeploy up {loaded.path} --detach`",
                          location=where)
    try:
        shares, n, left_out = traffic_from_requests(
            counts, recipe_name=r.name, served_model_name=s.served_model_name, mode=s.mode,
            merge_adapters=s.merge_adapters or (r.merge_adapter_names() if r.policy.mode == "merge" else []),
            adapter_names=[a.name for a in r.adapters])
    except ValueError as e:
        raise LaunchError(f"--observed: {e}", fix="give the expected shares in the recipe's policy.traffic and plan "
                          "without --observed", location=where) from None
    if n <= 0:
        raise LaunchError(f"--observed: deployment {r.name!r} has counted no requests for this recipe's models yet"
                          + (f" (requests for other names: {_counts(left_out)})" if left_out else ""),
                          fix="send it traffic first, or plan without --observed (policy.traffic from the recipe)",
                          location=where)
    recipe = r.model_copy(update={"policy": r.policy.model_copy(update={"traffic": shares})})
    info = {"source": "observed", "endpoint": f"{s.base_url}/v1", "requests": n, "shares": shares,
            "requests_by_model": counts, "left_out": left_out, "recipe_traffic": r.policy.traffic}
    return dataclasses.replace(loaded, recipe=recipe), info


def _counts(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def traffic_line(info: dict[str, Any]) -> str:
    shares = sorted(info["shares"].items(), key=lambda kv: (-kv[1], kv[0]))
    line = (f"traffic: observed from the running deployment ({info['requests']:g} requests): "
            + ", ".join(f"{k} {v:.2f}" for k, v in shares))
    if info.get("left_out"):
        line += f"; left out (not models of this recipe): {_counts(info['left_out'])}"
    if info.get("recipe_traffic"):
        line += "\n  (replaces the recipe's policy.traffic: " + ", ".join(
            f"{k} {v:g}" for k, v in info["recipe_traffic"].items()) + ")"
    return line
