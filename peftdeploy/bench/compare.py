"""Comparison mode: the deployment policies that matter, measured in one invocation on one machine.

For a recipe with adapters A (hottest first: by ``policy.traffic`` when given, else recipe order):

============================  ===============================================  ==================
setup                         server                                           traffic
============================  ===============================================  ==================
merged                        no LoRA; the hottest adapter merged into the      all to the model
                              backbone (peftdeploy's merge engine, cached)
lora: base traffic            LoRA on, all adapters preloaded, max_loras = N   all to the base
lora: 1 adapter               same server                                      all to the hottest
lora: N adapters Zipf(α)      same server                                      Zipf(α) over A
lora: N adapters, max_loras=k one server per other max_loras value             Zipf(α) over A
============================  ===============================================  ==================

Every setup gets the same requests (same prompts, lengths and arrival times; only the ``model``
field differs), one warm-up run, then ``runs`` measured runs; the table shows medians and the
ratio of each setup's output tokens/s to the merged model's. Servers are started one at a time
on one port from the recipe's LaunchSpec (``deploy.variant`` changes only the LoRA flags).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import report
from ..plan.kernels import installed_vllm_version
from .client import run_workload_sync
from .deploy import Server, merge_adapters, recipe_spec, variant
from .workload import WorkloadConfig, build_workload

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.schema import Recipe

__all__ = ["Setup", "compare_table", "default_setups", "hottest_first", "ratio_rows", "run_compare", "save_compare"]


@dataclass(frozen=True)
class Setup:
    name: str
    server: str  # setups with the same server key share one server process
    lora: bool
    adapters: tuple[str, ...] = ()  # workload adapters (hottest first); () = all traffic to the base model
    max_loras: int | None = None
    description: str = ""


def hottest_first(recipe: Recipe) -> list[str]:
    names = [a.name for a in recipe.adapters]
    traffic = recipe.policy.traffic or {}
    if traffic:
        return sorted(names, key=lambda n: (-traffic.get(n, 0.0), names.index(n)))
    return names


def default_setups(adapters: Sequence[str], *, zipf: float = 1.0, max_loras: Sequence[int] | None = None,
                   include_base: bool = True) -> list[Setup]:
    n = len(adapters)
    if n == 0:
        raise ValueError("the recipe has no adapters: nothing to compare")
    values = list(dict.fromkeys(max_loras or ([n, max(1, n // 2)] if n > 1 else [1])))
    full = max(values)
    setups = [Setup("merged", "merged", False, (), None, f"no LoRA, {adapters[0]} merged into the backbone")]
    srv = f"lora{full}"
    if include_base:
        setups.append(Setup("lora: base traffic", srv, True, (), full, "LoRA enabled, requests to the base model"))
    setups.append(Setup(f"lora: 1 adapter", srv, True, (adapters[0],), full, f"all requests to {adapters[0]}"))
    if n > 1:
        for k in sorted(values, reverse=True):
            setups.append(Setup(f"lora: {n} adapters zipf{zipf:g} max_loras={k}", f"lora{k}", True, tuple(adapters), k,
                                f"Zipf({zipf:g}) over {', '.join(adapters)}"))
    return setups


def ratio_rows(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["setup", "out tok/s (median)", "runs", "ratio vs merged", "req/s", "TTFT p50 ms", "TTFT p99 ms",
            "TPOT p50 ms", "TPOT p99 ms", "e2e p50 ms", "errors"]
    rows = []
    for r in results:
        rows.append([
            r["setup"], f"{r['output_tok_s']:.1f}" if r.get("output_tok_s") else "-",
            " ".join(f"{x:.0f}" for x in r.get("runs_tok_s", [])),
            f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-",
            f"{r['req_s']:.2f}" if r.get("req_s") else "-",
            *[f"{r[k] * 1000:.1f}" if r.get(k) is not None else "-"
              for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "e2e_p50")],
            str(r.get("errors", 0)),
        ])
    return head, rows


def _row(setup: Setup, med: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    o = med["overall"]
    return {
        "setup": setup.name,
        "server": setup.server,
        "description": setup.description,
        "max_loras": setup.max_loras,
        "adapters": list(setup.adapters),
        "output_tok_s": o.get("output_tok_s"),
        "req_s": o.get("req_s"),
        "runs_tok_s": [r["overall"]["output_tok_s"] or 0 for r in runs],
        "ttft_p50": o["ttft_s"]["p50"], "ttft_p99": o["ttft_s"]["p99"],
        "tpot_p50": o["tpot_s"]["p50"], "tpot_p99": o["tpot_s"]["p99"],
        "e2e_p50": o["e2e_s"]["p50"], "e2e_p99": o["e2e_s"]["p99"],
        "errors": med.get("errors_total", 0),
    }


def run_compare(
    recipe: str,
    *,
    out_dir: str | Path,
    port: int = 18250,
    zipf: float = 1.0,
    concurrency: int | None = 8,
    rate: float | None = None,
    num_requests: int = 64,
    input_len: int | None = None,
    output_len: int | None = 64,
    prompts_file: str | None = None,
    runs: int = 3,
    warmup_requests: int = 8,
    seed: int = 0,
    max_loras: Sequence[int] | None = None,
    merged: str = "auto",  # "merge": merge engine (fail if unavailable) | "base": backbone without LoRA | "auto"
    setups: Sequence[Setup] | None = None,
    api_key_env: str | None = None,
    extra_server_args: Sequence[tuple[str, str | None]] = (),
    log: Callable[[str], None] = print,
    backend: str = "auto",
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec, loaded = recipe_spec(recipe, port=port)
    r = loaded.recipe
    adapters = hottest_first(r)
    setups = list(setups or default_setups(adapters, zipf=zipf, max_loras=max_loras))
    base_name = spec.served_model_name

    merged_model, merged_note = spec.model, "backbone without LoRA (merge engine not used)"
    if any(not s.lora for s in setups) and merged != "base":
        try:
            t0 = time.time()
            merged_model = merge_adapters(loaded, [adapters[0]])
            merged_note = f"{adapters[0]} merged with peftdeploy.merge ({time.time() - t0:.1f} s): {merged_model}"
        except Exception as e:  # noqa: BLE001 - merge engine missing or failing: compare the backbone
            if merged == "merge":
                raise
            merged_note = f"backbone without LoRA (same compute as a merged model; merge failed: {e})"
    log(f"merged setup: {merged_note}")

    def wl(setup: Setup, n: int, s: int) -> WorkloadConfig:
        return WorkloadConfig(adapters=setup.adapters, base_model=base_name, zipf_alpha=zipf,
                              base_share=0.0 if setup.adapters else 1.0, num_requests=n, rate=rate,
                              concurrency=concurrency, input_len=input_len, output_len=output_len,
                              prompts_file=prompts_file, seed=s)

    results: list[dict[str, Any]] = []
    servers: dict[str, dict[str, Any]] = {}
    order = list(dict.fromkeys(s.server for s in setups))
    for key in order:
        group = [s for s in setups if s.server == key]
        first = group[0]
        if first.lora:
            sspec = variant(spec, adapters=adapters, max_loras=first.max_loras, port=port,
                            extra_args=extra_server_args)
        else:
            sspec = variant(spec, adapters=None, model=merged_model, served_model_name=base_name, port=port,
                            mode="merge", extra_args=extra_server_args)
        log(f"[{key}] starting: {sspec.command_line()}")
        srv = Server(sspec, log_path=out / f"server_{key}.log")
        with srv:
            log(f"[{key}] ready in {srv.ready_s:.0f} s")
            servers[key] = {"argv": srv.argv(), "ready_s": srv.ready_s}
            for setup in group:
                warm = build_workload(wl(setup, warmup_requests, seed + 1000))
                run_workload_sync(srv.url, warm, api_key_env=api_key_env, backend=backend)
                summaries = []
                for i in range(runs):
                    # run i: seed + i (other prompts, so run 2 does not just hit run 1's prefix cache);
                    # the same seeds for every setup, so setups see the same requests
                    workload = build_workload(wl(setup, num_requests, seed + i))
                    rr = run_workload_sync(srv.url, workload, api_key_env=api_key_env, backend=backend)
                    s = report.summarize(rr, workload)
                    summaries.append(s)
                    o = s["overall"]
                    log(f"  {setup.name} run {i + 1}/{runs}: {o['output_tok_s']:.1f} out tok/s, "
                        f"TPOT p50 {(o['tpot_s']['p50'] or 0) * 1000:.1f} ms, errors {o['errors']}")
                med = report.median_summary(summaries)
                row = _row(setup, med, summaries)
                row["median"] = med
                row["run_summaries"] = summaries
                results.append(row)

    ref = next((x for x in results if x["server"] == "merged"), None)
    for x in results:
        x["ratio"] = (x["output_tok_s"] / ref["output_tok_s"]) if ref and ref.get("output_tok_s") else None
        x["tpot_ratio"] = (x["tpot_p50"] / ref["tpot_p50"]) if ref and ref.get("tpot_p50") and x.get("tpot_p50") \
            else None
    return {
        "recipe": str(recipe),
        "recipe_name": r.name,
        "adapters_hottest_first": adapters,
        "merged_model": merged_note,
        "workload": dataclasses.asdict(wl(setups[-1], num_requests, seed)),
        "runs": runs,
        "warmup_requests": warmup_requests,
        "servers": servers,
        "results": results,
        "vllm_version": installed_vllm_version(),  # the servers are this machine's vLLM
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_compare(result: dict[str, Any], out_json: str | Path, out_png: str | Path | None = None,
                 title: str | None = None) -> tuple[Path, Path | None]:
    p = report.write_json(result, out_json)
    png = None
    if out_png:
        png = report.plot_compare(result["results"], out_png, title=title or f"{result.get('recipe_name', '')}: "
                                  f"merged vs multi-LoRA ({result.get('runs')} runs, median)",
                                  vllm_version=result.get("vllm_version", "installed"))
    return p, png


def compare_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    return ratio_rows(result["results"])
