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

from ..cli_common import emit_json, json_option, user_errors
from . import TARGETS, RenderContext, RenderError, make_context, render_many
from .base import DEFAULT_TOOLS_IMAGE, DEFAULT_VLLM_IMAGE


def plan_launch(recipe_path: str):
    """(recipe, LaunchSpec) for a cluster: render always plans for device "cuda"."""
    from ..recipe import load_recipe

    loaded = load_recipe(recipe_path)
    try:
        from ..plan import make_plan
    except ImportError as e:  # the plan stage not installed / built
        raise RenderError(f"`peftdeploy render` needs the plan stage, which is not available here ({e})")
    plan = make_plan(loaded, device="cuda")
    return loaded.recipe, plan.launch


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
@click.option("--image", default=DEFAULT_VLLM_IMAGE, show_default=True, help="vLLM server image.")
@click.option("--tools-image", default=DEFAULT_TOOLS_IMAGE, show_default=True,
              help="Image with peftdeploy (runs `peftdeploy merge` in-cluster under merge policy).")
@click.option("--gpu-type", default="nvidia.com/gpu", show_default=True, help="Kubernetes GPU resource name.")
@click.option("--accelerator", default=None, help="SkyPilot / Ray accelerator type, e.g. H100.")
@click.option("--storage-size", default="200Gi", show_default=True, help="PVC size for the merged model.")
@click.option("--store", default=None,
              help="ray-serve: s3://bucket/prefix it loads LoRA adapters (and merged models) from.")
@json_option
@user_errors
def render_cmd(recipe: str, target: str, replicas: int, out_dir: str | None, namespace: str, image: str,
               tools_image: str, gpu_type: str, accelerator: str | None, storage_size: str,
               store: str | None, as_json: bool) -> None:
    """Render the recipe for Kubernetes, vLLM production-stack, KServe, Ray Serve or SkyPilot.

    Sources are used as the recipe writes them (hf://, s3://); local and demo:// sources are refused.
    Secrets are referenced (Secret names, ${VAR}), never written.
    """
    r, launch = plan_launch(recipe)
    ctx: RenderContext = make_context(r, launch, replicas=replicas, namespace=namespace, image=image,
                                      tools_image=tools_image, gpu_type=gpu_type, accelerator=accelerator,
                                      storage_size=storage_size, store=store)
    targets = list(TARGETS) if target == "all" else [target]
    rendered, skipped = render_many(ctx, targets, skip_unrenderable=target == "all")
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
        })
    elif out_dir:
        for p in written:
            click.echo(f"wrote {p}")
    else:
        click.echo(as_stream(rendered), nl=False)
    for t, e in skipped.items() if not as_json else ():
        click.echo(f"skipped {t}: {e.message}" + (f"\n  fix: {e.fix}" if e.fix else ""), err=True)
