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
    from ..plan.spec import LaunchSpec
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
    files = importlib.import_module(TARGETS[target]).render(target_context(ctx, target))
    return dict(sorted(files.items()))


# targets that run their own server image (the Ray cluster's, SkyPilot's pip install): never the plugin image
_OWN_IMAGE_TARGETS = ("ray-serve", "skypilot")
FLEET_TARGETS = ("kubernetes", "production-stack", "kserve", "ray-serve")


def target_context(ctx: RenderContext, target: str) -> RenderContext:
    import dataclasses

    if target in _OWN_IMAGE_TARGETS and ctx.plugin:
        return dataclasses.replace(ctx, image=DEFAULT_VLLM_IMAGE)
    return ctx


def skipped_features(ctxs: list[RenderContext], targets: list[str]) -> list[dict[str, str]]:
    """Per target, what the server there cannot carry (plus a fleet's routing where the target has none)."""
    out = []
    for t in targets:
        seen = set()
        for c in ctxs:
            for f in target_context(c, t).skipped_features():
                if f["feature"] not in seen:
                    seen.add(f["feature"])
                    out.append({"target": t, **f})
        if ctxs[0].group is not None and t in ("kubernetes", "kserve"):
            out.append({"target": t, "feature": "routing by model id",
                        "why": f"{t} has no OpenAI router that routes by the request's model: one "
                               f"{'InferenceService' if t == 'kserve' else 'Deployment + Service'} per replica "
                               "group (FLEET.txt lists which group serves which model)",
                        "fix": "render production-stack or ray-serve for one endpoint that routes by model"})
    return out


def render_fleet(ctxs: list[RenderContext], fleet: Any, target: str) -> dict[str, str]:
    """Files of one target for a fleet: one engine per replica group (contexts in group order)."""
    if target not in FLEET_TARGETS:
        raise RenderError(f"a fleet is not rendered for {target} yet (one service per replica group)",
                          fix=f"render one of {', '.join(FLEET_TARGETS)}, or drop the recipe's fleet section")
    if ctxs[0].replicas < 1:
        raise RenderError(f"--replicas must be at least 1, got {ctxs[0].replicas}")
    mod = importlib.import_module(TARGETS[target])
    return dict(sorted(mod.render_fleet([target_context(c, target) for c in ctxs], fleet).items()))


def render_many(ctx: RenderContext, targets: list[str], *, skip_unrenderable: bool = False,
                fleet: Any = None, group_ctxs: list[RenderContext] | None = None
                ) -> tuple[dict[str, dict[str, str]], dict[str, RenderError]]:
    """({target: files}, {target: why skipped}). Without skip_unrenderable the first error raises.
    With `fleet` and `group_ctxs` (one context per replica group) every target renders the fleet."""
    out: dict[str, dict[str, str]] = {}
    skipped: dict[str, RenderError] = {}
    for t in targets:
        try:
            out[t] = render_fleet(group_ctxs, fleet, t) if fleet is not None else render(ctx, t)
        except RenderError as e:
            if not skip_unrenderable:
                raise
            skipped[t] = e
    return out, skipped


__all__ = ["DEFAULT_TOOLS_IMAGE", "DEFAULT_VLLM_IMAGE", "FLEET_TARGETS", "TARGETS", "RenderContext", "RenderError",
           "make_context", "render", "render_fleet", "render_many", "skipped_features"]
