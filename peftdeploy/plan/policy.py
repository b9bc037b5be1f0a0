"""Mode auto: choose merge, serve (multi-LoRA) or hybrid, print the choice with the predicted
throughput ratio and the reason.

Evidence (same run, same machine; ratios to the merged model's output tokens/s):

* GPU, ``docs/bench/gpu-h200.md`` (H200, vLLM 0.26, Llama-3-8B shape, 8 rank-16 all-linear adapters,
  Zipf(1.0), 64 streams): LoRA enabled but only base traffic 0.99; plain multi-LoRA 0.71; tuned
  (dual stream, specialize-active-lora) 0.69-0.71; hybrid (hottest adapter, 37% of traffic, merged;
  the rest as rank-32 deltas) 0.72. A profile shows why: vLLM's punica shrink/expand kernels cost
  the same per decode step whether all or some of the batch's tokens use an adapter, so a batch
  with *any* LoRA request pays the whole LoRA cost.
* CPU, ``docs/bench/cpu/`` (the demo recipe on 2 cores, ``scripts/bench_compare_cpu.py``, medians of 3):
  LoRA enabled, base traffic 0.79; one adapter 0.33; 3 adapters Zipf(1.0) at max_loras 3 0.35, at
  max_loras 1 0.23.

Hence the model used here: with a share ``s`` of requests needing LoRA and ``B`` requests per
decode batch, a batch is LoRA-free with probability ``(1 - s)**B``; the predicted ratio is
``p0 * idle + (1 - p0) * active`` with the measured ``idle`` (LoRA on, unused) and ``active``
ratios of the device. Merge is 1.00 and possible only when every request goes to the merged adapter.

The rule:

1. ``policy.mode: serve|merge|hybrid`` is used as written (the reason still shows the prediction).
2. auto with no adapters -> serve (the bare backbone).
3. auto with a pre-quantized backbone (awq/gptq) and no ``backbone.merge_base`` -> serve:
   peftdeploy never merges into quantized weights.
4. auto -> merge when exactly one adapter receives traffic and the bare backbone receives none
   (one adapter and no ``policy.traffic``, or ``policy.traffic`` giving one adapter all of it).
5. otherwise serve, unless hybrid's predicted ratio beats serve's by ``HYBRID_MARGIN`` — which,
   by the measurements above, happens only when nearly all traffic is on one adapter and the rest
   is rare enough that many batches hold no LoRA request at all. A dominant adapter (>= 80%) gets a
   note suggesting a dedicated merged deployment for it.
"""
from __future__ import annotations

from typing import Any

DOMINANT_SHARE = 0.80
HYBRID_MARGIN = 0.05  # hybrid costs a merge and doubles delta ranks: choose it only for a clear gain
BATCH = 64  # requests per decode batch assumed by the prediction (the GPU measurement's concurrency)

# Measured ratios to merged throughput: idle = LoRA enabled, no request uses it; active = LoRA in use.
RATIOS: dict[str, dict[str, Any]] = {
    "cuda": {"idle": 0.99, "active": 0.71, "source": "docs/bench/gpu-h200.md"},
    "cpu": {"idle": 0.79, "active": 0.35, "source": "docs/bench/cpu/bench_compare_cpu.json"},
}


def predicted_ratio(lora_share: float, device: str = "cuda", batch: int = BATCH) -> float:
    """Throughput relative to the merged model when a share `lora_share` of requests needs LoRA."""
    r = RATIOS.get(device, RATIOS["cuda"])
    s = min(max(lora_share, 0.0), 1.0)
    p0 = (1.0 - s) ** batch
    return p0 * r["idle"] + (1.0 - p0) * r["active"]


def _shares(recipe: Any) -> tuple[dict[str, float], float, bool]:
    """(adapter -> share, base share, declared) normalised to sum 1; uniform over adapters if undeclared."""
    names = [a.name for a in recipe.adapters]
    traffic = recipe.policy.traffic
    if not traffic:
        return ({n: 1.0 / len(names) for n in names} if names else {}), 0.0, False
    total = sum(float(v) for v in traffic.values()) or 1.0
    return {n: float(traffic.get(n, 0.0)) / total for n in names}, float(traffic.get("base", 0.0)) / total, True


