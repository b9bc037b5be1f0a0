"""`peftdeploy render RECIPE --target T|all`: plan for a GPU cluster, then write native configs.

Without --out the files are printed as YAML documents (with `# Source: <target>/<file>` lines, like
`helm template`); with --out DIR they are written under DIR/<target>/ all at once: everything goes
to a temporary directory beside DIR first, then each target directory is swapped in by rename, so
no reader ever sees half a render.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click

from ..cli_common import check_byte_options, emit_json, json_option, user_errors
from . import TARGETS, RenderContext, RenderError, make_context, render_many
from .base import AUTO_IMAGE, DEFAULT_TOOLS_IMAGE, DEFAULT_VLLM_IMAGE, PLUGIN_VLLM_IMAGE, parse_source, resolve_image, server_kernels


DEFAULT_GPU_MEMORY = "80GiB"  # what render plans a cluster GPU as (this machine's GPU is not the cluster's)


def plan_launch(recipe_path: str, *, gpu_memory: str | None = DEFAULT_GPU_MEMORY, host_memory: str | None = None,
                image: str = DEFAULT_VLLM_IMAGE, with_plan: bool = False):
    """(recipe, LaunchSpec) for a cluster: render always plans for device "cuda", for a GPU of
    `gpu_memory` (deterministic: not this machine's GPU), and for the LoRA kernels the server `image`
    can run (`server_kernels`). Plan errors refuse the render (exit 2)."""
    from ..recipe import load_recipe

    from ..plan import make_plan

    check_byte_options(gpu_memory=gpu_memory, host_memory=host_memory)
    loaded = load_recipe(recipe_path)
    # a backbone a cluster cannot reach is refused before planning (demo:// would be built here first)
    bb = loaded.recipe.backbone
    if bb.model:
        parse_source(bb.model, "backbone", bb.revision)
    plan = make_plan(loaded, device="cuda", gpu_memory=gpu_memory, host_memory=host_memory,
                     **server_kernels(image))
    if plan.errors:
        # a source a cluster cannot reach (local path, demo://) is the clearer reason: say that first
        make_context(loaded.recipe, plan.launch).check_sources()
        e = plan.errors[0]
        see = f"`peftdeploy plan {recipe_path} --device cuda --gpu-memory {gpu_memory}` lists every finding"
        raise RenderError(f"plan found {len(plan.errors)} error(s) for a {gpu_memory} GPU; "
                          f"first: {e.message}", fix=f"{e.fix}; {see}" if e.fix else see, location=e.location)
    if with_plan:
        return loaded, plan
    return loaded.recipe, plan.launch


def fleet_contexts(loaded, plan, *, gpu_memory: str | None, host_memory: str | None, image: str,
                   **options) -> list[RenderContext]:
    """One RenderContext per replica group of the plan's fleet (group recipe, planned for the cluster GPU)."""
    import dataclasses

    from ..launch.fleet import rename_served
    from ..plan import make_plan
    from ..plan.fleet import MERGED, group_recipe

    ctxs = []
    for g in plan.fleet.groups:
        gl = dataclasses.replace(loaded, recipe=group_recipe(loaded.recipe, plan.fleet, g))
        gp = make_plan(gl, device="cuda", gpu_memory=gpu_memory, host_memory=host_memory, **server_kernels(image))
        if gp.errors:
            e = gp.errors[0]
            raise RenderError(f"fleet group {g.name}: plan found {len(gp.errors)} error(s); first: {e.message}",
                              fix=e.fix, location=e.location)
        launch = rename_served(gp.launch, g.adapters[0] if g.kind == MERGED else plan.launch.served_model_name)
        ctxs.append(make_context(gl.recipe, launch, group=g.name, image=image,
                                 max_replicas=plan.fleet.max_replicas, **{**options, "replicas": g.replicas}))
    return ctxs


def write_out(out_dir: str, rendered: dict[str, dict[str, str]]) -> list[str]:
    """Write DIR/<target>/<file> atomically per target (temp dir, then rename). Returns paths."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".render-", dir=root))
    written: list[str] = []
    try:
        for target, files in rendered.items():
            tdir = stage / target
            for name, text in files.items():
                p = tdir / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(text, encoding="utf-8")
                if name.endswith(".sh"):
                    p.chmod(0o755)
                written.append(str(root / target / name))
        for target in rendered:
            dest = root / target
            old = None
            if dest.exists():
                old = stage / f".old-{target}"
                os.replace(dest, old)
            os.replace(stage / target, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return written


def as_stream(rendered: dict[str, dict[str, str]]) -> str:
    parts = []
    for target, files in rendered.items():
        for name, text in files.items():
            body = text if text.endswith("\n") else text + "\n"
            if not name.endswith((".yaml", ".yml")):  # notes, scripts: shown as comments
                body = "".join(f"# {ln}".rstrip() + "\n" for ln in body.splitlines())
            parts.append(f"# Source: {target}/{name}\n{body}")
    return "---\n".join(parts)


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

    from . import skipped_features

    image = resolve_image(image, load_recipe(recipe).recipe)
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
