"""Plan -> LaunchSpec: the exact `peftdeploy-vllm serve ...` command line and its environment.

Flags come in a stable order. `--lora-modules` takes several JSON objects after one flag (vLLM's
parser keeps only the last occurrence of a repeated flag), so the 2nd..nth objects are emitted as
continuation tokens `(json, None)` right after `("--lora-modules", first_json)`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .spec import GUARD_MIDDLEWARE, MODEL_NAMES_ENV, TRAFFIC_MIDDLEWARE, LaunchSpec, MergeStep, ServedAdapter
from ..quantize.support import SCHEMES
from ..util import cache_root
from .engine_args import vllm_engine_args
from .kernels import ENV as LORA_KERNELS_ENV
from .memory import model_dtype

if TYPE_CHECKING:  # pragma: no cover
    from ..inventory import Inventory
    from ..recipe.loader import LoadedRecipe
    from ..recipe.schema import Recipe
    from ..sources import ResolvedRecipe

# schemes vLLM quantizes at load time -> --quantization value (from peftdeploy.quantize.support: fp8, and
# bitsandbytes for GPU vLLM builds that have it; plan's findings refuse either where support.py says the
# device has no kernel, e.g. both on CPU vLLM 0.32)
QUANT_FLAGS = {k: v.vllm_quantization for k, v in SCHEMES.items() if v.kind == "runtime" and v.vllm_quantization}


def merge_output_for(recipe: Recipe, resolved: ResolvedRecipe, inventory: Inventory, adapters: tuple[str, ...],
                     weights: tuple[float, ...] | None = None) -> tuple[str, str]:
    """(output_dir, plan_key) of the full-precision merge of `adapters`.

    The plan key is a name, computed without torch and without reading weights: the backbone as
    written (commit when known), the merge dtype (auto resolved), and each adapter's sha256 (or source + revision) and weight.
    The quantization scheme is *not* part of it: the merge is always full precision, and a quantized
    checkpoint is derived from it (see :func:`quantized_output_for`), so recipes that differ only in
    the scheme share one merge. What the directory holds is decided by content: `up` merges with
    peftdeploy.merge.merge_cached(output=output_dir), whose completion marker carries the content
    key (backbone and adapter bytes, engine version); a directory with another content key is
    re-merged (plan-named cache dirs) or refused (a recipe's own policy.merge.output).
    """
    bb = resolved.backbone if resolved is not None else None
    parts: dict[str, Any] = {
        "backbone": recipe.backbone.merge_base or recipe.backbone.model,
        "revision": (bb.commit if bb is not None and bb.commit else None)
        or recipe.backbone.merge_base_revision or recipe.backbone.revision,
        # as the merge resolves it (auto: the checkpoint's), so `auto` and the dtype it means share one merge
        "dtype": (model_dtype(inventory.model, recipe.backbone.dtype)
                  if inventory is not None and inventory.model is not None else recipe.backbone.dtype),
        "adapters": [],
    }
    for i, name in enumerate(adapters):
        a = recipe.adapter(name)
        sha = None
        if inventory is not None:
            try:
                sha = inventory.adapter(name).sha256
            except KeyError:
                pass
        parts["adapters"].append({"name": name, "sha256": sha or a.sha256, "source": a.source,
                                  "revision": a.revision,
                                  "weight": a.weight if weights is None else weights[i]})
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    out = recipe.policy.merge.output or str(cache_root() / "merged" / key)
    return out, key


def offline_quantize_scheme(recipe: Recipe) -> str | None:
    """The scheme `up` quantizes the merged weights to (None: served as merged, or quantized by vLLM).

    Offline schemes (int8, w8a16, w4a16) as written; a pre-quantized backbone (awq/gptq, merged on
    its backbone.merge_base) is re-quantized to the format it came in (w4a16, weight-only 4 bit);
    fp8 with method rtn is an offline fp8-dynamic checkpoint (llm-compressor), else vLLM's runtime fp8.
    """
    from ..quantize.support import scheme_info  # pure data, no torch

    si = scheme_info(recipe.quantization.scheme)
    if si.kind == "offline":
        return si.name
    if si.kind == "prequantized":
        return si.merge_offline_scheme
    if si.name == "fp8" and recipe.quantization.method == "rtn":
        return "fp8"
    return None


def quantize_method_for(recipe: Recipe) -> Any:
    """The :class:`peftdeploy.quantize.methods.Method` the merged weights are quantized with."""
    from ..quantize.methods import resolve_method  # pure, no torch

    q = offline_quantize_scheme(recipe)
    return resolve_method(q or recipe.quantization.scheme, recipe.quantization.method)


def quantized_output_for(plan_key: str, scheme: str, merge_output: str | None = None) -> str:
    """Where `up` puts the quantized checkpoint of the merge named `plan_key`: a stable path, so the
    planned command names the directory that is served — next to the recipe's own
    policy.merge.output (``<output>-<scheme>``) when it sets one, else in the cache. The files are hard
    links to (or, across file systems, copies of) the entry of the quantize cache."""
    if merge_output:
        return f"{str(merge_output).rstrip('/')}-{scheme}"
    return str(cache_root() / "served" / f"{plan_key}-{scheme}")


def _model_arg(recipe: Recipe, resolved: ResolvedRecipe) -> tuple[str, list[tuple[str, str | None]]]:
    """What vLLM loads: a local dir when the weights are there, else the hub id + --revision."""
    bb = resolved.backbone if resolved is not None else None
    extra: list[tuple[str, str | None]] = []
    if bb is not None and bb.path is not None:
        p = Path(bb.path)
        if bb.kind != "hf" or any(p.glob("*.safetensors")):
            return str(p), extra
    spec = recipe.backbone.model
    if spec.startswith("hf://"):
        m = re.match(r"^hf://([^/]+/[^/]+)(?:/(.+))?$", spec)
        repo = m.group(1) if m else spec[5:]
        if recipe.backbone.revision:
            extra.append(("--revision", recipe.backbone.revision))
        return repo, extra
    return str(bb.path) if bb is not None and bb.path is not None else spec, extra


def extra_arg_flags(extra: dict[str, Any]) -> list[tuple[str, str | None]]:
    known = vllm_engine_args()
    out: list[tuple[str, str | None]] = []
    for k, v in extra.items():
        dest = k.replace("-", "_")
        flag = "--" + dest.replace("_", "-")
        info = known.get(dest)
        if isinstance(v, bool) and (info is None or info.get("kind") == "flag"):
            if v:
                out.append((flag, None))
            elif info and f"--no-{dest.replace('_', '-')}" in info.get("flags", []):
                out.append((f"--no-{dest.replace('_', '-')}", None))
            continue
        if isinstance(v, (dict, list)):
            out.append((flag, json.dumps(v, separators=(",", ":"))))
        elif v is None:
            out.append((flag, None))
        else:
            out.append((flag, str(v)))
    return out


def _download_bytes(inventory: Inventory, served: list[Any], mode: str) -> int | None:
    m = getattr(inventory, "model", None)
    if m is None:
        return None
    ads = getattr(inventory, "adapters", ()) if mode in ("merge", "hybrid") else served
    return int(m.weight_bytes + sum(int(getattr(a, "bytes", 0) or 0) for a in ads))


def build_launch(*, loaded: LoadedRecipe, resolved: ResolvedRecipe, inventory: Inventory, derived: dict[str, Any], mode: str,
                 merge_adapters: tuple[str, ...], served: list[Any], lora_enabled: bool, device: str,
                 lora_kernels: str | None = None) -> LaunchSpec:
    r = loaded.recipe
    s = r.serving
    merge = None
    served_name = r.name
    if mode in ("merge", "hybrid"):
        qscheme = offline_quantize_scheme(r)
        if mode == "merge":
            out_dir, key = merge_output_for(r, resolved, inventory, merge_adapters)
            merge = MergeStep(adapters=merge_adapters, output_dir=out_dir, cache_key=key,
                              quantization=r.quantization.scheme)
        else:
            from .hybrid import delta_dir

            # served adapters are not scaled by their recipe weight, so H is merged with weight 1 and
            # every delta is exact against plain multi-LoRA serving (see plan/hybrid.py)
            hot = merge_adapters[0]
            out_dir, key = merge_output_for(r, resolved, inventory, merge_adapters, weights=(1.0,))
            ddir = delta_dir(key, r, inventory, hot)
            merge = MergeStep(adapters=merge_adapters, output_dir=out_dir, cache_key=key,
                              quantization=r.quantization.scheme, weights=(1.0,), hot=hot, delta_dir=str(ddir))
            served_name = hot  # requests for the hot adapter hit the merged weights with no LoRA
        if qscheme is not None:
            qm = quantize_method_for(r)
            merge = dataclasses.replace(merge, quantize_scheme=qscheme, quantize_method=qm.name,
                                        quantized_dir=quantized_output_for(
                                            key, qscheme, out_dir if r.policy.merge.output else None))
        model, model_extra = merge.served_dir, []
    else:
        model, model_extra = _model_arg(r, resolved)

    args: list[tuple[str, str | None]] = [("--served-model-name", served_name), ("--host", s.host), ("--port", str(s.port))]
    args += model_extra
    dt = derived.get("dtype")
    args.append(("--dtype", str(dt.value) if dt else r.backbone.dtype))
    ml = derived.get("max_model_len")
    if ml is not None:
        args.append(("--max-model-len", str(ml.value)))
    elif r.backbone.max_model_len:
        args.append(("--max-model-len", str(r.backbone.max_model_len)))
    if s.tensor_parallel_size > 1:
        args.append(("--tensor-parallel-size", str(s.tensor_parallel_size)))
    if device == "cuda":
        args.append(("--gpu-memory-utilization", f"{s.gpu_memory_utilization:g}"))
    mns = derived.get("max_num_seqs")
    if mns is not None:
        args.append(("--max-num-seqs", str(mns.value)))
    elif isinstance(s.max_num_seqs, int):
        args.append(("--max-num-seqs", str(s.max_num_seqs)))
    q = r.quantization.scheme
    if q in QUANT_FLAGS and not (merge is not None and merge.quantize_scheme == q):  # fp8 rtn: a checkpoint
        args.append(("--quantization", QUANT_FLAGS[q]))
    # awq / gptq (and merge-mode int8/w4a16 outputs) carry quantization_config: vLLM detects the method
    # and picks its fastest kernel (e.g. awq_marlin); forcing --quantization awq would disable that.
    if r.quantization.kv_cache_dtype == "fp8":
        args.append(("--kv-cache-dtype", "fp8"))
    if r.backbone.trust_remote_code:
        args.append(("--trust-remote-code", None))
    adapters: list[ServedAdapter] = []
    if lora_enabled:
        args.append(("--enable-lora", None))
        for key in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            d = derived.get(key)
            if d is not None:
                args.append(("--" + key.replace("_", "-"), str(d.value)))
        mods = []
        for a in served:
            if mode == "hybrid":
                path = str(Path(merge.delta_dir) / a.name)  # type: ignore[union-attr]
            else:
                ra = resolved.adapter(a.name) if resolved is not None else None
                path = str(ra.path) if ra is not None else a.path
            mods.append(json.dumps({"name": a.name, "path": path, "base_model_name": served_name},
                                   separators=(",", ":")))
            source = a.source if mode == "hybrid" else r.adapter(a.name).source
            adapters.append(ServedAdapter(name=a.name, path=path, source=source,
                                          rank=a.max_rank, preload=True))
        if mods:
            args.append(("--lora-modules", mods[0]))
            args += [(m, None) for m in mods[1:]]
    # requests per served name (peftdeploy_requests_total on /metrics): `up` runs peftdeploy-vllm, so the
    # serving host has peftdeploy, as for the plugin reading PEFTDEPLOY_RECIPE; render drops both
    args.append(("--middleware", TRAFFIC_MIDDLEWARE))
    args.append(("--middleware", GUARD_MIDDLEWARE))  # added last = outermost: the key on every route
    args += extra_arg_flags(s.extra_args)

    env: list[tuple[str, str]] = []
    if device == "cpu" and "cpu_kvcache_space" in derived:
        env.append(("VLLM_CPU_KVCACHE_SPACE", str(derived["cpu_kvcache_space"].value)))
    if device == "cpu":  # a 4-bit checkpoint runs as the w4a16 it is, not as vLLM's W4A8 (cpu_isa.W4A8_ENV)
        from ..quantize.cpu_isa import weight_only_env
        from ..quantize.support import scheme_info

        qs = offline_quantize_scheme(r) or scheme_info(r.quantization.scheme).name
        env += sorted(weight_only_env(qs).items())
    env.append(("PEFTDEPLOY_RECIPE", str(loaded.path)))
    env.append((MODEL_NAMES_ENV, ",".join([served_name, *(a.name for a in adapters)])))
    max_n = mns.value if mns is not None else s.max_num_seqs
    if isinstance(max_n, int):  # the traffic middleware refuses n / best_of above it (a batch's worth)
        env.append(("PEFTDEPLOY_MAX_N", str(max_n)))
    if s.public_metrics:  # the guard middleware lets /metrics through without the key
        env.append(("PEFTDEPLOY_METRICS_PUBLIC", "1"))
    if lora_enabled and r.policy.dynamic_loading and mode == "serve":
        env.append(("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"))
    if lora_enabled and lora_kernels:  # which LoRA kernels the plugin selects in every vLLM process
        env.append((LORA_KERNELS_ENV, lora_kernels))
    secret_env: list[tuple[str, str]] = []
    if s.api_key.env:
        secret_env.append(("VLLM_API_KEY", s.api_key.env))
    return LaunchSpec(
        recipe_name=r.name, recipe_hash=r.compute_hash(), mode=mode, model=model, model_source=r.backbone.model,
        served_model_name=served_name, host=s.host, port=s.port, device=device,
        tensor_parallel_size=s.tensor_parallel_size, args=tuple(args), adapters=tuple(adapters), env=tuple(env),
        secret_env=tuple(secret_env), merge=merge, plugin_recipe=str(loaded.path),
        extra={"derived": {k: v.value for k, v in derived.items()},
               # what a cluster pod downloads into its HF cache (render sizes the cache volume from it)
               "download_bytes": _download_bytes(inventory, served, mode)},
    )
