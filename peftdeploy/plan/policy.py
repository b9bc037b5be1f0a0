"""Mode auto: choose merge, serve (multi-LoRA) or hybrid, print the choice with the predicted
throughput ratio and the reason.

Evidence (same run, same machine; ratios to the merged model's output tokens/s):

* GPU, ``docs/bench/gpu-h200.md`` (H200, vLLM 0.26, Llama-3-8B shape, 8 rank-16 all-linear adapters,
  Zipf(1.0), 64 streams): LoRA enabled but only base traffic 0.99; plain multi-LoRA 0.71; tuned
  (dual stream, specialize-active-lora) 0.69-0.71; hybrid (hottest adapter, 37% of traffic, merged;
  the rest as rank-32 deltas) 0.72. A profile shows why: vLLM's punica shrink/expand kernels cost
  the same per decode step whether all or some of the batch's tokens use an adapter, so a batch
  with *any* LoRA request pays the whole LoRA cost.
* GPU, ``docs/bench/gpu-kernels.md`` (the same setup, 2026-12-02, one lease): peftdeploy's Triton kernels
  0.83, vLLM's kernels 0.71 in the same lease (merged 3468 out tok/s). A second lease that day, with the
  per-step metadata built on the host (no device read-back): peftdeploy's kernels 0.85, base traffic on
  the same server 0.99; vLLM's kernels 0.72 (merged 3285 out tok/s). Lease 5 (2026-12-03), the LoRA shrink
  inside the base GEMM (vllm_plugin/lora_kernels/gemm_fused.py): 0.91 (3 runs 0.90-0.91), base traffic 0.99;
  lease 6 the same day 0.89 (0.92 / 0.89 / 0.89), vLLM's kernels 0.71; lease 7 0.88 (0.885 / 0.877 / 0.874);
  lease 8 (2026-12-07, an H100) 0.896 and 0.898 (six runs 0.895-0.899).
  The model uses 0.89, the median of the H200's nine runs: a lone adapter is still merged (serving costs more than `MERGE_MARGIN`) and hybrid still wins
  only for nearly-all-one-adapter traffic: auto decides as with 0.85.
* CPU, ``docs/bench/cpu/bench_lora_kernels_cpu.json`` (2026-12-02, the demo recipe, 8 streams, medians of 3):
  peftdeploy's kernels base traffic 0.99, 1 adapter 0.77, 3 adapters Zipf(1.0) 0.66; vLLM's in the same run
  0.84 / 0.28 / 0.34. Rerun after the kernels skip untargeted modules and padded ranks (one run, a loaded
  machine): base traffic 0.93, 1 adapter 0.86, 3 adapters 0.73; vLLM's 0.70 / 0.21 / 0.23. 2026-12-07, the
  LoRA model compiled (cpu_compile.py, the default since): 1.00 / 1.04 / 1.06, eager in the same run 0.90 /
  1.00 / 0.93, vLLM's 0.73 / 0.31 / 0.39; a second run (merged and compiled only) 0.95 / 0.98 / 0.94. The
  model uses the second run's 0.95 / 0.94: a lone adapter is still merged on CPU (0.94 < 1 - `MERGE_MARGIN`),
  by a hair.
* CPU, ``docs/bench/cpu/`` (the demo recipe on 2 cores, ``scripts/bench_compare_cpu.py``, medians of 3):
  LoRA enabled, base traffic 0.79; one adapter 0.33; 3 adapters Zipf(1.0) at max_loras 3 0.35, at
  max_loras 1 0.23.

Hence the model used here: with a share ``s`` of requests needing LoRA and ``B`` requests per
decode batch, a batch is LoRA-free with probability ``(1 - s)**B``; the predicted ratio is
``p0 * idle + (1 - p0) * active`` with the measured ``idle`` (LoRA on, unused) and ``active``
ratios of the device *and of the LoRA kernels the plan resolved* (``serving.lora_kernels``,
plan/kernels.py: peftdeploy's own or vLLM's). `RATIOS` holds them per device and kernels; a number
not yet measured is ``None`` and falls back to the vLLM kernels' number for that device (the reason
says so). Merge is 1.00 and possible only when every request goes to the merged adapter.

The rule:

1. ``policy.mode: serve|merge|hybrid`` is used as written (the reason still shows the prediction).
2. auto with no adapters -> serve (the bare backbone).
3. auto with a pre-quantized backbone (awq/gptq) and no ``backbone.merge_base`` -> serve:
   peftdeploy never merges into quantized weights.
4. auto, exactly one adapter receives traffic and the bare backbone none (one adapter and no
   ``policy.traffic``, or ``policy.traffic`` giving one adapter all of it) -> merge, but only when
   serving it is predicted to cost more than `MERGE_MARGIN` (5%): ``serve < 1 - MERGE_MARGIN``.
   Otherwise serve: when separate adapters run within 5% of merged speed, serving keeps the adapter
   swappable (a new version is a file copy, no merge step, no second copy of the backbone) and the
   base model available, which is worth more to a user than the last few percent.
5. otherwise serve, unless hybrid's predicted ratio beats serve's by `HYBRID_MARGIN` — which,
   by the vLLM-kernel measurements above, happens only when nearly all traffic is on one adapter and
   the rest is rare enough that many batches hold no LoRA request at all. With kernels whose
   ``active`` ratio is within `HYBRID_MARGIN` of 1.0 hybrid can never win (its best case is 1.0), so
   auto then serves every multi-adapter recipe unmerged.
6. A dominant adapter (>= 80%) gets a note suggesting a dedicated merged deployment for it — only
   while serving is predicted to cost more than `MERGE_MARGIN`.

Changing a measured number is a one-line edit of `RATIOS`; tests/test_plan.py checks the rule with
injected ratios (e.g. peftdeploy kernels at 0.96 active: one adapter is served, not merged).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.schema import Recipe

DOMINANT_SHARE = 0.80
HYBRID_MARGIN = 0.05  # hybrid costs a merge and doubles delta ranks: choose it only for a clear gain
MERGE_MARGIN = 0.05  # merge a lone adapter only when serving it is predicted to cost more than this
BATCH = 64  # requests per decode batch assumed by the prediction (the GPU measurement's concurrency)
KERNELS = ("vllm", "peftdeploy")

# Measured ratios to merged throughput, per device and LoRA kernels: idle = LoRA enabled, no request uses
# it; active = LoRA in use. None = not yet measured: the vllm kernels' number of that device is used.
RATIOS: dict[str, dict[str, dict[str, Any]]] = {
    "cuda": {
        "vllm": {"idle": 0.99, "active": 0.71, "source": "docs/bench/gpu-h200.md (0.71 again in docs/bench/gpu-kernels.md)"},
        # leases 5-7 of 2026-12-03 (docs/bench/gpu-kernels.md): GEMM-fused LoRA, 8 adapters 0.91 / 0.89 / 0.88 (nine
        # runs 0.87-0.92, median 0.89), base traffic 0.98-0.99; the split Triton kernels were 0.85 (lease 2), 0.84 (3);
        # lease 8 (2026-12-07, H100) 0.896 / 0.898
        "peftdeploy": {"idle": 0.99, "active": 0.89, "source": "docs/bench/gpu-kernels.md"},
    },
    "cpu": {
        "vllm": {"idle": 0.79, "active": 0.35, "source": "docs/bench/cpu/bench_compare_cpu.json"},
        # 2026-12-07, the LoRA model compiled (the default since): base traffic / 1 adapter / 3 adapters Zipf(1.0)
        # 1.00 / 1.04 / 1.06 and, in a second run, 0.95 / 0.98 / 0.94 (vLLM's kernels 0.73 / 0.31 / 0.39): the
        # second run's numbers, the lower ones (a ratio above 1 is this machine's drift between servers)
        "peftdeploy": {"idle": 0.95, "active": 0.94,
                       "source": "docs/bench/cpu/bench_lora_kernels_cpu.json, bench_lora_kernels_cpu_run2.json"},
    },
}


def ratios(device: str = "cuda", kernels: str = "vllm") -> dict[str, Any]:
    """{idle, active, source, measured, note} for `device` and `kernels`; numbers not yet measured for
    `kernels` are the vllm kernels' (measured False, note says so). Unknown devices use cuda's."""
    dev = RATIOS.get(device, RATIOS["cuda"])
    base = dev["vllm"]
    own = dev.get(kernels, base)
    out: dict[str, Any] = {}
    missing = []
    for k in ("idle", "active"):
        v = own.get(k)
        if v is None:
            missing.append(k)
            v = base[k]
        out[k] = float(v)
    out["measured"] = not missing
    if not missing:
        out["source"] = own.get("source") or base["source"]
        out["note"] = ""
    else:
        out["source"] = base["source"] if len(missing) == 2 else f"{own.get('source')}; {base['source']}"
        out["note"] = (f"{kernels} kernels' {' and '.join(missing)} ratio on {device} not yet measured: "
                       "the vllm kernels' number is used")
    return out


def predicted_ratio(lora_share: float, device: str = "cuda", batch: int = BATCH, kernels: str = "vllm") -> float:
    """Throughput relative to the merged model when a share `lora_share` of requests needs LoRA."""
    r = ratios(device, kernels)
    s = min(max(lora_share, 0.0), 1.0)
    p0 = (1.0 - s) ** batch
    return p0 * r["idle"] + (1.0 - p0) * r["active"]


def _shares(recipe: Recipe) -> tuple[dict[str, float], float, bool]:
    """(adapter -> share, base share, declared) normalised to sum 1; uniform over adapters if undeclared."""
    names = [a.name for a in recipe.adapters]
    traffic = recipe.policy.traffic
    if not traffic:
        return ({n: 1.0 / len(names) for n in names} if names else {}), 0.0, False
    total = sum(float(v) for v in traffic.values()) or 1.0
    return {n: float(traffic.get(n, 0.0)) / total for n in names}, float(traffic.get("base", 0.0)) / total, True


def predictions(recipe: Recipe, device: str = "cuda", kernels: str = "vllm") -> dict[str, float]:
    """Predicted ratio to merged throughput of each mode for this recipe's traffic."""
    shares, base, _ = _shares(recipe)
    out = {"serve": predicted_ratio(sum(shares.values()), device, kernels=kernels)}
    if shares:
        hot = recipe.hot_adapter()
        # base + others run as deltas
        out["hybrid"] = predicted_ratio(1.0 - shares.get(hot, 0.0), device, kernels=kernels)
        active = [n for n, s in shares.items() if s > 0]
        if len(active) == 1 and base == 0:
            out["merge"] = 1.0
    return out


