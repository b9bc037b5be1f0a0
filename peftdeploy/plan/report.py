"""Readable `peftdeploy plan` report (rich tables): adapters, findings, derived settings, memory, command."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import Severity
from .memory import gib

if TYPE_CHECKING:  # pragma: no cover
    from . import Plan

_SEV_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def render(plan: Plan, console: Any) -> None:
    from rich.table import Table

    r = plan.recipe
    m = plan.inventory.model
    console.print(f"[bold]plan[/bold] {r.name}  ({plan.loaded.path})")
    console.print(f"mode: [bold]{plan.mode}[/bold] — {plan.mode_reason}")
    console.print(f"device: {plan.device}")
    k = getattr(plan, "lora_kernels", None)
    if k is not None:
        from rich.markup import escape

        console.print(f"lora kernels: [bold]{k.value}[/bold] — {escape(k.reason)}", highlight=False)
    else:
        console.print("lora kernels: n/a (no adapter is served as LoRA)")
    if plan.launch.merge is not None:
        from ..util import merge_kernel_note

        why = merge_kernel_note()
        if why:
            console.print(f"merge kernel: [yellow]numpy, about 2x slower[/yellow]: {why}",
                          markup=True, highlight=False)
    if m is not None:
        est = " [yellow](estimated from config.json)[/yellow]" if m.weights_estimated else ""
        console.print(f"backbone: {r.backbone.model} — {m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}, "
                      f"intermediate {m.intermediate_size}, heads {m.num_heads}/{m.num_kv_heads} kv, head_dim "
                      f"{m.head_dim}, vocab {m.vocab_size}, weights {gib(m.weight_bytes)}{est}")
    else:
        console.print(f"backbone: {r.backbone.model} — [red]not inspected[/red]")

    if plan.inventory.adapters:
        t = Table(title="adapters", title_justify="left")
        for c in ("name", "role", "rank", "alpha", "targets", "size", "dtype", "findings"):
            t.add_column(c, overflow="fold")
        hybrid = plan.mode == "hybrid"
        hot_rank = next((a.max_rank for a in plan.inventory.adapters if a.name in plan.merge_adapters), 0)
        for a in plan.inventory.adapters:
            if a.name in plan.merge_adapters:
                role = "merged (hot, no LoRA)" if hybrid else "merge"
            else:
                role = "delta LoRA" if hybrid else "serve (LoRA)"
            fs = [f for f in plan.findings if f.subject == a.name]
            ftxt = ", ".join(f"[{_SEV_STYLE[f.severity]}]{f.code}[/]" for f in fs) or "ok"
            rank = str(a.r) if a.max_rank == a.r else f"{a.r} (max {a.max_rank})"
            if hybrid and a.name not in plan.merge_adapters:
                rank += f" → served {a.max_rank + hot_rank}"
            t.add_row(a.name, role, rank, f"{a.lora_alpha:g}" + (" rs" if a.use_rslora else ""),
                      ",".join(a.target_modules), gib(a.bytes), a.dtype or "?", ftxt)
        if hybrid:
            t.add_row(r.name, "base as delta LoRA", f"served {hot_rank}", "", "(hot adapter's)", "", "", "")
        console.print(t)

    if plan.findings:
        t = Table(title="findings", title_justify="left")
        for c in ("severity", "code", "where", "message / fix"):
            t.add_column(c, overflow="fold")
        for f in plan.findings:
            msg = f.message + (f"\n[dim]fix:[/dim] {f.fix}" if f.fix else "")
            t.add_row(f"[{_SEV_STYLE[f.severity]}]{f.severity.value}[/]", f.code,
                      str(f.location) if f.location else (f.subject or ""), msg)
        console.print(t)

    if plan.derived:
        t = Table(title="settings", title_justify="left")
        for c in ("setting", "value", "from", "reason"):
            t.add_column(c, overflow="fold")
        for d in plan.derived.values():
            t.add_row(d.name, str(d.value), d.source, d.reason)
        console.print(t)

    b = plan.memory
    if b is not None:
        t = Table(title=f"memory ({'per GPU' if b.device == 'cuda' else 'host RAM'})", title_justify="left")
        t.add_column("item")
        t.add_column("bytes", justify="right")
        t.add_column("note", overflow="fold")
        if b.device == "cuda":
            t.add_row("GPU memory", gib(b.device_memory), b.device_memory_source)
            t.add_row(f"× gpu_memory_utilization {b.gpu_memory_utilization}",
                      gib(int((b.device_memory or 0) * (b.gpu_memory_utilization or 0))), "")
        else:
            t.add_row("host RAM", gib(b.host_memory), "")
        t.add_row("weights", gib(b.weight_bytes), b.weight_note + (" (ESTIMATED)" if b.weights_estimated else ""))
        if b.lora_slot_bytes:
            parts = ", ".join(f"{k} {gib(v)}" for k, v in b.lora_slot_breakdown.items())
            t.add_row("LoRA slots", gib(b.lora_slot_bytes), parts)
        if b.device == "cuda":
            t.add_row("activations / graphs", gib(b.overhead_bytes), "estimate")
        if b.cpu_lora_bytes:
            t.add_row("CPU LoRA cache (host)", gib(b.cpu_lora_bytes), "max_cpu_loras adapters in host RAM")
        t.add_row("KV cache", gib(b.kv_cache_bytes),
                  f"{b.kv_bytes_per_token:,} B/token ({b.kv_dtype}) → {b.kv_tokens:,} tokens, "
                  f"{b.max_concurrency:.2f}× max_model_len {b.max_model_len:,}")
        console.print(t)
        for n in b.notes:
            console.print(f"[dim]note: {n}[/dim]")
        if b.schemes:
            render_schemes(b, console)

    if getattr(plan, "fleet", None) is not None:
        render_fleet(plan.fleet, console)
    console.print("[bold]command[/bold] (what `peftdeploy up` runs"
                  + (" for one engine; a fleet runs one per group" if getattr(plan, "fleet", None) else "") + "):")
    console.print(plan.launch.command_line(), soft_wrap=True, markup=False, highlight=False)
    n_err = len(plan.errors)
    if n_err:
        console.print(f"[bold red]{n_err} error(s)[/bold red]: fix them before `peftdeploy up`")


def _signed(n: int, fmt: Any) -> str:
    if n == 0:
        return "="
    return ("+" if n > 0 else "−") + fmt(abs(n))


def render_schemes(b: Any, console: Any) -> None:
    """Per scheme: backbone bytes and what changes in KV capacity (everything else held fixed)."""
    from rich.table import Table

    where = "per GPU" if b.device == "cuda" else "host RAM"
    t = Table(title=f"quantization schemes on {b.device} ({where}; ★ = the recipe's; Δ vs ★)", title_justify="left")
    for c, j in (("scheme", "left"), ("weights", "right"), ("Δ weights", "right"), ("KV tokens", "right"),
                 ("Δ KV tokens", "right"), ("× max_model_len", "right"), ("LoRA", "left"),
                 ("quantized by", "left"), ("note", "left")):
        t.add_column(c, justify=j, overflow="fold")
    for r in b.schemes:
        name = ("★ " if r.chosen else "  ") + r.scheme + (f" ({r.dtype})" if r.kind == "none" or r.dtype != b.dtype else "")
        style = "bold" if r.chosen else ("dim" if not r.usable else "")
        t.add_row(name, gib(r.weight_bytes), _signed(r.weight_delta, gib), f"{r.kv_tokens:,}",
                  _signed(r.kv_tokens_delta, lambda n: f"{n:,}"), f"{r.max_concurrency:.2f}",
                  "yes" if r.lora_ok else "[red]no[/red]", r.how, r.note, style=style)
    console.print(t)
    if b.device == "cpu":
        console.print("[dim]note: on CPU the KV space is VLLM_CPU_KVCACHE_SPACE, sized by need (capped by what host "
                      "RAM leaves after the weights): smaller weights add KV tokens only when that cap binds[/dim]")
    else:
        console.print("[dim]note: the weight bytes a scheme frees go to KV cache blocks (same GPU memory, "
                      "utilization, LoRA slots and activation estimate)[/dim]")


def render_fleet(f: Any, console: Any) -> None:
    """The fleet's replica groups and the predicted throughput (plan/fleet.py)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"fleet ({f.replicas} engines; traffic: {f.traffic})", title_justify="left")
    for c, j in (("group", "left"), ("kind", "left"), ("models", "left"), ("share", "right"),
                 ("engines", "right"), ("speed/engine", "right"), ("why", "left")):
        t.add_column(c, justify=j, overflow="fold")
    for g in f.groups:
        t.add_row(g.name, "merged (no LoRA)" if g.kind == "merged" else "multi-LoRA", ", ".join(g.models),
                  f"{g.share:.2f}", str(g.replicas), f"{g.speed:.2f}×", g.reason)
    console.print(t)
    console.print(f"fleet: [bold]{f.predicted:.2f}×[/bold] — {escape(f.reason)} (measured ratios on {f.device} "
                  f"with {f.kernels} kernels: {escape(f.source)})", highlight=False)
