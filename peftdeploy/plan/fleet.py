"""Fleet planning: which adapters get merged replica groups, how many engines each group gets, and the
predicted fleet throughput. Pure and deterministic: no torch, no vLLM, no I/O.

Why groups: a decode batch that holds *any* LoRA request pays the LoRA kernels for every request in it
(`policy.py`: the measured ``active`` ratio), so on one engine the hot adapter never runs at merged speed
(hybrid on one H200: 0.72× ≈ plain multi-LoRA 0.71×). On replicas of its own, merged, it does (1.00×).

The model (units: one merged engine's throughput = 1):

* a *merged* group (one adapter folded into the backbone, no LoRA) runs at 1.0 per engine;
* a *multi-LoRA* group runs at ``policy.predicted_ratio(lora share within the group)`` per engine —
  the measured ``idle`` / ``active`` ratios of the device and LoRA kernels (`policy.RATIOS`);
* requests are routed by model id, so group g carries its share ``s_g`` of the traffic; the fleet's
  sustainable rate is limited by its most loaded group: ``T = min_g r_g · speed_g / s_g`` and the
  prediction is ``T / N`` (1.0 = N merged engines, each serving everything at merged speed — the
  unreachable ideal). The baseline in the same units is N identical multi-LoRA engines:
  ``predicted_ratio(total adapter share)``.

The rule (``fleet.dedicated: auto``): the adapters whose share fills at least one engine (``share · N >= 1``)
are candidates, in order of share (recipe order on ties); of the prefixes of that list that leave an engine
for the rest of the traffic, the one with the best prediction gets merged groups (ties: the shorter). An explicit ``fleet.dedicated`` list is used as written.
Engines are then handed out one at a time: every group starts with one, each further engine goes to the
group whose load per engine ``s_g / (r_g · speed_g)`` is the highest (first group on ties).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import policy

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.schema import Recipe

MERGED = "merged"
LORA = "lora"


@dataclass(frozen=True)
class Group:
    name: str  # engine / object name: <recipe>-<adapter> (merged) or <recipe>-lora
    kind: str  # MERGED | LORA
    adapters: tuple[str, ...]  # merged: (the adapter,); lora: the adapters served as LoRA
    models: tuple[str, ...]  # the OpenAI model ids it answers (the router's table)
    share: float  # of all requests
    replicas: int
    speed: float  # predicted throughput of one engine vs a merged engine
    reason: str

    @property
    def load(self) -> float:
        return self.share / (self.replicas * self.speed) if self.share > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "adapters": list(self.adapters), "models": list(self.models),
                "share": round(self.share, 6), "replicas": self.replicas, "speed": round(self.speed, 4),
                "reason": self.reason}


@dataclass(frozen=True)
class FleetPlan:
    replicas: int
    groups: tuple[Group, ...]
    predicted: float  # fleet throughput / (N merged engines)
    baseline: float  # N multi-LoRA engines that each serve everything, same units
    device: str
    kernels: str
    source: str  # where the measured ratios come from
    traffic: str  # "policy.traffic" | "observed traffic" | "uniform (no policy.traffic)"
    reason: str
    max_replicas: int | None = None
    recipe: str = ""  # the fleet recipe's name (the groups' names start with it)

    @property
    def gain(self) -> float:
        return self.predicted / self.baseline if self.baseline else 0.0

    def group_of(self, model: str) -> Group | None:
        for g in self.groups:
            if model in g.models:
                return g
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"replicas": self.replicas, "max_replicas": self.max_replicas,
                "groups": [g.to_dict() for g in self.groups],
                "predicted": round(self.predicted, 4), "baseline": round(self.baseline, 4),
                "gain": round(self.gain, 4), "device": self.device, "kernels": self.kernels,
                "source": self.source, "traffic": self.traffic, "reason": self.reason}


def _safe(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "x"


def group_name(recipe_name: str, suffix: str, taken: set[str]) -> str:
    """A DNS-label name (<= 63 chars) unique among `taken`."""
    base = f"{recipe_name}-{_safe(suffix)}"[:63].rstrip("-")
    name, i = base, 2
    while name in taken:
        tail = f"-{i}"
        name = base[:63 - len(tail)].rstrip("-") + tail
        i += 1
    taken.add(name)
    return name


def _speed(adapter_share: float, group_share: float, device: str, kernels: str) -> float:
    lora = adapter_share / group_share if group_share > 0 else 0.0
    return policy.predicted_ratio(lora, device, kernels=kernels)


def _allocate(n: int, demands: list[tuple[float, float]]) -> list[int]:
    """Engines per group: one each, then one at a time to the group with the highest load per engine.
    demands: (share, speed) per group."""
    reps = [1] * len(demands)
    for _ in range(n - len(demands)):
        loads = [s / (r * v) if s > 0 else 0.0 for (s, v), r in zip(demands, reps)]
        best = max(range(len(loads)), key=lambda i: (loads[i], -i))
        reps[best] += 1
    return reps


def _throughput(n: int, demands: list[tuple[float, float]], reps: list[int]) -> float:
    rates = [r * v / s for (s, v), r in zip(demands, reps) if s > 0]
    return min(rates) / n if rates else 0.0


def _layout(n: int, dedicated: list[str], shares: dict[str, float], base: float, names: list[str],
            need_lora: bool, device: str, kernels: str) -> tuple[list[tuple[str, tuple[str, ...], float, float]],
                                                               list[int], float]:
    """(groups as (kind, adapters, share, speed), engines per group, predicted) for a dedicated set."""
    groups: list[tuple[str, tuple[str, ...], float, float]] = [(MERGED, (a,), shares[a], 1.0) for a in dedicated]
    rest = tuple(a for a in names if a not in dedicated)
    rest_ad = sum(shares[a] for a in rest)
    if rest or need_lora:
        groups.append((LORA, rest, rest_ad + base, _speed(rest_ad, rest_ad + base, device, kernels)))
    demands = [(g[2], g[3]) for g in groups]
    reps = _allocate(n, demands)
    return groups, reps, _throughput(n, demands, reps)


def plan_fleet(recipe: Recipe, *, device: str = "cuda", kernels: str = "vllm",
               traffic_source: str | None = None) -> FleetPlan | None:
    """The fleet of `recipe` (None when it has no `fleet` section)."""
    f = recipe.fleet
    if f is None:
        return None
    n = f.replicas
    names = [a.name for a in recipe.adapters]
    shares, base, declared = policy._shares(recipe)
    traffic = traffic_source or ("policy.traffic" if declared else "uniform over the adapters (no policy.traffic)")
    need_lora = bool(base > 0 or (recipe.policy.catalog and recipe.policy.dynamic_loading) or not names)
    rat = policy.ratios(device, kernels)
    prequant = recipe.quantization.prequantized and not recipe.backbone.merge_base

    why: dict[str, str] = {}
    tried: tuple[str, float] | None = None  # auto: the hottest adapter's merged group, when one was weighed
    if isinstance(f.dedicated, list):
        dedicated = list(f.dedicated)
        for a in dedicated:
            why[a] = "named in fleet.dedicated"
        groups, reps, pred = _layout(n, dedicated, shares, base, names, need_lora, device, kernels)
    else:
        dedicated = []
        groups, reps, pred = _layout(n, dedicated, shares, base, names, need_lora, device, kernels)
        # the best prefix of the eligible adapters (largest share first); ties keep fewer merged groups
        order = sorted(names, key=lambda a: (-shares[a], names.index(a)))
        eligible = [] if prequant else [a for a in order if shares[a] * n >= 1.0 - 1e-9]
        for k in range(1, len(eligible) + 1):
            cand = eligible[:k]
            rest = any(x not in cand for x in names) or need_lora  # every listed adapter stays served
            if len(cand) + (1 if rest else 0) > n:
                break
            g2, r2, p2 = _layout(n, cand, shares, base, names, need_lora, device, kernels)
            if k == 1:
                tried = (cand[0], p2)
            if p2 > pred + 1e-9:
                dedicated, groups, reps, pred = cand, g2, r2, p2
        for a in dedicated:
            why[a] = f"{shares[a]:.0%} of the traffic fills {shares[a] * n:.2f} of {n} engines: merged, it runs with no LoRA"
    baseline = policy.predicted_ratio(sum(shares.values()), device, kernels=kernels)
    taken: set[str] = set()
    out: list[Group] = []
    base_name = recipe.name
    for (kind, ads, share, speed), r in zip(groups, reps):
        if kind == MERGED:
            out.append(Group(group_name(recipe.name, ads[0], taken), MERGED, ads, ads, share, r, speed, why[ads[0]]))
        else:
            reason = (f"multi-LoRA for {', '.join(ads) or 'no listed adapter'}"
                      f"{' and the base model' if base > 0 or not ads else ''}"
                      f"{' (and catalog adapters, resolved on first request)' if need_lora and recipe.policy.catalog else ''}"
                      f": {speed:.2f}× per engine")
            out.append(Group(group_name(recipe.name, "lora", taken), LORA, ads, (base_name, *ads), share, r, speed,
                             reason))
    merged = [g for g in out if g.kind == MERGED]
    if merged:
        reason = (f"{', '.join(g.adapters[0] for g in merged)} on merged engines, the rest on multi-LoRA: predicted "
                  f"{pred:.2f}× of {n} merged engines vs {baseline:.2f}× with every engine serving every adapter "
                  f"({pred / baseline if baseline else 0:.2f}×)")
    elif tried is not None:
        a, p2 = tried
        reason = (f"a merged engine for {a} ({shares[a]:.0%} of the traffic) is predicted {p2:.2f}× of {n} merged "
                  f"engines, every engine serving all adapters with multi-LoRA {pred:.2f}×: multi-LoRA everywhere")
    else:
        reason = (f"no adapter's share fills one of {n} engines ({traffic}), so every engine serves all adapters with "
                  f"multi-LoRA: predicted {pred:.2f}× of {n} merged engines")
        if prequant:
            reason = ("the backbone is pre-quantized with no merge_base, so nothing is merged; every engine serves "
                      f"all adapters with multi-LoRA: predicted {pred:.2f}×")
    src = rat["source"] + (f"; {rat['note']}" if rat["note"] else "")
    return FleetPlan(replicas=n, groups=tuple(out), predicted=pred, baseline=baseline, device=device,
                     kernels=kernels, source=src, traffic=traffic, reason=reason, max_replicas=f.max_replicas,
                     recipe=recipe.name)


def group_recipe(recipe: Recipe, fleet: FleetPlan, group: Group) -> Any:
    """The single-engine recipe of one group (name = the group's, no fleet): merged groups merge their
    adapter (policy.mode merge), the multi-LoRA group serves the rest (policy.mode serve)."""
    p = recipe.policy
    if group.kind == MERGED:
        a = group.adapters[0]
        pol = p.model_copy(update={"mode": "merge", "merge": p.merge.model_copy(update={"adapters": [a]}),
                                   "traffic": {a: 1.0}, "catalog": []})
        ads = [recipe.adapter(a)]
    else:
        keep = set(group.adapters)
        traffic = None
        if p.traffic:
            traffic = {k: v for k, v in p.traffic.items() if k in keep or k == "base"} or None
        pol = p.model_copy(update={"mode": "serve", "traffic": traffic,
                                   "hybrid": p.hybrid.model_copy(update={"hot": None})})
        ads = [x for x in recipe.adapters if x.name in keep]
    return recipe.model_copy(update={"name": group.name, "adapters": ads, "policy": pol, "fleet": None})


def assign_devices(fleet: FleetPlan, gpus: list[str], per_engine: int) -> list[tuple[str, int, str]]:
    """(group name, replica index, CUDA_VISIBLE_DEVICES) per engine, in group order: engine k gets the
    k-th run of `per_engine` GPUs. ValueError when there are too few."""
    total = sum(g.replicas for g in fleet.groups)
    if total * per_engine > len(gpus):
        raise ValueError(f"the fleet has {total} engine(s) of {per_engine} GPU(s) each, but {len(gpus)} GPU(s) are "
                         f"visible ({','.join(gpus) or 'none'})")
    out, k = [], 0
    for g in fleet.groups:
        for i in range(g.replicas):
            out.append((g.name, i, ",".join(gpus[k * per_engine:(k + 1) * per_engine])))
            k += 1
    return out


CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's CPU OpenMP core list for an engine ("0-3", "4,5", "auto")


def assign_cpu_cores(engines: int, cpus: list[int]) -> list[str] | None:
    """vLLM CPU core list per engine, or None when `cpus` cannot give every engine a core of its own.

    vLLM's automatic binding puts every engine of a host on the same cores (its OpenMP threads on core 0 .. n-2,
    the last core kept for the scheduler), so N engines started side by side would share them. Here engine k
    gets the k-th contiguous run of the usable cores; with more cores than engines the last one is kept free
    for the API servers and schedulers, as vLLM's own binding does."""
    cpus = sorted(cpus)
    if engines < 1 or len(cpus) < engines:
        return None
    pool = cpus[:-1] if len(cpus) > engines else cpus
    q, r = divmod(len(pool), engines)
    out, lo = [], 0
    for k in range(engines):
        n = q + (k < r)
        out.append(",".join(map(str, pool[lo:lo + n])))
        lo += n
    return out
