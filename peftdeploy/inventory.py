"""Inspect: read only metadata — config.json, adapter_config.json, safetensors headers.

`inspect(resolved)` -> `Inventory` (frozen): one `ModelInfo` for the backbone (and the merge base),
one `AdapterInfo` per adapter. Tensors are never loaded: a safetensors file starts with an 8-byte
little-endian header length and a JSON header giving every tensor's dtype, shape and byte range,
which is all planning needs. No torch, no vLLM, no safetensors library.

When the backbone's weights are not available locally (hub metadata-only fetch, offline), weight
bytes come from the hub's safetensors metadata if it was fetched, else they are *estimated* from
config.json (`ModelInfo.weights_estimated` is True and the report says so).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .adapter_format import (LORA_FLOAT_DTYPES, AdapterConfigError,  # noqa: F401 (re-exported)
                             _strip_prefix, check_adapter_config, parse_lora_name)
from .errors import SourceError
from .safetensors_format import (DTYPE_BYTES, HeaderError, read_raw_header,  # noqa: F401 (re-exported)
                                 validate_safetensors_header)

if TYPE_CHECKING:  # pragma: no cover
    from .sources import ResolvedRecipe, ResolvedSource

TORCH_DTYPE_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                     "float8_e4m3fn": "F8_E4M3"}
ST_TO_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
              "I32": "int32", "I8": "int8", "U8": "uint8", "I64": "int64"}

TensorMap = Mapping[str, tuple[str, tuple[int, ...]]]

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------------
def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor name -> {dtype, shape, data_offsets}), validated."""
    try:
        header, size, data_start = read_raw_header(path)
        validate_safetensors_header(header, path=path, size=size, data_start=data_start)
    except HeaderError as e:
        raise SourceError(str(e), fix="re-download or re-save the file") from None
    return header


def safetensors_tensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    hdr = read_safetensors_header(path)
    return {k: (v["dtype"], tuple(int(x) for x in v["shape"])) for k, v in hdr.items() if k != "__metadata__"}


def tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return int(math.prod(shape) * DTYPE_BYTES.get(dtype, 2))


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    path: str | None
    source: str
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    torch_dtype: str | None  # from config.json ("bfloat16", ...)
    quantization_config: dict[str, Any] | None
    weight_bytes: int  # bytes of the checkpoint's tensors (as stored)
    weights_estimated: bool  # True: weight_bytes/params estimated from config.json
    weights_from: str  # "safetensors" | "hub-metadata" | "estimate"
    weight_dtype: str | None  # dominant tensor dtype of the checkpoint ("BF16", ...)
    linear_params: int  # parameters of the decoder layers' 2-D weights (quantizable)
    embed_params: int
    lm_head_params: int  # 0 when tied
    other_params: int
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict, repr=False)
    name_or_path: str | None = None
    sliding_window: int | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def quant_method(self) -> str | None:
        q = self.quantization_config
        return str(q.get("quant_method")).lower() if q and q.get("quant_method") else None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embed_params + self.lm_head_params + self.other_params

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-able module of a decoder layer (HF names)."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            "embed_tokens": (self.vocab_size, h), "lm_head": (h, self.vocab_size),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "source": self.source, "architecture": self.architecture,
            "model_type": self.model_type, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_layers": self.num_layers,
            "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "torch_dtype": self.torch_dtype,
            "quantization_config": self.quantization_config, "weight_bytes": self.weight_bytes,
            "weights_estimated": self.weights_estimated, "weights_from": self.weights_from,
            "weight_dtype": self.weight_dtype, "params": self.total_params,
        }


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    source: str
    path: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules_config: Any  # as written in adapter_config.json (list, str regex, "all-linear")
    target_modules: tuple[str, ...]  # concrete module names (suffixes) present in the weights
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    max_rank: int  # largest rank of any module (config and tensor shapes)
    module_ranks: dict[str, int]  # module suffix -> max rank seen in its tensors
    use_dora: bool
    modules_to_save: tuple[str, ...]  # from config, plus full module tensors found in the weights
    base_model_name_or_path: str | None
    fan_in_fan_out: bool
    bias: str
    lora_bias: bool
    init_lora_weights: Any
    layers_to_transform: Any
    layers: tuple[int, ...]  # layer indices with LoRA tensors
    format: str  # "safetensors" | "bin"
    bytes: int  # size of the weights file
    dtype: str | None  # dominant dtype of the LoRA tensors
    sha256: str | None
    embedding_lora: bool  # LoRA on embed_tokens / lm_head (lora_embedding_A/B or lm_head lora_A)
    peft_type: str
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict, repr=False)
    extra_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "path": self.path, "r": self.r,
            "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules), "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern, "max_rank": self.max_rank, "use_dora": self.use_dora,
            "modules_to_save": list(self.modules_to_save),
            "base_model_name_or_path": self.base_model_name_or_path, "fan_in_fan_out": self.fan_in_fan_out,
            "bias": self.bias, "layers": len(self.layers), "format": self.format, "bytes": self.bytes,
            "dtype": self.dtype, "sha256": self.sha256, "embedding_lora": self.embedding_lora,
        }


