"""`peftdeploy merge RECIPE`: build what the recipe's merge step needs, into the cache, and say where.

The same materialization `up` runs before starting vLLM (peftdeploy.launch.materialize): the
full-precision streaming merge, then — for schemes peftdeploy quantizes offline (int8, w8a16,
w4a16, or awq/gptq re-quantized from a merge_base) — the quantized checkpoint, and under mode
hybrid the delta adapters. Everything is cached, so a later `up` (or a cluster's init container
running this command) starts at once.
"""
from __future__ import annotations

import click

from ..cli_common import emit_json, json_option, user_errors
from ..errors import PlanError


@click.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Plan for this device (decides the served dtype/scheme checks).")
@click.option("--verify", is_flag=True, help="Hash every file of a cached result before using it (default: only "
              "sizes, and the hash of files whose mtime changed).")
@json_option
@user_errors
def merge_cmd(recipe: str, device: str, as_json: bool, verify: bool) -> None:
    """Merge the recipe's adapters into the backbone (full precision, then quantize; cached).

    Prints the directory vLLM serves (stdout; --json for all details).
    """
    from ..launch.materialize import materialize
    from ..plan import make_plan
    from ..plan.findings import ENGINE_START_CODES
    from ..recipe import load_recipe

    loaded = load_recipe(recipe)
    plan = make_plan(loaded, device=device)
    plan.raise_for_errors(ignore=ENGINE_START_CODES)
    spec = plan.launch
    if spec.merge is None:
        raise PlanError(f"{loaded.path}: nothing to merge: the plan's mode is {plan.mode} ({plan.mode_reason})",
                        fix="set policy.mode: merge (or hybrid) in the recipe, or run `peftdeploy up` to serve "
                            "the adapters unmerged")

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    for e in plan.errors:  # only ENGINE_START_CODES are left
        say(f"note: `peftdeploy up` on this host would refuse this plan: {e.message} ({e.code}; fix: {e.fix})")
    from ..merge.kernels import load as load_kernel

    if load_kernel() is None:
        from ..util import merge_kernel_note

        why = merge_kernel_note() or "the compiled kernel failed to load or its self-test"
        say(f"note: merging with the numpy path (about 2x slower): {why}")
    if verify:  # read by the merge and quantize caches (peftdeploy.merge.manifest)
        import os

        from ..merge.manifest import VERIFY_ENV

        os.environ[VERIFY_ENV] = "1"
    spec, info = materialize(plan, spec, quiet=as_json, log=say)
    step = spec.merge
    if as_json:
        emit_json({"ok": True, "recipe": spec.recipe_name, "mode": plan.mode, "adapters": list(step.adapters),
                   "merged_dir": step.output_dir, "served_dir": step.served_dir,
                   "delta_dir": step.delta_dir, **info})
    else:
        click.echo(step.served_dir)
