"""What `render` does before and after the targets: plan the recipe for a cluster GPU (not this machine's),
one context per fleet group, and write the files all at once (temp directory beside the output, then a
rename per target: no reader ever sees half a render) or as one YAML stream (`# Source:` lines, like
`helm template`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import RenderContext, RenderError, make_context
from .base import DEFAULT_VLLM_IMAGE, parse_source, server_kernels


DEFAULT_GPU_MEMORY = "80GiB"  # what render plans a cluster GPU as (this machine's GPU is not the cluster's)


def plan_launch(recipe_path: str, *, gpu_memory: str | None = DEFAULT_GPU_MEMORY, host_memory: str | None = None,
                image: str = DEFAULT_VLLM_IMAGE, with_plan: bool = False):
    """(recipe, LaunchSpec) for a cluster: render always plans for device "cuda", for a GPU of
    `gpu_memory` (deterministic: not this machine's GPU), and for the LoRA kernels the server `image`
    can run (`server_kernels`). Plan errors refuse the render (exit 2). The size options are checked by
    the caller (commands/render_cmd.py)."""
    from ..plan import make_plan
    from ..recipe import load_recipe

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