@dataclass(frozen=True)
class Inventory:
    model: ModelInfo | None  # None when the backbone could not be inspected (see model_unavailable)
    adapters: tuple[AdapterInfo, ...]
    merge_base: ModelInfo | None = None
    model_unavailable: str | None = None
    # hub sources: subject ("backbone", "merge_base", adapter name) -> the commit sha the revision resolved to
    commits: dict[str, str] = field(default_factory=dict)

    def adapter(self, name: str) -> AdapterInfo:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict() if self.model else None,
                "model_unavailable": self.model_unavailable,
                "merge_base": self.merge_base.to_dict() if self.merge_base else None,
                "adapters": [a.to_dict() for a in self.adapters]}


# --------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------
def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise SourceError(f"{p}: invalid JSON ({e})", fix="re-download the file")


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    tc = cfg.get("text_config")
    if isinstance(tc, dict):
        merged = {**cfg, **tc}
        merged.setdefault("architectures", cfg.get("architectures"))
        return merged
    return cfg


def _classify(name: str, shape: tuple[int, ...]) -> str:
    if "embed_tokens" in name or name.endswith("wte.weight") or "word_embeddings" in name:
        return "embed"
    if name.startswith("lm_head") or ".lm_head." in name or name.endswith("output.weight"):
        return "lm_head"
    if ".layers." in name or ".h." in name:
        if len(shape) == 2 and "norm" not in name:
            return "linear"
    return "other"