def predictions(recipe: Any, device: str = "cuda") -> dict[str, float]:
    """Predicted ratio to merged throughput of each mode for this recipe's traffic."""
    shares, base, _ = _shares(recipe)
    out = {"serve": predicted_ratio(sum(shares.values()), device)}
    if shares:
        hot = recipe.hot_adapter()
        out["hybrid"] = predicted_ratio(1.0 - shares.get(hot, 0.0), device)  # base + others run as deltas
        active = [n for n, s in shares.items() if s > 0]
        if len(active) == 1 and base == 0:
            out["merge"] = 1.0
    return out


def _fmt(p: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}×" for k, v in sorted(p.items(), key=lambda kv: -kv[1]))


def choose_mode(recipe: Any, *, model_quant_method: str | None = None,
                device: str = "cuda") -> tuple[str, str, tuple[str, ...]]:
    """(mode, reason, adapters to merge)."""
    p = recipe.policy
    names = [a.name for a in recipe.adapters]
    pred = predictions(recipe, device)
    src = RATIOS.get(device, RATIOS["cuda"])["source"]
    evidence = f"predicted throughput vs merged on {device}: {_fmt(pred)} (measured ratios: {src})"
    if p.mode == "serve":
        return "serve", f"policy.mode is serve; {evidence}", ()
    if p.mode == "merge":
        return "merge", "policy.mode is merge", tuple(recipe.merge_adapter_names())
    if p.mode == "hybrid":
        hot = recipe.hot_adapter()
        return "hybrid", (f"policy.mode is hybrid: {hot} is merged into the backbone and runs with no LoRA; "
                          f"the other adapters and the bare backbone are served as exact deltas; {evidence}"), (hot,)
    # auto
    if not names:
        return "serve", "auto: no adapters, so the bare backbone is served", ()
    prequant = recipe.quantization.prequantized or model_quant_method in ("awq", "gptq")
    if prequant and not recipe.backbone.merge_base:
        return "serve", ("auto: the backbone is pre-quantized and has no merge_base; peftdeploy never merges "
                         f"into quantized weights; {evidence}"), ()
    shares, base_share, declared = _shares(recipe)
    if len(names) == 1 and base_share == 0:
        return "merge", (f"auto: exactly one adapter ({names[0]}) and no traffic to the bare backbone: merging "
                         f"removes LoRA overhead; {evidence}"), (names[0],)
    active = [n for n in names if shares.get(n, 0.0) > 0]
    if declared and len(active) == 1 and base_share == 0:
        return "merge", (f"auto: policy.traffic sends all requests to {active[0]} (others and base: 0): "
                         f"merging it removes LoRA overhead; {evidence}"), (active[0],)
    hot = recipe.hot_adapter()
    if pred.get("hybrid", 0.0) >= pred["serve"] + HYBRID_MARGIN:
        return "hybrid", (f"auto: {hot} takes {shares.get(hot, 0):.0%} of the traffic and the rest is rare enough "
                          f"that most batches need no LoRA: {hot} is merged, the others served as deltas; "
                          f"{evidence}"), (hot,)
    why_not_hybrid = ""
    if "hybrid" in pred:
        why_not_hybrid = (f"; hybrid would not help ({pred['hybrid']:.2f}× vs {pred['serve']:.2f}×): with "
                          f"{1 - shares.get(hot, 0):.0%} of requests still needing LoRA, nearly every batch "
                          "pays the LoRA kernels")
    top_share = shares.get(hot, 0.0)
    if declared and top_share >= DOMINANT_SHARE:
        return "serve", (f"auto: {hot} has {top_share:.0%} of the traffic, but {len(active) - 1} other adapter(s)"
                         f"{' and the base' if base_share else ''} also get requests, so all are served as LoRA; "
                         f"consider a separate merged deployment for {hot}{why_not_hybrid}; {evidence}"), ()
    return "serve", (f"auto: {len(names)} adapters share the traffic, so they are served unmerged with multi-LoRA"
                     f"{why_not_hybrid}; {evidence}"), ()
