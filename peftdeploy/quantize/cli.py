"""`peftdeploy eval RECIPE`: perplexity of the merged model in full precision and quantized, side by side.

    peftdeploy eval recipes/demo-int8.yaml                    # the recipe's scheme (+ full precision)
    peftdeploy eval recipes/demo-merged.yaml --schemes int8,w4a16 --json

Steps: resolve the recipe, merge its merge adapters into the full-precision backbone (``merge_base``
when the backbone is pre-quantized) through the merge cache, produce each offline scheme's
checkpoint through the quantize cache, then measure every model with vLLM on the fixed eval text
(``peftdeploy/data/eval/lighthouse.txt``) in one child process, all in the same activation dtype.
Runtime schemes (fp8) are measured by passing ``--quantization`` to vLLM for the merged model.
Schemes vLLM cannot run on this device are listed with the reason instead of a number.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from peftdeploy.cli_common import emit_json, json_option, user_errors
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


def run_eval(recipe_path: str, schemes: list[str] | None = None, *, dtype: str = "bfloat16",
             window: int = 512, stride: int = 256, quiet: bool = False) -> dict[str, Any]:
    """The eval report as a dict (what --json prints)."""
    from peftdeploy.quantize.cache import quantize_cached_result
    from peftdeploy.quantize.ppl import eval_text_sha256, measure
    from peftdeploy.quantize.support import scheme_info

    r, merged, info = _merged_model(recipe_path, quiet)
    if not schemes:
        s = r.quantization.scheme
        if s in ("awq", "gptq"):
            s = scheme_info(s).merge_offline_scheme or "w4a16"
        schemes = [s] if s != "none" else ["int8", "w4a16"]
    device = _device()
    rows: list[dict[str, Any]] = [{"scheme": "none", "model": str(merged), "quantization": None}]
    for s in schemes:
        si = scheme_info(s)
        row: dict[str, Any] = {"scheme": si.name, "model": None, "quantization": None}
        ok, why = si.supported_on(device)
        if si.kind == "prequantized":
            si = scheme_info(si.merge_offline_scheme or "w4a16")
            row["scheme"] = f"{s}->{si.name}"
            ok, why = si.supported_on(device)
        if ok and device == "cpu" and dtype not in si.cpu_dtypes:
            ok, why = False, (f"vLLM's CPU kernel for {si.name} takes {'/'.join(si.cpu_dtypes)} activations, not "
                              f"{dtype} (use --dtype bfloat16)")
        if not ok:
            row["status"] = f"not run: {why}"
            rows.append(row)
            continue
        if si.kind == "runtime":
            row.update(model=str(merged), quantization=si.vllm_quantization)
        elif si.kind == "offline":
            if not quiet:
                click.echo(f"quantize: {si.name} ...", err=True)
            q = quantize_cached_result(merged, si.name)
            row.update(model=str(q.path), quantize_cache_hit=q.cache_hit, quantize_key=q.key)
            prov = q.provenance
            row["rel_rmse_mean"] = prov.get("rel_rmse_mean")
            row["group_size"] = (prov.get("spec") or {}).get("group_size")
        elif si.kind == "none":
            continue
        rows.append(row)
    runnable = [x for x in rows if x.get("model")]
    if not quiet:
        click.echo(f"perplexity: {len(runnable)} model(s) with vLLM ({dtype}) ...", err=True)
    results = measure([x["model"] for x in runnable], quantizations=[x["quantization"] for x in runnable],
                      dtype=dtype, window=window, stride=stride)
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
            "text": "peftdeploy/data/eval/lighthouse.txt", "text_sha256": eval_text_sha256(),
            "tokens_scored": rows[0].get("tokens_scored"), "rows": rows}


def format_table(rep: dict[str, Any]) -> str:
    lines = [f"perplexity on {rep['text']} ({rep.get('tokens_scored')} tokens scored, vLLM {rep['device']}, "
             f"{rep['dtype']}, window {rep['window']}/stride {rep['stride']})",
             f"{'scheme':<14}{'backbone bytes':>16}{'ppl':>10}{'delta':>10}  status"]
    for x in rep["rows"]:
        b = x.get("backbone_bytes")
        bs = f"{b / 1e6:,.1f} MB" if b else ("(runtime)" if x.get("quantization") else "-")
        p = f"{x['ppl']:.3f}" if x.get("ppl") is not None else "-"
        d = f"{x['delta_pct']:+.2f}%" if x.get("delta_pct") is not None and x["scheme"] != "none" else ""
        lines.append(f"{x['scheme']:<14}{bs:>16}{p:>10}{d:>10}  {x.get('status', '')}")
    return "\n".join(lines)


@click.command("eval")
@click.argument("recipe", type=click.Path(dir_okay=False, exists=True))
@click.option("--schemes", default=None,
              help="Comma-separated schemes to compare with full precision (default: the recipe's; "
                   "int8,w4a16 when it has none).")
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(["bfloat16", "float16", "float32"]),
              help="Activation dtype every model runs in (the same for all).")
@click.option("--window", type=int, default=512, show_default=True)
@click.option("--stride", type=int, default=256, show_default=True)
@json_option
@user_errors
def eval_cmd(recipe: str, schemes: str | None, dtype: str, window: int, stride: int, as_json: bool) -> None:
    """Perplexity of the merged model, full precision vs quantized, with the delta."""
    from peftdeploy.quantize.ppl import PplError

    sl = [s.strip() for s in schemes.split(",") if s.strip()] if schemes else None
    try:
        rep = run_eval(recipe, sl, dtype=dtype, window=window, stride=stride, quiet=as_json)
    except PplError as e:
        raise EvalError(f"{e}\n{e.log_tail[-1500:]}", fix="see the vLLM log above") from None
    except KeyError as e:
        raise EvalError(str(e).strip("'\""), fix="use schemes from: none, fp8, int8, w8a16, w4a16") from None
    if as_json:
        emit_json(rep)
    else:
        click.echo(format_table(rep))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_cmd())