def model_info_from_config(cfg: dict[str, Any], *, path: str | None, source: str,
                           tensors: TensorMap | None = None, weights_from: str | None = None) -> ModelInfo:
    """Build ModelInfo from a config.json dict and (optionally) the checkpoint's tensor map."""
    c = _text_config(cfg)
    arch = (c.get("architectures") or ["unknown"])[0]
    hidden = int(c.get("hidden_size") or c.get("n_embd") or c.get("d_model") or 0)
    heads = int(c.get("num_attention_heads") or c.get("n_head") or 0)
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or (hidden // heads if heads else 0))
    inter = int(c.get("intermediate_size") or c.get("n_inner") or 4 * hidden)
    layers = int(c.get("num_hidden_layers") or c.get("n_layer") or 0)
    vocab = int(c.get("vocab_size") or 0)
    tie = bool(c.get("tie_word_embeddings", False))
    dtype = c.get("torch_dtype") or c.get("dtype")
    qcfg = c.get("quantization_config")
    if not (hidden and heads and layers and vocab):
        raise SourceError(
            f"config.json of {source} lacks hidden_size / num_attention_heads / num_hidden_layers / "
            f"vocab_size (architecture {arch}); peftdeploy cannot plan for it",
            fix="use a decoder-only transformer checkpoint (Llama, Mistral, Qwen2, Gemma, Phi-3 families)")
    lin = emb = lmh = oth = 0
    wbytes = 0
    counts: dict[str, float] = {}
    if tensors:
        for name, (dt, shape) in tensors.items():
            n = math.prod(shape)
            b = tensor_bytes(dt, shape)
            wbytes += b
            counts[dt] = counts.get(dt, 0) + b
            kind = _classify(name, shape)
            if kind == "linear":
                lin += n
            elif kind == "embed":
                emb += n
            elif kind == "lm_head":
                lmh += n
            else:
                oth += n
        wdtype = max(counts, key=lambda k: counts[k]) if counts else None
        estimated = False
        wf = weights_from or "safetensors"
    else:
        qsz, kvsz = heads * head_dim, kv * head_dim
        per_layer = hidden * qsz + 2 * hidden * kvsz + qsz * hidden + 3 * hidden * inter
        lin = layers * per_layer
        emb = vocab * hidden
        lmh = 0 if tie else vocab * hidden
        oth = layers * 2 * hidden + hidden
        if c.get("attention_bias") or c.get("model_type") in ("qwen2",):
            oth += layers * (qsz + 2 * kvsz)
        wdtype = TORCH_DTYPE_TO_ST.get(str(dtype), "BF16") if dtype else "BF16"
        elt = DTYPE_BYTES[wdtype]
        if qcfg and str(qcfg.get("quant_method", "")).lower() in ("awq", "gptq"):
            bits = int(qcfg.get("bits") or qcfg.get("w_bit") or 4)
            group = int(qcfg.get("group_size") or qcfg.get("q_group_size") or 128)
            group = group if group > 0 else 4096
            # packed ints + fp16 scales + packed zeros per group
            lin_bytes = lin * bits / 8 + lin / group * (2 + bits / 8)
            wbytes = int(lin_bytes + (emb + lmh + oth) * 2)
            wdtype = "I32"
        else:
            wbytes = int((lin + emb + lmh + oth) * elt)
        estimated = True
        wf = "estimate"
    sw = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    return ModelInfo(
        path=path, source=source, architecture=arch, model_type=str(c.get("model_type") or ""),
        hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tie,
        max_position_embeddings=c.get("max_position_embeddings"), torch_dtype=str(dtype) if dtype else None,
        quantization_config=qcfg if isinstance(qcfg, dict) else None, weight_bytes=wbytes,
        weights_estimated=estimated, weights_from=wf, weight_dtype=wdtype, linear_params=int(lin),
        embed_params=int(emb), lm_head_params=int(lmh), other_params=int(oth),
        tensors=dict(tensors or {}), name_or_path=c.get("_name_or_path"),
        sliding_window=sw if isinstance(sw, int) else None, config=cfg,
    )


def local_model_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """Tensor map of a local checkpoint (sharded or not), from headers; None when no weights."""
    idx = sorted(path.glob("*.safetensors.index.json"))
    files: list[Path] = []
    if idx:
        wm = _read_json(idx[0]).get("weight_map", {})
        files = [path / f for f in sorted(set(wm.values()))]
        if not all(f.is_file() for f in files):
            return None  # metadata-only fetch: index present, shards not
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        out.update(safetensors_tensors(f))
    return out


def inspect_model(src: "ResolvedSource") -> ModelInfo:
    assert src.path is not None
    cfg_path = src.path / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"no config.json in {src.spec} ({src.path})",
                          fix="point backbone.model at a Hugging Face model directory (config.json + "
                              "*.safetensors)")
    cfg = _read_json(cfg_path)
    tensors = local_model_tensors(src.path)
    wf = "safetensors"
    if tensors is None and src.remote_tensors:
        tensors, wf = dict(src.remote_tensors), "hub-metadata"
    return model_info_from_config(cfg, path=str(src.path), source=src.spec, tensors=tensors, weights_from=wf)


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------
def _bin_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Best effort for pickle adapters: names only, by scanning the zip's data.pkl (never unpickled)."""
    import zipfile

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if pkl:
                raw = z.read(pkl)
                for m in re.finditer(rb"(base_model\.model\.[A-Za-z0-9_.]+\.weight)", raw):
                    out[m.group(1).decode()] = ("?", ())
    except (zipfile.BadZipFile, OSError):
        pass
    return out


