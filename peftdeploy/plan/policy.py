"""Mode auto: decide merge or serve, with the reason printed by `plan`.

The rule (documented in `peftdeploy plan` output and README):

1. `policy.mode: serve|merge` is used as written.
2. auto with no adapters -> serve (the bare backbone).
3. auto with a pre-quantized backbone (awq/gptq) and no `backbone.merge_base` -> serve: peftdeploy
   never merges into quantized weights.
4. auto -> merge when exactly one adapter receives traffic and the bare backbone receives none:
   either the recipe has exactly one adapter and `policy.traffic` gives `base` no share (or is
   absent), or `policy.traffic` gives one adapter a share > 0 and every other adapter and `base` 0.
   One adapter for all requests is what merging is for: no LoRA kernels, no slot memory.
5. otherwise serve. When one adapter has >= 80% of the declared traffic the reason says so and
   suggests a dedicated merged deployment for it (serving the others on a merged model would be
   wrong: they were trained on the original backbone).
"""
from __future__ import annotations

from typing import Any

DOMINANT_SHARE = 0.80


def choose_mode(recipe: Any, *, model_quant_method: str | None = None) -> tuple[str, str, tuple[str, ...]]:
    """(mode, reason, adapters to merge)."""
    p = recipe.policy
    names = [a.name for a in recipe.adapters]
    if p.mode == "serve":
        return "serve", "policy.mode is serve", ()
    if p.mode == "merge":
        return "merge", "policy.mode is merge", tuple(recipe.merge_adapter_names())
    if p.mode == "hybrid":
        hot = recipe.hot_adapter()
        return "hybrid", (f"policy.mode is hybrid: {hot} is merged into the backbone and runs with no LoRA; "
                          "the other adapters and the bare backbone are served as exact deltas"), (hot,)
    # auto
    if not names:
        return "serve", "auto: no adapters, so the bare backbone is served", ()
    prequant = recipe.quantization.prequantized or model_quant_method in ("awq", "gptq")
    if prequant and not recipe.backbone.merge_base:
        return "serve", ("auto: the backbone is pre-quantized and has no merge_base; peftdeploy never merges "
                         "into quantized weights"), ()
    traffic = p.traffic or {}
    base_share = float(traffic.get("base", 0.0))
    if len(names) == 1 and base_share == 0:
        return "merge", (f"auto: exactly one adapter ({names[0]}) and no traffic to the bare backbone: merging "
                         "removes LoRA overhead"), (names[0],)
    if traffic:
        total = sum(float(v) for v in traffic.values()) or 1.0
        active = [n for n in names if float(traffic.get(n, 0.0)) > 0]
        if len(active) == 1 and base_share == 0:
            return "merge", (f"auto: policy.traffic sends all requests to {active[0]} (others and base: 0): "
                             "merging it removes LoRA overhead"), (active[0],)
        top = max(names, key=lambda n: float(traffic.get(n, 0.0)))
        share = float(traffic.get(top, 0.0)) / total
        if share >= DOMINANT_SHARE:
            return "serve", (f"auto: {top} has {share:.0%} of the traffic, but {len(active) - 1} other adapter(s)"
                             f"{' and the base' if base_share else ''} also get requests, so all are served as "
                             f"LoRA; consider a separate merged deployment for {top}"), ()
    return "serve", f"auto: {len(names)} adapters share the traffic, so they are served unmerged with multi-LoRA", ()
