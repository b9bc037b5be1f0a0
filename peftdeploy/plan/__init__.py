"""Plan: findings, memory budget, derived engine settings, mode choice and the launch command.

`make_plan(loaded)` resolves (metadata only), inspects, checks and derives; it never imports torch or
vLLM. The resulting `Plan` is frozen; `Plan.to_dict()` is what `peftdeploy plan --json` prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import Finding, PlanError, Severity
from ..inventory import Inventory
from ..quantize.cpu_isa import host_cpu_isa
from .derive import Derived
from .kernels import KernelChoice
from .memory import MemoryBudget
from .spec import LaunchSpec

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.loader import LoadedRecipe
    from ..recipe.schema import Recipe
    from ..sources import ResolvedRecipe


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    loaded: LoadedRecipe
    resolved: ResolvedRecipe
    inventory: Inventory
    findings: tuple[Finding, ...]
    derived: dict[str, Derived]  # name -> value + reason (max_lora_rank, max_loras, ...)
    memory: MemoryBudget | None  # None when the backbone could not be inspected
    mode: str  # "serve" | "merge" | "hybrid"
    mode_reason: str
    merge_adapters: tuple[str, ...]
    served_adapters: tuple[str, ...]
    lora_enabled: bool
    device: str
    launch: LaunchSpec
    # serving.lora_kernels resolved (plan/kernels.py); None when no adapter is served as LoRA (n/a)
    lora_kernels: KernelChoice | None = None
    # recipe.fleet planned (plan/fleet.py): groups, engines per group, predicted throughput; None: one engine
    fleet: Any = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == Severity.ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self, *, ignore: frozenset[str] = frozenset()) -> None:
        """PlanError for the plan's errors, but those whose code is in `ignore`."""
        errors = [e for e in self.errors if e.code not in ignore]
        if errors:
            e = errors[0]
            raise PlanError(f"plan found {len(errors)} error(s); first: {e.message}", errors,
                            fix=e.fix, location=e.location)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "recipe": self.recipe.name,
            "recipe_path": str(self.loaded.path),
            "device": self.device,
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "merge_adapters": list(self.merge_adapters),
            "served_adapters": list(self.served_adapters),
            "lora_enabled": self.lora_enabled,
            "lora_kernels": self.lora_kernels.to_dict() if self.lora_kernels else None,
            "findings": [f.to_dict() for f in self.findings],
            "derived": {k: v.to_dict() for k, v in self.derived.items()},
            "memory": self.memory.to_dict() if self.memory else None,
            "inventory": self.inventory.to_dict(),
            "launch": self.launch.to_dict(),
            "fleet": self.fleet.to_dict() if self.fleet is not None else None,
        }


