"""Compatibility checks: (recipe, inventory, mode) -> list[Finding]. Table-driven, no torch / vLLM.

Each check is a small function registered in `ADAPTER_CHECKS` (run per adapter, adapter_checks.py) or
`RECIPE_CHECKS` (run once, here). What a check receives is check_context.py; vLLM's engine arguments
(the flags the plan manages, the frozen table) are engine_args.py. A check returns findings with a stable `code`, a severity, a message saying what is
wrong and a `fix` saying what would be right. Severity depends on what happens next: a DoRA adapter
is an error when vLLM must serve it, a warning when it is merged offline.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Any, Callable, Iterable

from ..errors import Finding, Severity
from ..quantize.support import OFFLINE_SCHEMES, RUNTIME_SCHEMES, scheme_info
from .adapter_checks import ADAPTER_CHECKS
from .check_context import CheckContext, _f
from .engine_args import MANAGED_ARGS, _engine_args_version, vllm_engine_args
from .memory import ARCH_LORA

E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO


# --------------------------------------------------------------------------------------------
# recipe-wide checks
# --------------------------------------------------------------------------------------------
RecipeCheck = Callable[[CheckContext], Iterable[Finding]]
RECIPE_CHECKS: list[tuple[str, RecipeCheck]] = []

# errors about the engine this host would start (its CPU's kernels), not about the weights: `peftdeploy merge`
# still builds the checkpoint (it may be served elsewhere) and says what `up` here would refuse
ENGINE_START_CODES = frozenset({"quantization-cpu-isa", "quantization-cpu-dtype"})


def recipe_check(code: str) -> Callable[[RecipeCheck], RecipeCheck]:
    def deco(fn: RecipeCheck) -> RecipeCheck:
        RECIPE_CHECKS.append((code, fn))
        return fn

    return deco


def _hf_download(spec: str, revision: str | None) -> str:
    from ..sources import hf_download_command  # pure: imports nothing heavy

    return hf_download_command(spec.removeprefix("hf://"), revision, "config.json")


@recipe_check("backbone-unavailable")
def _backbone_unavailable(ctx: CheckContext) -> Iterable[Finding]:
    if ctx.model is None:
        yield _f("backbone-unavailable", E, f"cannot inspect the backbone {ctx.recipe.backbone.model} offline: "
                 f"{ctx.inventory.model_unavailable or 'its config.json is not available'}",
                 "run `peftdeploy plan` once online" + (" (unset HF_HUB_OFFLINE)" if os.environ.get("HF_HUB_OFFLINE")
                                                        else "") + " or pre-download it "
                 f"(`{_hf_download(ctx.recipe.backbone.model, ctx.recipe.backbone.revision)}`)",
                 "backbone", ctx.loc("backbone", "model"))


@recipe_check("architecture")
def _arch(ctx: CheckContext) -> Iterable[Finding]:
    m = ctx.model
    if m is not None and m.architecture not in ARCH_LORA and ctx.served:
        yield _f("architecture-unknown", W, f"peftdeploy has no LoRA layout for {m.architecture}; the memory "
                 "plan assumes a Llama-like layout (q/k/v/o, gate/up/down)", "check the plan against vLLM's "
                 "startup log", "backbone", ctx.loc("backbone", "model"))


@recipe_check("quantization")
def _quant(ctx: CheckContext) -> Iterable[Finding]:
    r, m = ctx.recipe, ctx.model
    scheme = r.quantization.scheme
    qm = m.quant_method if m else None
    if m is not None:
        if qm in ("awq", "gptq") and scheme not in ("awq", "gptq"):
            yield _f("quantization-mismatch", E, f"the backbone checkpoint is pre-quantized ({qm}) but "
                     f"quantization.scheme is {scheme!r}", f"set quantization.scheme: {qm}", "backbone",
                     ctx.loc("quantization", "scheme") or ctx.loc("backbone", "model"))
        elif scheme in ("awq", "gptq") and qm != scheme:
            yield _f("quantization-mismatch", E, f"quantization.scheme is {scheme!r} but the backbone checkpoint "
                     f"is {'quantized with ' + qm if qm else 'not quantized'}", "point backbone.model at the "
                     f"{scheme.upper()} checkpoint, or set quantization.scheme to match it", "backbone",
                     ctx.loc("quantization", "scheme"))
    prequant = scheme in ("awq", "gptq") or qm in ("awq", "gptq")
    if ctx.mode == "merge" and prequant and not r.backbone.merge_base:
        yield _f("merge-prequantized", E, f"mode merge with a pre-quantized backbone ({qm or scheme}) would merge "
                 "into quantized weights and lose the adapter's precision", "either set backbone.merge_base to "
                 "the full-precision twin (peftdeploy merges there, then quantizes), or use policy.mode: serve "
                 "to keep the adapters unmerged", "backbone", ctx.loc("policy", "mode"))
    info = scheme_info(scheme)
    runtime_here = [k for k in RUNTIME_SCHEMES if _runs(ctx, k)[0]]
    if ctx.mode == "serve" and info.kind == "offline":
        if runtime_here:
            alt = (f"or a scheme vLLM quantizes at load time on {ctx.device}: {' / '.join(runtime_here)}")
        else:
            alt = (f"or keep scheme none to serve unmerged: vLLM on {ctx.device} quantizes no scheme at load "
                   "time")
        yield _f("quantization-needs-merge", E, f"quantization.scheme {scheme} is produced offline by "
                 "peftdeploy's quantize step, which runs only in merge mode; vLLM cannot apply it at load time",
                 f"use policy.mode: merge (peftdeploy quantizes the merged model), {alt}",
                 "backbone", ctx.loc("quantization", "scheme"))
    ok, why = info.supported_on(ctx.device)
    here, isa_why = _runs(ctx, scheme)
    if ok and not here:  # vLLM has the kernel for this device class, but not in the build this host's CPU loads
        offline_here = [k for k in OFFLINE_SCHEMES if _runs(ctx, k)[0]]
        yield _f("quantization-cpu-isa", E, f"quantization.scheme {scheme} cannot run on this machine: {isa_why}",
                 (f"use quantization.scheme {' or '.join(offline_here)} with policy.mode: merge here, " if offline_here
                  else "") + "or run on a CPU with AVX-512 (or a GPU: --device cuda)", "backbone",
                 ctx.loc("quantization", "scheme"))
        ok = False
    elif not ok and info.kind != "prequantized":
        offline_here = [k for k in OFFLINE_SCHEMES if _runs(ctx, k)[0]]
        fix = (f"use quantization.scheme {' or '.join(offline_here)} with policy.mode: merge (quantized offline "
               f"by peftdeploy after the merge)" if offline_here else "use quantization.scheme none")
        if runtime_here and info.kind != "runtime":
            fix += f", or {' / '.join(runtime_here)} (quantized by vLLM at load time)"
        if ctx.device == "cpu" and scheme_info(scheme).supported_on("cuda")[0]:
            fix += ", or plan for a GPU (--device cuda)"
        yield _f("quantization-device", E, f"quantization.scheme {scheme} does not run on {ctx.device}: {why}",
                 fix, "backbone", ctx.loc("quantization", "scheme"))
    elif ok and ctx.device == "cpu" and m is not None and info.kind != "none" and info.cpu_dtypes:
        from .memory import model_dtype

        dt = model_dtype(m, r.backbone.dtype)
        if dt not in info.cpu_dtypes:
            yield _f("quantization-cpu-dtype", E, f"vLLM's CPU kernel for {scheme} takes "
                     f"{' / '.join(info.cpu_dtypes)} activations, not {dt}",
                     f"set backbone.dtype: {info.cpu_dtypes[0]}", "backbone",
                     ctx.loc("backbone", "dtype") or ctx.loc("quantization", "scheme"))
    if ok and ctx.local and ctx.device == "cpu":
        from ..quantize.cpu_isa import AMX_INT8_KERNEL, host_cpu_isa

        isa = host_cpu_isa()
        takes = isa.activation_dtypes(scheme) if isa is not None else None
        # backbone.dtype auto picks one of `takes` (plan/derive.py); a dtype the recipe sets is refused
        if takes and r.backbone.dtype != "auto" and r.backbone.dtype not in takes:
            yield _f("quantization-cpu-dtype", E, f"quantization.scheme {scheme} on this AMX CPU runs vLLM's "
                     f"{AMX_INT8_KERNEL}, which takes {' / '.join(takes)} activations, not "
                     f"{r.backbone.dtype} (the engine would die at start-up)",
                     f"set backbone.dtype: {takes[0]} (or auto)", "backbone",
                     ctx.loc("backbone", "dtype") or ctx.loc("quantization", "scheme"))
        note = isa.accuracy_note(scheme) if isa is not None else None
        if note:
            yield _f("quantization-cpu-isa-accuracy", W, f"quantization.scheme {scheme} on this machine: {note}",
                     "set quantization.max_ppl_increase (up then measures the quantized model on this host and "
                     "refuses it past the bound), or use quantization.method: gptq (calibrated), or serve on a "
                     "CPU with VNNI", "backbone", ctx.loc("quantization", "scheme"))
    if ok and ctx.served:
        lora_ok, lora_why = info.lora_ok(ctx.device)
        if not lora_ok:
            names = ", ".join(sorted(ctx.served))
            yield _f("quantization-lora", E, f"adapters served as LoRA ({names}) cannot run on a {scheme} backbone "
                     f"on {ctx.device}: {lora_why}",
                     "merge every adapter of this recipe (policy.merge.adapters, or list only the merged ones in "
                     "adapters), or use a scheme that takes LoRA here (e.g. w4a16 on CPU), or scheme none",
                     "backbone", ctx.loc("quantization", "scheme"))
    if ok and ctx.device == "cuda" and scheme == "bitsandbytes":
        yield _f("quantization-vllm-version", W, "quantization.scheme bitsandbytes needs a GPU vLLM that still "
                 "ships the bitsandbytes method and loader (plus the bitsandbytes package); vLLM 0.32 has none",
                 "pin the GPU host's vLLM to a release with bitsandbytes, or use w4a16 with policy.mode: merge "
                 "(same 4-bit footprint, made offline by peftdeploy)", "backbone", ctx.loc("quantization", "scheme"))
    yield from _quant_method(ctx, info)
    if ctx.device == "cpu" and r.quantization.kv_cache_dtype == "fp8":
        yield _f("quantization-cpu", W, "kv_cache_dtype fp8 may not be supported by vLLM's CPU backend",
                 "use --device cuda for this recipe, or kv_cache_dtype: auto on CPU", "backbone",
                 ctx.loc("quantization", "kv_cache_dtype") or ctx.loc("quantization", "scheme"))


def _runs(ctx: CheckContext, scheme: str) -> tuple[bool, str]:
    """Does vLLM run `scheme` on the plan's device — on this very host's CPU when the plan is local?"""
    info = scheme_info(scheme)
    return info.runs_on_this_host(ctx.device) if ctx.local else info.supported_on(ctx.device)


def _quant_method(ctx: CheckContext, info: Any) -> Iterable[Finding]:
    """Which method quantizes the merged weights (plan says which and why), and what it needs."""
    from ..quantize.methods import SETUP_COMMAND, resolve_method, tool_python

    q = ctx.recipe.quantization
    if info.kind == "none":
        return
    merged = ctx.mode in ("merge", "hybrid")
    offline = info.kind in ("offline", "prequantized") or (info.name == "fp8" and q.method == "rtn")
    loc = ctx.loc("quantization", "method") or ctx.loc("quantization", "scheme")
    if not merged:
        if q.method not in ("auto", "runtime") and info.kind != "offline":
            yield _f("quantization-method", W, f"quantization.method {q.method} quantizes a merged model; in "
                     f"policy.mode {ctx.mode} the backbone is served as it is (vLLM applies {q.scheme})",
                     "drop quantization.method, or use policy.mode: merge", "backbone", loc)
        if q.max_ppl_increase is not None:
            yield _f("quantization-gate", W, "quantization.max_ppl_increase is checked by `up` on the quantized "
                     f"merge; in policy.mode {ctx.mode} nothing is merged, so it is not checked",
                     "use policy.mode: merge, or measure with `peftdeploy eval`", "backbone",
                     ctx.loc("quantization", "max_ppl_increase"))
        return
    if not offline:
        return
    scheme = ("w4a16" if info.kind == "prequantized" else info.name)
    m = resolve_method(scheme, q.method)
    cal = ""
    if m.calibrated:
        cal = f"; calibration {q.calibration.dataset} ({q.calibration.samples} x {q.calibration.seq_len} tokens)"
    gate = (f"; `up` refuses it if perplexity rises more than {q.max_ppl_increase:.1%} over the full-precision "
            "merge" if q.max_ppl_increase is not None else "")
    yield _f("quantization-method", I, f"the merged weights are quantized to {scheme} with {m.name}: {m.why}{cal}"
             f"{gate}", "set quantization.method to choose (rtn | gptq | awq)", "backbone", loc)
    if m.tool == "llmcompressor" and tool_python() is None:
        yield _f("quantization-tool", E, f"quantization method {m.name} ({scheme}) runs llm-compressor from its own "
                 "tool venv, and there is none (.venv-quantize, or $PEFTDEPLOY_QUANTIZE_PYTHON)",
                 f"run `{SETUP_COMMAND}`, or set quantization.method: rtn", "backbone", loc)


@recipe_check("revision")
def _revision(ctx: CheckContext) -> Iterable[Finding]:
    r = ctx.recipe
    items = [("backbone", r.backbone.model, r.backbone.revision, ("backbone", "revision"))]
    for i, a in enumerate(r.adapters):
        items.append((a.name, a.source, a.revision, ("adapters", i, "revision")))
    for subject, src, rev, path in items:
        if src.startswith("hf://") and not (rev and re.fullmatch(r"[0-9a-f]{40}", rev)):
            commit = ctx.inventory.commits.get(subject)
            now = f" (now commit {commit})" if commit else ""
            pin = f"revision: {commit}" if commit else "a commit sha in revision:"
            yield _f("revision-unpinned", I if subject != "backbone" else W,
                     f"{subject} {src} follows {'branch ' + repr(rev) if rev else 'the default branch'}{now}; the "
                     "deployment changes when the repo does", f"pin {pin} for reproducible deployments "
                     "(or `peftdeploy lock`)", subject, ctx.loc(*path) or ctx.loc(*path[:-1]), commit=commit)


@recipe_check("api-key-empty")
def _api_key_empty(ctx: CheckContext) -> Iterable[Finding]:
    key = ctx.recipe.serving.api_key
    if key.env and not key.is_set and ctx.local:
        host = ctx.recipe.serving.host
        yield _f("api-key-empty", W if _is_loopback(host) else E,
                 f"serving.api_key: ${{{key.env}}} is unset or empty, so the server on {host} takes requests "
                 "without any key", f"export {key.env}=<a long random key> (e.g. `openssl rand -hex 24`)"
                 + ("" if _is_loopback(host) else ", or serve on serving.host: 127.0.0.1"),
                 "serving", ctx.loc("serving", "api_key"), env=key.env, host=host)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@recipe_check("model-len")
def _model_len(ctx: CheckContext) -> Iterable[Finding]:
    r, m = ctx.recipe, ctx.model
    if m is None:
        return
    ml = r.backbone.max_model_len
    if ml and m.max_position_embeddings and ml > m.max_position_embeddings:
        yield _f("max-model-len", E, f"backbone.max_model_len {ml} exceeds the model's max_position_embeddings "
                 f"{m.max_position_embeddings}", f"set max_model_len <= {m.max_position_embeddings}", "backbone",
                 ctx.loc("backbone", "max_model_len"))
    tp = r.serving.tensor_parallel_size
    if tp > 1 and (m.num_heads % tp or (m.num_kv_heads >= tp and m.num_kv_heads % tp)):
        yield _f("tensor-parallel", E, f"tensor_parallel_size {tp} does not divide the {m.num_heads} attention "
                 f"heads / {m.num_kv_heads} kv heads", "use a tensor_parallel_size that divides both", "serving",
                 ctx.loc("serving", "tensor_parallel_size"))


@recipe_check("extra-args")
def _extra_args(ctx: CheckContext) -> Iterable[Finding]:
    known = vllm_engine_args()
    managed = MANAGED_ARGS
    for k in ctx.recipe.serving.extra_args:
        dest = k.replace("-", "_")
        loc = ctx.loc("serving", "extra_args", k)
        if dest in managed:
            yield _f("extra-arg-managed", E, f"extra_args.{k} is set by peftdeploy from the recipe",
                     f"set {managed[dest]} in the recipe instead", "serving", loc)
        elif known and dest not in known:
            near = difflib.get_close_matches(dest, list(known), n=1, cutoff=0.6)
            yield _f("extra-arg-unknown", E, f"extra_args.{k} is not a vLLM engine argument (vLLM "
                     f"{_engine_args_version()})", (f"did you mean {near[0]!r}? " if near else "")
                     + "see `vllm serve --help`", "serving", loc)


# --------------------------------------------------------------------------------------------
def check(ctx: CheckContext) -> list[Finding]:
    out: list[Finding] = []
    for _code, fn in RECIPE_CHECKS:
        out.extend(fn(ctx))
    for a in ctx.inventory.adapters:
        for _code, fn in ADAPTER_CHECKS:
            out.extend(fn(ctx, a))
    return out


def sort_findings(fs: Iterable[Finding]) -> list[Finding]:
    order = {E: 0, W: 1, I: 2}
    return sorted(fs, key=lambda f: order[f.severity])


__all__ = ["ADAPTER_CHECKS", "CheckContext", "MANAGED_ARGS", "RECIPE_CHECKS", "check", "sort_findings",
           "vllm_engine_args"]
