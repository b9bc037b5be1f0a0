"""`peftdeploy plan RECIPE`: inspect adapters, derive vLLM settings, print the plan (exit 2 on errors).

``--observed``: the recipe's running deployment (`up`'s state file) is asked for its /metrics, and the
observed request shares per model (``peftdeploy_requests_total``, counted by the traffic middleware
`up` adds) replace ``policy.traffic`` for this plan, so mode auto decides with real traffic.
"""
from __future__ import annotations

import sys

import click

from ..cli_common import check_byte_options, emit_json, json_option, stdout_console, user_errors


@click.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False))
@json_option
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Plan for this device (auto: cuda when an NVIDIA GPU is visible).")
@click.option("--gpu-memory", default=None, help="GPU memory to plan for, e.g. 80GiB (default: detected).")
@click.option("--host-memory", default=None, help="Host RAM to plan for, e.g. 64GiB (default: detected).")
@click.option("--offline", is_flag=True, default=None, help="Never contact the hub (like HF_HUB_OFFLINE=1).")
@click.option("--observed", is_flag=True,
              help="Use the request shares observed by the recipe's running deployment as policy.traffic.")
@user_errors
def plan_cmd(recipe: str, as_json: bool, device: str, gpu_memory: str | None, host_memory: str | None,
             offline: bool | None, observed: bool) -> None:
    """Inspect adapters, derive vLLM settings, print the plan."""
    from ..plan import make_plan
    from ..recipe import load_recipe

    check_byte_options(gpu_memory=gpu_memory, host_memory=host_memory)
    loaded = load_recipe(recipe)
    traffic = None
    if observed:
        from ..launch.observed import with_observed_traffic

        loaded, traffic = with_observed_traffic(loaded)
    plan = make_plan(loaded, device=device, gpu_memory=gpu_memory, host_memory=host_memory,
                     offline=True if offline else None,
                     traffic_source="observed traffic" if traffic is not None else None)
    if as_json:
        d = plan.to_dict()
        d["notes"] = list(loaded.notes)
        if traffic is not None:
            d["traffic"] = traffic
        emit_json(d)
    else:
        from ..plan.report import render

        for note in loaded.notes:
            click.echo(f"note: {note}", err=True)
        if traffic is not None:
            from ..launch.observed import traffic_line

            click.echo(traffic_line(traffic))
        render(plan, stdout_console())
    if plan.errors:
        sys.exit(2)