def make_plan(loaded: LoadedRecipe, *, device: str | None = None, gpu_memory: int | str | None = None,
              host_memory: int | str | None = None, resolved: ResolvedRecipe | None = None, inventory: Inventory | None = None,
              offline: bool | None = None, vllm_version: str | None = "installed", lora_plugin: bool = True,
              server_image: str | None = None, traffic_source: str | None = None) -> Plan:
    """vllm_version: the vLLM the server runs, for serving.lora_kernels: auto ("installed": this machine's
    when the plan is for this machine's device, else unknown; None: unknown). lora_plugin / server_image:
    False / the image when the server has no peftdeploy plugin (`render` with a stock vLLM image).
    traffic_source: what policy.traffic is, for findings ("observed traffic" with `plan --observed`)."""
    from ..inventory import inspect
    from ..sources import resolve
    from . import command, derive, findings, fleet, hybrid, kernels, memory, policy, slots

    if resolved is None:
        resolved = resolve(loaded, fetch="metadata", offline=offline, progress=False)
    if inventory is None:
        inventory = inspect(resolved)
    dev = device if device not in (None, "auto") else memory.detect_device()
    r = loaded.recipe
    qm = inventory.model.quant_method if inventory.model else None
    if vllm_version == "installed":
        vllm_version = kernels.installed_vllm_version() if dev == memory.detect_device() else None
    kchoice = kernels.choose(r.serving.lora_kernels, dev, vllm_version=vllm_version, plugin=lora_plugin,
                             image=server_image)
    mode, reason, merge_adapters = policy.choose_mode(r, model_quant_method=qm, device=dev,
                                                      kernels=kchoice.effective)
    merged = set(merge_adapters)
    if mode == "merge" and r.policy.mode == "auto":
        served = []  # auto merges only when the other adapters get no traffic: they are not served
    elif mode == "hybrid":
        served = hybrid.delta_infos(r, inventory, merge_adapters[0])
    else:
        served = [a for a in inventory.adapters if a.name not in merged]
    lora_enabled = bool(served) or (mode == "serve" and r.policy.dynamic_loading and bool(r.policy.catalog))
    # hybrid: the hot adapter's B·A is part of every delta, so every adapter is checked as served
    checked = {a.name for a in inventory.adapters} if mode == "hybrid" else {a.name for a in served}
    served_ranks = {a.name: a.max_rank for a in served} if mode == "hybrid" else {}
    ctx = findings.CheckContext(loaded=loaded, inventory=inventory, mode=mode,
                                served=frozenset(checked), merged=frozenset(merged), device=dev,
                                served_ranks=served_ranks, local=server_image is None)
    fs = findings.check(ctx)
    if traffic_source is None and r.policy.traffic:
        traffic_source = "policy.traffic"
    derived, budget, mem_findings = derive.derive(
        r, inventory, device=dev, served=served, lora_enabled=lora_enabled,
        gpu_memory=memory.parse_bytes(gpu_memory), host_memory=memory.parse_bytes(host_memory), loc=ctx.loc,
        slot_shares=slots.served_shares(r, [a.name for a in served], mode), traffic_source=traffic_source,
        host_isa=host_cpu_isa() if dev == "cpu" and ctx.local else None)
    if gpu_memory is not None and dev == "cpu":
        fs.append(Finding("gpu-memory-ignored", Severity.WARNING,
                          f"--gpu-memory {gpu_memory} is ignored: the plan is for the CPU (KV cache and LoRA slots "
                          "live in host RAM there)", fix="give --host-memory for a CPU plan, or --device cuda to plan "
                          "for a GPU of that size", subject="serving", location=None))
    if not lora_enabled:
        kchoice = None
    elif kchoice.falls_back:
        fs.append(Finding("lora-kernels-fallback", Severity.WARNING, kchoice.reason,
                          fix="use a server with a vLLM release the kernels were verified on "
                              f"({', '.join(kernels.verified_versions(dev)) or 'none yet for ' + dev}) and the "
                              "peftdeploy plugin installed, or set serving.lora_kernels: vllm (or auto) to say so",
                          subject="serving", location=ctx.loc("serving", "lora_kernels")))
    if mode == "merge" and served:
        fs.append(Finding("served-on-merged", Severity.WARNING,
                          f"adapters {', '.join(a.name for a in served)} are served as LoRA on top of the merged "
                          f"model, but were trained on the unmerged backbone", fix="merge them too "
                          "(policy.merge.adapters), or deploy them separately with policy.mode: serve",
                          subject="policy", location=ctx.loc("policy", "merge", "adapters") or ctx.loc("policy", "mode")))
    if budget is not None and inventory.model is not None:
        from dataclasses import replace

        budget = replace(budget, schemes=memory.scheme_table(inventory.model, budget, recipe=r, device=dev, mode=mode,
                                                              local=server_image is None))
    fs = findings.sort_findings([*fs, *mem_findings])
    launch = command.build_launch(loaded=loaded, resolved=resolved, inventory=inventory, derived=derived, mode=mode,
                                  merge_adapters=merge_adapters, served=served, lora_enabled=lora_enabled, device=dev,
                                  lora_kernels=kchoice.value if kchoice else None)
    fleet_plan = fleet.plan_fleet(r, device=dev, kernels=kchoice.effective if kchoice else "vllm",
                                  traffic_source=traffic_source)
    return Plan(recipe=r, loaded=loaded, resolved=resolved, inventory=inventory, findings=tuple(fs), derived=derived,
                memory=budget, mode=mode, mode_reason=reason, merge_adapters=merge_adapters,
                served_adapters=tuple(a.name for a in served), lora_enabled=lora_enabled, device=dev, launch=launch,
                lora_kernels=kchoice, fleet=fleet_plan)


__all__ = ["Plan", "make_plan"]