def inspect_adapter(name: str, path: Path, *, source: str, weights_file: str | None = None,
                    sha256: str | None = None) -> AdapterInfo:
    try:
        cfg = check_adapter_config(_read_json(path / "adapter_config.json"),
                                   f"adapter {name!r}: {path / 'adapter_config.json'}")
    except AdapterConfigError as e:
        raise SourceError(str(e), fix=e.fix) from None
    wf = weights_file or next((f for f in ("adapter_model.safetensors", "adapter_model.bin")
                               if (path / f).is_file()), None)
    if wf is None:
        raise SourceError(f"adapter {name!r}: no adapter_model.safetensors in {path}",
                          fix="the directory must hold a PEFT adapter (adapter_config.json + weights)")
    wpath = path / wf
    fmt = "safetensors" if wf.endswith(".safetensors") else "bin"
    tensors = safetensors_tensors(wpath) if fmt == "safetensors" else _bin_tensors(wpath)
    bad = sorted({dt for t, (dt, _) in tensors.items() if parse_lora_name(t) and dt not in LORA_FLOAT_DTYPES | {"?"}})
    if bad:
        raise SourceError(f"adapter {name!r}: LoRA tensors of dtype {', '.join(bad)} in {wpath} (LoRA weights are "
                          "floating point: F32, F16, BF16, F64)", fix="re-save the adapter with peft")
    r = int(cfg.get("r", 8))
    rank_pattern = {str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()}
    alpha_pattern = {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
    module_ranks: dict[str, int] = {}
    layers: set[int] = set()
    full_modules: set[str] = set()
    embedding = False
    dcount: dict[str, float] = {}
    for tname, (dt, shape) in tensors.items():
        parsed = parse_lora_name(tname)
        if parsed is None:
            if tname.endswith(".weight") or tname.endswith(".bias"):
                mod = _strip_prefix(tname).rsplit(".", 1)[0]
                mod = mod.replace(".modules_to_save.default", "").replace(".original_module", "")
                full_modules.add(mod.rsplit(".", 1)[-1])
            continue
        mod, kind = parsed
        suffix = mod.rsplit(".", 1)[-1]
        lm = _LAYER_RE.search("." + mod + ".")
        if lm:
            layers.add(int(lm.group(1)))
        if kind.startswith("lora_embedding") or suffix in ("embed_tokens", "lm_head", "wte"):
            embedding = True
        if dt != "?":
            dcount[dt] = dcount.get(dt, 0) + tensor_bytes(dt, shape)
        if shape and kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            rank = shape[0] if kind in ("lora_A", "lora_embedding_A") else shape[-1]
            module_ranks[suffix] = max(module_ranks.get(suffix, 0), int(rank))
    mts = tuple(str(m) for m in (cfg.get("modules_to_save") or []))
    modules_to_save = tuple(dict.fromkeys([*mts, *sorted(full_modules)]))
    targets = sorted(module_ranks) if module_ranks else sorted(
        {p[0].rsplit(".", 1)[-1] for t in tensors if (p := parse_lora_name(t))})
    max_rank = max([r, *rank_pattern.values(), *module_ranks.values()])
    return AdapterInfo(
        name=name, source=source, path=str(path), r=r, lora_alpha=float(cfg.get("lora_alpha", 8)),
        use_rslora=bool(cfg.get("use_rslora", False)), target_modules_config=cfg.get("target_modules"),
        target_modules=tuple(targets), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        max_rank=int(max_rank), module_ranks=module_ranks, use_dora=bool(cfg.get("use_dora", False)),
        modules_to_save=modules_to_save, base_model_name_or_path=cfg.get("base_model_name_or_path"),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)), bias=str(cfg.get("bias") or "none"),
        lora_bias=bool(cfg.get("lora_bias", False)), init_lora_weights=cfg.get("init_lora_weights", True),
        layers_to_transform=cfg.get("layers_to_transform"), layers=tuple(sorted(layers)), format=fmt,
        bytes=wpath.stat().st_size, dtype=max(dcount, key=lambda k: dcount[k]) if dcount else None,
        sha256=sha256, embedding_lora=embedding, peft_type=str(cfg.get("peft_type") or "LORA"),
        tensors=tensors, extra_config={k: cfg[k] for k in ("alora_invocation_tokens", "layer_replication",
                                                            "use_qalora", "task_type") if k in cfg},
    )


def inspect(resolved: "ResolvedRecipe") -> Inventory:
    """Inspect the resolved backbone, merge base and adapters (metadata only)."""
    model = None
    unavailable = resolved.backbone.unavailable
    if resolved.backbone.path is not None:
        model = inspect_model(resolved.backbone)
    merge_base = None
    if resolved.merge_base is not None and resolved.merge_base.path is not None:
        try:
            merge_base = inspect_model(resolved.merge_base)
        except SourceError:
            merge_base = None
    adapters = tuple(
        inspect_adapter(a.name, a.path, source=a.source.spec, weights_file=a.weights_file, sha256=a.sha256)
        for a in resolved.adapters)
    commits = {subject: src.commit for subject, src in
               [("backbone", resolved.backbone), ("merge_base", resolved.merge_base)]
               + [(a.name, a.source) for a in resolved.adapters] if src is not None and src.commit}
    return Inventory(model=model, adapters=adapters, merge_base=merge_base, model_unavailable=unavailable,
                     commits=commits)


__all__ = ["AdapterConfigError", "HeaderError", "check_adapter_config", "validate_safetensors_header",
           "AdapterInfo", "Inventory", "ModelInfo", "inspect", "inspect_adapter", "inspect_model",
           "model_info_from_config", "read_safetensors_header", "safetensors_tensors", "parse_lora_name"]
