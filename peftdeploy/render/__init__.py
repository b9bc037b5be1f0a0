"""render: the recipe's deployment as the native configuration of engines teams already run.

Like `helm template`: peftdeploy writes files and never runs a cluster. One module per target
(as PEFT's tuners), each exposing ``render(ctx: RenderContext) -> dict[filename, text]``; adding a
target is one new file plus one line in TARGETS. Output is deterministic (stable key order, sorted
where order is meaningless) and carries the recipe name and hash as labels/annotations. Secrets are
referenced (Secret names, ${VAR}), never written.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import DEFAULT_TOOLS_IMAGE, DEFAULT_VLLM_IMAGE, RenderContext, RenderError

if TYPE_CHECKING:  # pragma: no cover
    from ..launch.spec import LaunchSpec
    from ..recipe import Recipe

# target name -> module (imported on first use)
TARGETS: dict[str, str] = {
    "kubernetes": "peftdeploy.render.kubernetes",
    "production-stack": "peftdeploy.render.production_stack",
    "kserve": "peftdeploy.render.kserve",
    "ray-serve": "peftdeploy.render.ray_serve",
    "skypilot": "peftdeploy.render.skypilot",
}


def make_context(recipe: "Recipe", launch: "LaunchSpec", **options: Any) -> RenderContext:
    """A RenderContext from the recipe and its planned LaunchSpec (options: RenderContext fields)."""
    opts = {k: v for k, v in options.items() if v is not None}
    return RenderContext(recipe=recipe.public_dict(), recipe_name=recipe.name,
                         recipe_hash=recipe.compute_hash(), launch=launch, **opts)


def render(ctx: RenderContext, target: str) -> dict[str, str]:
    """Files (name -> text) of one target; RenderError (exit 2) when the recipe can't go there."""
    if target not in TARGETS:
        raise RenderError(f"unknown render target {target!r}", fix=f"use one of: {', '.join(TARGETS)}, all")
    if ctx.replicas < 1:
        raise RenderError(f"--replicas must be at least 1, got {ctx.replicas}")
    if ctx.launch.mode == "hybrid":
        raise RenderError("policy.mode hybrid is not rendered for clusters yet: its delta adapters are built "
                          "locally by `peftdeploy up`",
                          fix="render with policy.mode: serve or merge (an `extends` recipe can override just "
                              "the mode), and use hybrid with `peftdeploy up`")
    files = importlib.import_module(TARGETS[target]).render(ctx)
    return dict(sorted(files.items()))


def render_many(ctx: RenderContext, targets: list[str], *, skip_unrenderable: bool = False
                ) -> tuple[dict[str, dict[str, str]], dict[str, RenderError]]:
    """({target: files}, {target: why skipped}). Without skip_unrenderable the first error raises."""
    out: dict[str, dict[str, str]] = {}
    skipped: dict[str, RenderError] = {}
    for t in targets:
        try:
            out[t] = render(ctx, t)
        except RenderError as e:
            if not skip_unrenderable:
                raise
            skipped[t] = e
    return out, skipped


__all__ = ["DEFAULT_TOOLS_IMAGE", "DEFAULT_VLLM_IMAGE", "TARGETS", "RenderContext", "RenderError",
           "make_context", "render", "render_many"]