def _fmt(p: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}×" for k, v in sorted(p.items(), key=lambda kv: -kv[1]))


def choose_mode(recipe: Recipe, *, model_quant_method: str | None = None, device: str = "cuda",
                kernels: str = "vllm") -> tuple[str, str, tuple[str, ...]]:
    """(mode, reason, adapters to merge). `kernels`: the LoRA kernels that will run (plan/kernels.py)."""
    p = recipe.policy
    names = [a.name for a in recipe.adapters]
    pred = predictions(recipe, device, kernels)
    rat = ratios(device, kernels)
    evidence = (f"predicted throughput vs merged on {device} with {kernels} kernels: {_fmt(pred)} "
                f"(measured ratios: {rat['source']}{'; ' + rat['note'] if rat['note'] else ''})")
    serve_cheap = pred["serve"] >= 1.0 - MERGE_MARGIN
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
    lone = None
    if len(names) == 1 and base_share == 0:
        lone = names[0], f"exactly one adapter ({names[0]}) and no traffic to the bare backbone"
    active = [n for n in names if shares.get(n, 0.0) > 0]
    if lone is None and declared and len(active) == 1 and base_share == 0:
        lone = active[0], f"policy.traffic sends all requests to {active[0]} (others and base: 0)"
    if lone is not None:
        name, why = lone
        if not serve_cheap:
            return "merge", f"auto: {why}: merging removes LoRA overhead; {evidence}", (name,)
        return "serve", (f"auto: {why}, but serving it unmerged is predicted within {MERGE_MARGIN:.0%} of merged "
                         f"({pred['serve']:.2f}×): served, the adapter stays swappable (no merge step, no second "
                         f"copy of the backbone); set policy.mode: merge for the last few percent; {evidence}"), ()
    hot = recipe.hot_adapter()
    if pred.get("hybrid", 0.0) >= pred["serve"] + HYBRID_MARGIN:
        return "hybrid", (f"auto: {hot} takes {shares.get(hot, 0):.0%} of the traffic and the rest is rare enough "
                          f"that most batches need no LoRA: {hot} is merged, the others served as deltas; "
                          f"{evidence}"), (hot,)
    why_not_hybrid = ""
    if "hybrid" in pred and serve_cheap:
        why_not_hybrid = (f"; hybrid would not help ({pred['hybrid']:.2f}× vs {pred['serve']:.2f}×): serving "
                          f"unmerged is already within {MERGE_MARGIN:.0%} of merged")
    elif "hybrid" in pred:
        why_not_hybrid = (f"; hybrid would not help ({pred['hybrid']:.2f}× vs {pred['serve']:.2f}×): with "
                          f"{1 - shares.get(hot, 0):.0%} of requests still needing LoRA, nearly every batch "
                          "pays the LoRA kernels")
    top_share = shares.get(hot, 0.0)
    if declared and top_share >= DOMINANT_SHARE and not serve_cheap:
        return "serve", (f"auto: {hot} has {top_share:.0%} of the traffic, but {len(active) - 1} other adapter(s)"
                         f"{' and the base' if base_share else ''} also get requests, so all are served as LoRA; "
                         f"consider a separate merged deployment for {hot}{why_not_hybrid}; {evidence}"), ()
    return "serve", (f"auto: {len(names)} adapters share the traffic, so they are served unmerged with multi-LoRA"
                     f"{why_not_hybrid}; {evidence}"), ()
