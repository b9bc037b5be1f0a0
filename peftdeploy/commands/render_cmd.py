"""`peftdeploy render RECIPE --target T|all`: plan for a GPU cluster, then write native configs.

Without --out the files are printed as YAML documents (with `# Source: <target>/<file>` lines, like
`helm template`); with --out DIR they are written under DIR/<target>/ all at once: everything goes
to a temporary directory beside DIR first, then each target directory is swapped in by rename, so
no reader ever sees half a render.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..cli_common import check_byte_options, emit_json, json_option, user_errors
from ..render import TARGETS, RenderContext, make_context, render_many
from ..render.base import AUTO_IMAGE, DEFAULT_TOOLS_IMAGE, DEFAULT_VLLM_IMAGE, PLUGIN_VLLM_IMAGE, resolve_image
from ..render.pipeline import DEFAULT_GPU_MEMORY, as_stream, fleet_contexts, plan_launch, write_out


@click.command("render")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--target", "-t", "target", required=True, type=click.Choice([*TARGETS, "all"]),
              help="Which engine's configuration to write ('all': every target this recipe can go to).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Server replicas.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write DIR/<target>/... (atomically) instead of printing YAML.")
@click.option("--namespace", default="default", show_default=True, help="Kubernetes namespace.")
@click.option("--image", default=AUTO_IMAGE, show_default=True,
              help=f"vLLM server image; auto: {PLUGIN_VLLM_IMAGE} (vLLM + peftdeploy, docker/vllm-peftdeploy.Dockerfile) "
                   f"when the recipe needs the plugin (policy.catalog), else {DEFAULT_VLLM_IMAGE}.")
@click.option("--tools-image", default=DEFAULT_TOOLS_IMAGE, show_default=True,
              help="Image with peftdeploy (runs `peftdeploy merge` in-cluster under merge policy).")
@click.option("--gpu-type", default="nvidia.com/gpu", show_default=True, help="Kubernetes GPU resource name.")
@click.option("--accelerator", default=None, help="SkyPilot / Ray accelerator type, e.g. H100.")
@click.option("--storage-size", default="200Gi", show_default=True, help="PVC size for the merged model.")
@click.option("--gpu-memory", default=DEFAULT_GPU_MEMORY, show_default=True,
              help="Memory of one cluster GPU to plan for (max_loras, max_num_seqs, memory checks).")
@click.option("--host-memory", default=None,
              help="Host RAM of a cluster node to plan for, e.g. 64GiB (max_cpu_loras; default: this machine's).")
@click.option("--store", default=None,
              help="ray-serve: s3://bucket/prefix it loads LoRA adapters (and merged models) from.")
@json_option
@user_errors
def render_cmd(recipe: str, target: str, replicas: int, out_dir: str | None, namespace: str, image: str,
               tools_image: str, gpu_type: str, accelerator: str | None, storage_size: str,
               gpu_memory: str, host_memory: str | None, store: str | None, as_json: bool) -> None:
    """Render the recipe for Kubernetes, vLLM production-stack, KServe, Ray Serve or SkyPilot.

    Sources are used as the recipe writes them (hf://, s3://); local and demo:// sources are refused.
    Secrets are referenced (Secret names, ${VAR}), never written.
    """
    from ..recipe import load_recipe

    from ..render import skipped_features

    image = resolve_image(image, load_recipe(recipe).recipe)
    check_byte_options(gpu_memory=gpu_memory, host_memory=host_memory)
    r, launch = plan_launch(recipe, gpu_memory=gpu_memory, host_memory=host_memory, image=image)
    fleet = None
    opts = dict(namespace=namespace, tools_image=tools_image, gpu_type=gpu_type, accelerator=accelerator,
                storage_size=storage_size, store=store)
    ctx: RenderContext = make_context(r, launch, replicas=replicas, image=image, **opts)
    targets = list(TARGETS) if target == "all" else [target]
    group_ctxs = None
    if r.fleet is not None:  # replicas per group come from the fleet plan, not --replicas
        loaded, plan = plan_launch(recipe, gpu_memory=gpu_memory, host_memory=host_memory, image=image, with_plan=True)
        fleet = plan.fleet
        group_ctxs = fleet_contexts(loaded, plan, gpu_memory=gpu_memory, host_memory=host_memory, image=image,
                                    **opts)
    rendered, skipped = render_many(ctx, targets, skip_unrenderable=target == "all", fleet=fleet,
                                    group_ctxs=group_ctxs)
    features = skipped_features(group_ctxs or [ctx], list(rendered))
    if not rendered:  # every target refused: the reason is the recipe's, say it once
        raise next(iter(skipped.values()))
    written = write_out(out_dir, rendered) if out_dir else []
    if as_json:
        emit_json({
            "ok": True, "recipe": ctx.recipe_name, "recipe_hash": ctx.recipe_hash,
            "targets": {t: (written and [p for p in written if Path(p).parent.name == t]) or sorted(f)
                        for t, f in rendered.items()},
            "files": {f"{t}/{n}": text for t, files in rendered.items() for n, text in files.items()}
            if not out_dir else None,
            "skipped": {t: e.to_dict() for t, e in skipped.items()},
            # features of the local `up` a target's server cannot carry (also printed as warnings)
            "skipped_features": features,
            "image": image,
            "fleet": fleet.to_dict() if fleet is not None else None,
        })
    elif out_dir:
        for p in written:
            click.echo(f"wrote {p}")
    else:
        click.echo(as_stream(rendered), nl=False)
    for t, e in skipped.items() if not as_json else ():
        click.echo(f"skipped {t}: {e.message}" + (f"\n  fix: {e.fix}" if e.fix else ""), err=True)
    for f in features if not as_json else ():
        click.echo(f"warning: {f['target']}: {f['feature']} not carried: {f['why']}\n  fix: {f['fix']}", err=True)
