"""Perplexity of the merged model in full precision and quantized, side by side (``peftdeploy eval``),
and the gate ``quantization.max_ppl_increase`` that ``up`` applies.

    run_eval("recipes/demo-w4a16.yaml")                                  # the recipe's scheme + method
    run_eval("recipes/demo-merged.yaml", ["int8", "w4a16"], methods=["rtn", "gptq"], text_file="mine.txt")

Steps: resolve the recipe, merge its merge adapters into the full-precision backbone (``merge_base``
when the backbone is pre-quantized) through the merge cache, produce each (scheme, method)
checkpoint through the quantize cache (rtn: peftdeploy's quantizer; gptq / awq / fp8: llm-compressor
in its tool venv, on the recipe's calibration set), then measure every model with vLLM on the eval
text (``peftdeploy/data/eval/lighthouse.txt``, or a team's own held-out text) in one child process,
all in the same activation dtype. Runtime schemes (fp8) are measured by passing ``--quantization``
to vLLM for the merged model. Schemes vLLM cannot run on this device are listed with the reason.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import click

from peftdeploy.errors import PeftDeployError


class EvalError(PeftDeployError):
    pass


def _device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def _dir_weight_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))


def _merged_model(recipe_path: str, quiet: bool) -> tuple[Any, Path, dict[str, Any]]:
    from peftdeploy.merge import AdapterInput, merge_cached
    from peftdeploy.recipe import load_recipe
    from peftdeploy.sources import resolve

    loaded = load_recipe(recipe_path)
    r = loaded.recipe
    resolved = resolve(loaded, fetch="full", progress=not quiet)
    if r.quantization.prequantized and resolved.merge_base is None:
        raise EvalError(f"the backbone is pre-quantized ({r.quantization.scheme}) and the recipe has no "
                        "backbone.merge_base: there is no full-precision model to merge into and measure",
                        fix="set backbone.merge_base to the full-precision twin of the backbone")
    bb = resolved.merge_base or resolved.backbone
    if bb.path is None:
        raise EvalError(f"the backbone is not available locally ({bb.unavailable or bb.spec})",
                        fix="download it, or point backbone.model / merge_base at a local directory")
    names = r.merge_adapter_names() if r.adapters else []
    adapters = [AdapterInput(n, str(resolved.adapter(n).path), weight=r.adapter(n).weight) for n in names]
    info: dict[str, Any] = {"recipe": r.name, "backbone": bb.spec, "adapters": names}
    if not adapters:
        return r, Path(bb.path), {**info, "merged": False}
    if not quiet:
        click.echo(f"merge: {', '.join(names)} into {bb.spec} ...", err=True)
    res = merge_cached(bb.path, adapters, dtype=r.backbone.dtype, progress=not quiet,
                       provenance={"recipe": r.name, "purpose": "eval"})
    return r, Path(res.path), {**info, "merged": True, "merge_key": res.key, "merge_cache_hit": res.cache_hit}


def run_eval(recipe_path: str, schemes: list[str] | None = None, *, methods: list[str] | None = None,
             dtype: str = "bfloat16", window: int = 512, stride: int = 256, quiet: bool = False,
             text_file: str | None = None) -> dict[str, Any]:
    """The eval report as a dict (what --json prints): one row per (scheme, method) after the
    full-precision row, each with ppl and delta_pct against it."""
    from peftdeploy.quantize.cache import quantize_cached_result
    from peftdeploy.quantize.calibration import load_calibration
    from peftdeploy.quantize.methods import METHODS, resolve_method
    from peftdeploy.quantize.ppl import eval_text_path, measure
    from peftdeploy.quantize.support import scheme_info

    text_path = Path(text_file) if text_file else eval_text_path()
    if text_file and not text_path.is_file():
        raise EvalError(f"--text {text_file}: no such file", fix="give a UTF-8 text file of held-out text")
    r, merged, info = _merged_model(recipe_path, quiet)
    if not schemes:
        s = r.quantization.scheme
        if s in ("awq", "gptq"):
            s = scheme_info(s).merge_offline_scheme or "w4a16"
        schemes = [s] if s != "none" else ["int8", "w4a16"]
    device = _device()
    cal = None
    rows: list[dict[str, Any]] = [{"scheme": "none", "method": None, "model": str(merged), "quantization": None}]
    for s in schemes:
        si = scheme_info(s)
        name = si.name
        if si.kind == "prequantized":
            si = scheme_info(si.merge_offline_scheme or "w4a16")
            name = f"{s}->{si.name}"
        if si.kind == "none":
            continue
        for mwant in (methods or [r.quantization.method]):
            if mwant != "auto" and mwant not in METHODS.get(si.name, ()):
                rows.append({"scheme": name, "method": mwant, "model": None, "quantization": None,
                             "status": f"not run: method {mwant} does not apply to {si.name}"})
                continue
            m = resolve_method(si.name, mwant)
            row: dict[str, Any] = {"scheme": name, "method": m.name, "model": None, "quantization": None}
            rows.append(row)
            ok, why = si.runs_on_this_host(device)
            if ok and device == "cpu" and dtype not in si.cpu_dtypes:
                ok, why = False, (f"vLLM's CPU kernel for {si.name} takes {'/'.join(si.cpu_dtypes)} activations, "
                                  f"not {dtype} (use --dtype bfloat16)")
            if not ok:
                row["status"] = f"not run: {why}"
                continue
            if m.name == "runtime":
                row.update(model=str(merged), quantization=si.vllm_quantization)
                continue
            if m.calibrated and cal is None:
                cal = load_calibration(r.quantization.calibration)
            if not quiet:
                click.echo(f"quantize: {si.name} with {m.name} ({m.why}) ...", err=True)
            gs = r.quantization.group_size
            q = quantize_cached_result(merged, si.name, method=m.name, calibration=cal if m.calibrated else None,
                                       group_size=128 if gs == "auto" else int(gs),
                                       progress=None if quiet else (lambda msg: click.echo(f"quantize: {msg}",
                                                                                           err=True)))
            row.update(model=str(q.path), quantize_cache_hit=q.cache_hit, quantize_key=q.key)
            prov = q.provenance
            row["rel_rmse_mean"] = prov.get("rel_rmse_mean")
            row["group_size"] = (prov.get("spec") or {}).get("group_size")
            if m.calibrated:
                row["calibration"] = prov.get("calibration")
    runnable = [x for x in rows if x.get("model")]
    if not quiet:
        click.echo(f"perplexity: {len(runnable)} model(s) with vLLM ({dtype}) ...", err=True)
    results = measure([x["model"] for x in runnable], quantizations=[x["quantization"] for x in runnable],
                      dtype=dtype, window=window, stride=stride, text_file=text_file)
    for x, res in zip(runnable, results):
        x.update(ppl=res.ppl, nll_mean=res.nll_mean, tokens_scored=res.tokens_scored, ids_sha256=res.ids_sha256,
                 vllm_quantization=res.quantization, dtype=res.dtype, seconds=res.seconds, status="ok")
    base = rows[0].get("ppl")
    ids0 = rows[0].get("ids_sha256")
    for x in rows:
        x["backbone_bytes"] = _dir_weight_bytes(Path(x["model"])) if x.get("model") and not x.get("quantization") \
            else None
        if x.get("ppl") is not None and base:
            x["delta_pct"] = 100.0 * (x["ppl"] - base) / base
        if x.get("ids_sha256") and ids0 and x["ids_sha256"] != ids0:
            x["status"] = "warning: tokenization differs from the full-precision model"
    return {"ok": True, **info, "device": device, "dtype": dtype, "window": window, "stride": stride,
            "text": text_file or "peftdeploy/data/eval/lighthouse.txt",
            "text_sha256": hashlib.sha256(text_path.read_bytes()).hexdigest(),
            "tokens_scored": rows[0].get("tokens_scored"), "rows": rows}


def format_table(rep: dict[str, Any]) -> str:
    lines = [f"perplexity on {rep['text']} ({rep.get('tokens_scored')} tokens scored, vLLM {rep['device']}, "
             f"{rep['dtype']}, window {rep['window']}/stride {rep['stride']})",
             f"{'scheme':<14}{'method':<9}{'backbone bytes':>16}{'ppl':>10}{'delta':>10}  status"]
    for x in rep["rows"]:
        b = x.get("backbone_bytes")
        bs = f"{b / 1e6:,.1f} MB" if b else ("(runtime)" if x.get("quantization") else "-")
        p = f"{x['ppl']:.3f}" if x.get("ppl") is not None else "-"
        d = f"{x['delta_pct']:+.2f}%" if x.get("delta_pct") is not None and x["scheme"] != "none" else ""
        lines.append(f"{x['scheme']:<14}{x.get('method') or '-':<9}{bs:>16}{p:>10}{d:>10}  {x.get('status', '')}")
    return "\n".join(lines)
