"""Compatibility checks: (recipe, inventory, mode) -> list[Finding]. Table-driven, no torch / vLLM.

Each check is a small function registered in `ADAPTER_CHECKS` (run per adapter) or `RECIPE_CHECKS`
(run once). A check returns findings with a stable `code`, a severity, a message saying what is
wrong and a `fix` saying what would be right. Severity depends on what happens next: a DoRA adapter
is an error when vLLM must serve it, a warning when it is merged offline.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field as dc_field
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Iterable

from ..errors import Finding, Location, Severity
from ..inventory import AdapterInfo, Inventory, ModelInfo, parse_lora_name
from ..quantize.support import OFFLINE_SCHEMES, RUNTIME_SCHEMES, scheme_info
from .memory import ARCH_LORA, EMBED_TARGETS, accepted_ranks, arch_lora, round_rank, supported_targets

E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO


@dataclass(frozen=True)
class CheckContext:
    loaded: Any  # LoadedRecipe
    inventory: Inventory
    mode: str  # "serve" | "merge" (auto already decided)
    served: frozenset[str]  # adapters vLLM serves as LoRA
    merged: frozenset[str]  # adapters folded into the backbone
    device: str = "cuda"
    # hybrid: the rank vLLM actually serves per adapter (r_i + r_hot), when it differs from the file's
    served_ranks: dict[str, int] = dc_field(default_factory=dict)
    local: bool = True  # the plan is for `up` on this machine (False: `render`, the cluster supplies host/secret)

    @property
    def recipe(self):
        return self.loaded.recipe

    @property
    def model(self) -> ModelInfo | None:
        return self.inventory.model

    def loc(self, *path: Any) -> Location | None:
        from ..recipe.loader import field_location

        return field_location(self.loaded, *path)

    def adapter_index(self, name: str) -> int:
        return [a.name for a in self.recipe.adapters].index(name)

    def aloc(self, a: AdapterInfo, field: str = "source") -> Location | None:
        return self.loc("adapters", self.adapter_index(a.name), field)


def _f(code: str, sev: Severity, msg: str, fix: str, subject: str | None, loc: Location | None,
       **data: Any) -> Finding:
    return Finding(code=code, severity=sev, message=msg, fix=fix, subject=subject, location=loc, data=data)


# --------------------------------------------------------------------------------------------
# adapter checks
# --------------------------------------------------------------------------------------------
AdapterCheck = Callable[[CheckContext, AdapterInfo], Iterable[Finding]]
ADAPTER_CHECKS: list[tuple[str, AdapterCheck]] = []


def adapter_check(code: str) -> Callable[[AdapterCheck], AdapterCheck]:
    def deco(fn: AdapterCheck) -> AdapterCheck:
        ADAPTER_CHECKS.append((code, fn))
        return fn

    return deco


@adapter_check("not-lora")
def _not_lora(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if a.peft_type.upper() not in ("LORA",):
        yield _f("not-lora", E, f"adapter {a.name!r} is a {a.peft_type} adapter; vLLM and peftdeploy serve "
                 "and merge LoRA adapters only", "retrain as LoRA (peft LoraConfig), or drop this adapter",
                 a.name, ctx.aloc(a), peft_type=a.peft_type)


@adapter_check("pickle-only")
def _pickle(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if a.format != "bin":
        return
    allowed = ctx.recipe.adapters[ctx.adapter_index(a.name)].allow_pickle
    if allowed:
        yield _f("pickle-allowed", W, f"adapter {a.name!r} ships only adapter_model.bin (pickle); loading it "
                 "runs code from the file (allowed by allow_pickle: true)",
                 "convert it once to adapter_model.safetensors and drop allow_pickle", a.name, ctx.aloc(a))
    else:
        yield _f("pickle-only", E, f"adapter {a.name!r} ships only adapter_model.bin, a pickle that can run "
                 "arbitrary code when loaded; it is refused by default",
                 "convert it to safetensors (PeftModel.from_pretrained(base, dir).save_pretrained(out, "
                 "safe_serialization=True)), or set 'allow_pickle: true' on this adapter if you trust its origin",
                 a.name, ctx.aloc(a))


@adapter_check("rank")
def _rank(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if a.name not in ctx.served:
        return
    ranks = accepted_ranks()
    r = ctx.served_ranks.get(a.name, a.max_rank)
    what = "rank" if r == a.max_rank else f"served delta rank (its rank {a.max_rank} + the hot adapter's {r - a.max_rank})"
    explicit = ctx.recipe.serving.max_lora_rank
    rounded = round_rank(r)
    if rounded is None:
        yield _f("rank-too-large", E, f"adapter {a.name!r} has {what} {r}, above the largest rank vLLM accepts "
                 f"({ranks[-1]})", f"merge it instead (policy.mode: merge), or retrain with r <= {ranks[-1]}",
                 a.name, ctx.aloc(a), rank=r)
        return
    if isinstance(explicit, int) and r > explicit:
        yield _f("rank-exceeds-max", E, f"LoRA {what} {r} of adapter {a.name!r} is greater than max_lora_rank "
                 f"{explicit}: vLLM would refuse to load it", f"set serving.max_lora_rank: auto (or >= {rounded})",
                 a.name, ctx.loc("serving", "max_lora_rank"), rank=r, max_lora_rank=explicit)
    elif r not in ranks:
        yield _f("rank-rounded", W, f"adapter {a.name!r} has {what} {r}, which is not a rank vLLM accepts "
                 f"({', '.join(map(str, ranks))}); max_lora_rank is rounded up to {rounded}, so its LoRA slots "
                 f"hold {rounded - r} padding columns", f"nothing to do (plan uses max_lora_rank {rounded}); "
                 f"retrain with r={rounded} or a lower accepted rank to waste no slot memory",
                 a.name, ctx.aloc(a), rank=r, rounded=rounded)


@adapter_check("rank-pattern")
def _rank_pattern(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if a.name not in ctx.served or not (a.rank_pattern or a.alpha_pattern):
        return
    yield _f("rank-pattern", W, f"adapter {a.name!r} uses rank_pattern/alpha_pattern (ranks "
             f"{sorted(set([a.r, *a.rank_pattern.values()]))}); vLLM allocates one rank per adapter slot, so "
             f"every module is planned at the max rank {a.max_rank}",
             f"nothing to do; to save slot memory retrain with a uniform r (plan uses {a.max_rank})",
             a.name, ctx.aloc(a), rank_pattern=a.rank_pattern, alpha_pattern=a.alpha_pattern)


@adapter_check("base-model-mismatch")
def _base_model(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    bm = a.base_model_name_or_path
    if not bm:
        return
    r = ctx.recipe
    candidates = {_norm_model_id(r.backbone.model)}
    if r.backbone.merge_base:
        candidates.add(_norm_model_id(r.backbone.merge_base))
    m = ctx.model
    if m and m.name_or_path:
        candidates.add(_norm_model_id(m.name_or_path))
    if _norm_model_id(bm) in candidates or any(_same_family(_norm_model_id(bm), c) for c in candidates):
        return
    yield _f("base-model-mismatch", W, f"adapter {a.name!r} was trained on {bm!r}, but the backbone is "
             f"{r.backbone.model!r}", "check that this adapter belongs to this backbone (the shape check "
             "below is the hard test); if it was trained on an equivalent copy, ignore this warning",
             a.name, ctx.aloc(a), base_model_name_or_path=bm)


def _norm_model_id(s: str) -> str:
    s = re.sub(r"^(hf|s3|file|demo)://", "", s.strip().rstrip("/"))
    parts = [p for p in s.split("/") if p]
    return "/".join(parts[-2:]).lower() if parts else s.lower()


_QUANT_SUFFIX = re.compile(r"[-_.](awq|gptq|bnb|4bit|8bit|fp8|int4|int8|gguf|unsloth-bnb-4bit)$", re.I)


def _same_family(a: str, b: str) -> bool:
    """'TheBloke/Mistral-7B-Instruct-v0.2-AWQ' ~ 'mistralai/Mistral-7B-Instruct-v0.2' (quantized twins)."""
    na, nb = a.split("/")[-1], b.split("/")[-1]
    while _QUANT_SUFFIX.search(na):
        na = _QUANT_SUFFIX.sub("", na)
    while _QUANT_SUFFIX.search(nb):
        nb = _QUANT_SUFFIX.sub("", nb)
    return na == nb


@adapter_check("shape-mismatch")
def _shapes(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    m = ctx.model
    if m is None or not a.tensors:
        return
    dims = m.module_dims()
    bad: list[str] = []
    for tname, (_dt, shape) in a.tensors.items():
        p = parse_lora_name(tname)
        if p is None or not shape:
            continue
        mod, kind = p
        suffix = mod.rsplit(".", 1)[-1]
        lm = re.search(r"\.layers\.(\d+)\.", "." + mod + ".")
        if lm and int(lm.group(1)) >= m.num_layers:
            bad.append(f"{mod}: layer {lm.group(1)} but the backbone has {m.num_layers} layers")
            continue
        want = dims.get(suffix)
        real = m.tensors.get(f"{mod}.weight")
        if real is not None and len(real[1]) == 2 and real[0] not in ("I32", "U8", "I8") and suffix != "embed_tokens":
            want = (real[1][1], real[1][0])  # the real check: the backbone's own [out, in]
        if want is None:
            continue
        fin, fout = want
        if kind == "lora_A" and len(shape) == 2 and shape[1] != fin:
            bad.append(f"{mod}.lora_A {list(shape)}: in_features {shape[1]} != {fin}")
        elif kind == "lora_B" and len(shape) == 2 and shape[0] != fout:
            bad.append(f"{mod}.lora_B {list(shape)}: out_features {shape[0]} != {fout}")
        elif kind == "lora_embedding_A" and len(shape) == 2 and shape[1] != m.vocab_size:
            bad.append(f"{mod}.lora_embedding_A {list(shape)}: vocab {shape[1]} != {m.vocab_size}")
        elif kind == "lora_embedding_B" and len(shape) == 2 and shape[0] != m.hidden_size:
            bad.append(f"{mod}.lora_embedding_B {list(shape)}: hidden {shape[0]} != {m.hidden_size}")
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        yield _f("shape-mismatch", E, f"adapter {a.name!r} does not fit the backbone {m.architecture} "
                 f"(hidden {m.hidden_size}, intermediate {m.intermediate_size}, {m.num_layers} layers): "
                 + "; ".join(bad[:3]) + more,
                 "use the adapter trained for this backbone (or the backbone it was trained on: "
                 f"{a.base_model_name_or_path or 'see its adapter_config.json'})", a.name, ctx.aloc(a),
                 mismatches=bad[:20])


@adapter_check("dora")
def _dora(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if not a.use_dora:
        return
    if a.name in ctx.served:
        yield _f("dora", E, f"adapter {a.name!r} is a DoRA adapter (use_dora: true); vLLM cannot serve DoRA "
                 "unmerged", "merge it into the backbone (policy.mode: merge with this adapter), or retrain "
                 "without use_dora", a.name, ctx.aloc(a))
    else:
        yield _f("dora-merge", W, f"adapter {a.name!r} is a DoRA adapter: merging folds the magnitude vector "
                 "into the weights (exact, but the merged model cannot be un-merged)",
                 "nothing to do; keep the adapter if you need it separately later", a.name, ctx.aloc(a))


@adapter_check("modules-to-save")
def _modules_to_save(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    mts = [m for m in a.modules_to_save if m not in ("classifier", "score")]
    if not mts:
        return
    if a.name in ctx.served:
        yield _f("modules-to-save", E, f"adapter {a.name!r} carries full copies of {', '.join(mts)} "
                 "(modules_to_save); vLLM only loads LoRA A/B matrices and refuses it",
                 "merge it (policy.mode: merge replaces those modules), or retrain without modules_to_save "
                 "(e.g. add the new tokens to the base model first)", a.name, ctx.aloc(a), modules=mts)
    else:
        yield _f("modules-to-save-merge", W, f"adapter {a.name!r} replaces {', '.join(mts)} entirely "
                 "(modules_to_save): the merged model takes those weights from the adapter",
                 "nothing to do if intended; merging several such adapters keeps only one copy",
                 a.name, ctx.aloc(a), modules=mts)


@adapter_check("embedding-lora")
def _embedding(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if not a.embedding_lora or a.name not in ctx.served or ctx.model is None:
        return
    m = ctx.model
    if arch_lora(m).embedding_lora:
        if m.vocab_size > 258048:
            yield _f("embedding-lora-vocab", E, f"adapter {a.name!r} has LoRA on embed_tokens/lm_head, but vLLM "
                     f"caps LoRA vocab at 258048 (model: {m.vocab_size})", "merge it, or retrain without "
                     "embed_tokens/lm_head in target_modules", a.name, ctx.aloc(a))
        else:
            yield _f("embedding-lora", I, f"adapter {a.name!r} has LoRA on embed_tokens/lm_head; {m.architecture} "
                     "supports it in vLLM (slots for embeddings are always allocated for this architecture)",
                     "nothing to do", a.name, ctx.aloc(a))
    else:
        yield _f("embedding-lora-unsupported", E, f"adapter {a.name!r} has LoRA on embed_tokens/lm_head, which "
                 f"vLLM does not support for {m.architecture}", "merge it (policy.mode: merge), or retrain "
                 "without embed_tokens/lm_head in target_modules", a.name, ctx.aloc(a))


@adapter_check("unsupported-target")
def _targets(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    m = ctx.model
    if m is None:
        return
    ok = set(supported_targets(m)) | set(EMBED_TARGETS)
    bad = [t for t in a.target_modules if t not in ok]
    if not bad:
        return
    known = m.architecture in ARCH_LORA
    sev = E if (a.name in ctx.served and known) else W
    yield _f("unsupported-target", sev, f"adapter {a.name!r} has LoRA on {', '.join(bad)}, which "
             f"{m.architecture} cannot take LoRA on in vLLM (supported: {', '.join(supported_targets(m))})",
             "retrain with target_modules among the supported modules (e.g. 'all-linear'), or merge it if "
             "those modules exist in the checkpoint", a.name, ctx.aloc(a), unsupported=bad)


@adapter_check("bias")
def _bias(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if a.bias == "none" and not a.lora_bias:
        return
    what = "lora_bias: true" if a.lora_bias else f"bias: {a.bias}"
    if a.name in ctx.served:
        yield _f("bias", E, f"adapter {a.name!r} trains biases ({what}); vLLM does not support adapter biases",
                 "merge it (policy.mode: merge), or retrain with bias='none'", a.name, ctx.aloc(a))
    else:
        yield _f("bias-merge", I, f"adapter {a.name!r} trains biases ({what}); merge adds them to the backbone",
                 "nothing to do", a.name, ctx.aloc(a))


@adapter_check("init-modifies-base")
def _init(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    init = a.init_lora_weights
    if not isinstance(init, str) or init.lower() in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        return
    yield _f("init-modifies-base", E, f"adapter {a.name!r} was initialised with init_lora_weights={init!r} "
             "(PiSSA/OLoRA/LoftQ/CorDA modify the base weights), so it is wrong on the unmodified backbone",
             "convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion", a.name, ctx.aloc(a))


@adapter_check("unsupported-feature")
def _features(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if a.name not in ctx.served:
        return
    ex = a.extra_config
    feats = [k for k in ("alora_invocation_tokens", "layer_replication", "use_qalora") if ex.get(k)]
    if feats:
        yield _f("unsupported-feature", E, f"adapter {a.name!r} uses {', '.join(feats)}, which vLLM does not "
                 "support", "merge it, or retrain without those options", a.name, ctx.aloc(a), features=feats)


@adapter_check("fan-in-fan-out")
def _fifo(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if a.fan_in_fan_out:
        yield _f("fan-in-fan-out", W, f"adapter {a.name!r} has fan_in_fan_out: true (trained on a Conv1D model "
                 "such as GPT-2); its matrices may be transposed relative to this backbone's linear layers",
                 "check the shape findings; retrain on this backbone if they mismatch", a.name, ctx.aloc(a))


NONFINITE_SCAN_BYTES = 2 << 30  # adapters up to this size are scanned for NaN/inf values (one masked compare)


@adapter_check("non-finite")
def _non_finite(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    """A NaN/inf lora_B makes every answer of a batch it is in '' (issue 16): refused before vLLM loads it."""
    if a.format != "safetensors" or not a.path or a.bytes > NONFINITE_SCAN_BYTES:
        return
    from pathlib import Path

    from ..merge.stio import SafetensorsFormatError, file_nonfinite

    try:
        bad = file_nonfinite(Path(a.path) / "adapter_model.safetensors")
    except (SafetensorsFormatError, OSError):
        return  # unreadable files are reported where they are read
    except ImportError:  # the base install has no numpy (the scan is one numpy compare per tensor)
        yield _f("non-finite-unchecked", I, f"adapter {a.name!r} was not scanned for NaN/inf values: numpy is "
                 "not installed", "pip install 'peftdeploy[merge]' (any vLLM environment has numpy)", a.name,
                 ctx.aloc(a))
        return
    if bad:
        yield _f("non-finite", E, f"adapter {a.name!r} holds {sum(bad.values())} NaN/inf values in {len(bad)} "
                 f"tensors (first: {next(iter(bad))})", "the adapter is broken; re-train or re-export it",
                 a.name, ctx.aloc(a), tensors=len(bad))


@adapter_check("layers-to-transform")
def _layers(ctx: CheckContext, a: AdapterInfo) -> Iterable[Finding]:
    if a.layers_to_transform is not None and ctx.model is not None:
        yield _f("partial-layers", I, f"adapter {a.name!r} adapts only layers {a.layers_to_transform}; vLLM "
                 f"still allocates slots for all {ctx.model.num_layers} layers", "nothing to do", a.name, ctx.aloc(a))


# --------------------------------------------------------------------------------------------
# recipe-wide checks
# --------------------------------------------------------------------------------------------
RecipeCheck = Callable[[CheckContext], Iterable[Finding]]
RECIPE_CHECKS: list[tuple[str, RecipeCheck]] = []


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
    runtime_here = [k for k in RUNTIME_SCHEMES if scheme_info(k).supported_on(ctx.device)[0]]
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
    if not ok and info.kind != "prequantized":
        offline_here = [k for k in OFFLINE_SCHEMES if scheme_info(k).supported_on(ctx.device)[0]]
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


MANAGED_ARGS = {
    "max_loras": "serving.max_loras", "max_lora_rank": "serving.max_lora_rank",
    "max_cpu_loras": "serving.max_cpu_loras", "max_num_seqs": "serving.max_num_seqs",
    "enable_lora": "policy.mode / adapters", "lora_modules": "adapters", "model": "backbone.model",
    "max_model_len": "backbone.max_model_len", "dtype": "backbone.dtype", "host": "serving.host",
    "port": "serving.port", "api_key": "serving.api_key", "served_model_name": "name",
    "tensor_parallel_size": "serving.tensor_parallel_size", "quantization": "quantization.scheme",
    "kv_cache_dtype": "quantization.kv_cache_dtype", "gpu_memory_utilization": "serving.gpu_memory_utilization",
    "trust_remote_code": "backbone.trust_remote_code", "revision": "backbone.revision",
}


@lru_cache(maxsize=1)
def _engine_args_data() -> dict[str, Any]:
    try:
        text = resources.files("peftdeploy").joinpath("data/vllm_engine_args.json").read_text()
        return json.loads(text)
    except (FileNotFoundError, OSError, ValueError):
        return {}


def vllm_engine_args() -> dict[str, Any]:
    return _engine_args_data().get("args", {})


def _engine_args_version() -> str:
    return str(_engine_args_data().get("vllm_version", "?"))


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
