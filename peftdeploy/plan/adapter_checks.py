"""Per-adapter compatibility checks (`ADAPTER_CHECKS`, run once per adapter by `findings.check` and by the
plugin for an adapter loaded on request, vllm_plugin/compat.py)."""
from __future__ import annotations

import re
from typing import Callable, Iterable

from ..errors import Finding, Severity
from ..inventory import AdapterInfo, parse_lora_name
from .check_context import CheckContext, _f
from .memory import ARCH_LORA, EMBED_TARGETS, accepted_ranks, arch_lora, round_rank, supported_targets

E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO


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

    from ..merge.shard_read import SafetensorsFormatError, file_nonfinite

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
