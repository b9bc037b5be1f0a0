"""`peftdeploy plan RECIPE`: inspect adapters, derive vLLM settings, print the plan (exit 2 on errors)."""
from __future__ import annotations

import sys

import click

from ..cli_common import emit_json, json_option, stdout_console, user_errors


@click.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False))
@json_option
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Plan for this device (auto: cuda when an NVIDIA GPU is visible).")
@click.option("--gpu-memory", default=None, help="GPU memory to plan for, e.g. 80GiB (default: detected).")
@click.option("--host-memory", default=None, help="Host RAM to plan for, e.g. 64GiB (default: detected).")
@click.option("--offline", is_flag=True, default=None, help="Never contact the hub (like HF_HUB_OFFLINE=1).")
@user_errors
def plan_cmd(recipe: str, as_json: bool, device: str, gpu_memory: str | None, host_memory: str | None,
             offline: bool | None) -> None:
    """Inspect adapters, derive vLLM settings, print the plan."""
    from ..errors import PeftDeployError
    from ..recipe import load_recipe
    from . import make_plan
    from .memory import parse_bytes

    for opt, val in (("--gpu-memory", gpu_memory), ("--host-memory", host_memory)):
        try:
            parse_bytes(val)
        except ValueError as e:
            raise PeftDeployError(f"{opt}: {e}", fix="write e.g. 80GiB")
    loaded = load_recipe(recipe)
    plan = make_plan(loaded, device=device, gpu_memory=gpu_memory, host_memory=host_memory,
                     offline=True if offline else None)
    if as_json:
        emit_json(plan.to_dict())
    else:
        from ..plan.report import render

        render(plan, stdout_console())
    if plan.errors:
        sys.exit(2)
