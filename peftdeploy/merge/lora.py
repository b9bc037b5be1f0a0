"""Read a PEFT LoRA adapter directory lazily and describe exactly what merging it means.

Only ``adapter_config.json`` and the safetensors *header* are read up front; tensors are read one
at a time when the merge engine needs them (``pread``, see :mod:`peftdeploy.merge.shard_read`).

Key naming (as PEFT's ``get_peft_model_state_dict`` writes it; the adapter name, normally
``default``, is usually stripped but accepted when present)::

    base_model.model.<module>.lora_A[.<name>].weight        (r, in)       Linear / Conv1D
    base_model.model.<module>.lora_B[.<name>].weight        (out, r)
    base_model.model.<module>.lora_B[.<name>].bias          (out,)        lora_bias=True
    base_model.model.<module>.lora_embedding_A[.<name>]     (r, vocab)    Embedding
    base_model.model.<module>.lora_embedding_B[.<name>]     (dim, r)
    base_model.model.<module>.lora_magnitude_vector[.<name>][.weight]      DoRA
    base_model.model.<module>.base_layer.weight             a saved copy of the base weight
                                                            (embedding layers, resized vocab)
    base_model.model.<module>.<param>                       modules_to_save / bias="all" copies
                                                            (…modules_to_save.<name>.<param> accepted)

``<module>`` is the module's name in the backbone, so the backbone tensor is ``<module>.weight``.

Scaling is PEFT's: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and
``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` matched exactly as
``peft.utils.other.get_pattern_key`` does: the first pattern key ``k`` (in the config's order) for
which ``re.match(rf"(.*\\.)?({k})$", module_name)`` succeeds, ``module_name`` being the full module
name in the backbone (no ``base_model.model.`` prefix).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftdeploy.errors import MergeError
from peftdeploy.merge import shard_read

if TYPE_CHECKING:  # imported lazily: parsing an adapter does not need torch
    import numpy as np
    import torch


def _torch():  # noqa: ANN202 - only pickled adapters need torch here
    import torch

    return torch


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"

_PREFIX = "base_model.model."
_RE_LINEAR = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?\.(?P<param>weight|bias)$")
_RE_EMBED = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?$")
_RE_MAGNITUDE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.(?P<name>[^.]+?))?(?:\.weight)?$")
_RE_BASE_LAYER = re.compile(r"^(?P<mod>.+)\.base_layer\.(?P<param>[^.]+)$")
_RE_MODULES_TO_SAVE = re.compile(r"^(?P<mod>.+)\.modules_to_save\.(?P<name>[^.]+)\.(?P<param>.+)$")
_RE_ORIGINAL = re.compile(r"^(?P<mod>.+)\.original_module\.(?P<param>.+)$")

# LoraConfig fields that select a LoRA variant whose merge is not W + s·B@A (peft.tuners.lora.layer
# `lora_variants` + LoraConfig fields tagged is_lora_variant), or a method that cannot be merged.
_VARIANT_FIELDS = {
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA (block-diagonal LoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which is only active after its invocation tokens",
    "use_qalora": "QA-LoRA (quantization-aware LoRA)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters, e.g. MoE experts)",
    "layer_replication": "layer_replication (the adapted model has more layers than the backbone)",
    "trainable_token_indices": "trainable_token_indices (trainable token embeddings)",
}
# init methods that change the *base* weights at initialisation: the adapter is only correct on
# top of the modified (residual) base unless it was converted when saved
# (save_pretrained(path_initial_model_for_weight_conversion=...), which resets init_lora_weights).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def get_pattern_key(pattern_keys: list[str], key_to_match: str) -> str:
    """Exactly peft.utils.other.get_pattern_key (peft 0.21)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of one adapter."""

    module: str  # module name in the backbone, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" | "embedding"
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool  # the config's value (see orientation())
    bias_key: str | None = None  # lora_B bias (lora_bias=True)
    magnitude_key: str | None = None  # DoRA magnitude vector

    @property
    def target(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_target(self) -> str:
        return f"{self.module}.bias"

    @property
    def natural_shape(self) -> tuple[int, int]:
        """Shape of B @ A."""
        return (self.b_shape[0], self.a_shape[1])

    def orientation(self, backbone_shape: tuple[int, ...]) -> bool | None:
        """Whether the delta is (B@A).T for this backbone tensor; None when the shapes can't match.

        Embedding LoRA is always transposed (PEFT: ``transpose(B @ A, True)``). For Linear/Conv1D,
        PEFT decides per layer type (Conv1D stores (in, out) and forces fan_in_fan_out=True, Linear
        forces False, rewriting the config as it goes), so a config's ``fan_in_fan_out`` may be
        wrong for some of its modules; the stored shape decides whenever it is not square, and the
        config's value decides for square weights.
        """
        if len(backbone_shape) != 2:
            return None
        nat = self.natural_shape
        tr = (nat[1], nat[0])
        if self.kind == "embedding":
            return True if tuple(backbone_shape) == tr else None
        prefer = tr if self.fan_in_fan_out else nat
        if tuple(backbone_shape) == prefer:
            return self.fan_in_fan_out
        other = nat if self.fan_in_fan_out else tr
        if tuple(backbone_shape) == other:
            return not self.fan_in_fan_out
        return None


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter directory, opened lazily. Use as a context manager (or call close())."""

    name: str
    path: Path
    config: dict[str, Any]
    weights_path: Path
    modules: dict[str, LoraModule] = field(default_factory=dict)  # backbone weight name -> module
    replacements: dict[str, str] = field(default_factory=dict)  # backbone tensor name -> adapter key
    use_dora: bool = False
    _infos: dict[str, shard_read.TensorInfo] = field(default_factory=dict, repr=False)
    _pickled: "dict[str, torch.Tensor] | None" = field(default=None, repr=False)
    _fd: int = field(default=-1, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- tensors -------------------------------------------------------------------------------
    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[key].shape)
        return self._infos[key].shape

    def dtype(self, key: str) -> "torch.dtype":
        if self._pickled is not None:
            return self._pickled[key].dtype
        return self._infos[key].torch_dtype

    def tensor(self, key: str) -> "torch.Tensor":
        """Read one tensor of the adapter (a private copy)."""
        if self._pickled is not None:
            return self._pickled[key].clone()
        with self._lock:
            if self._fd < 0:
                self._fd = os.open(self.weights_path, os.O_RDONLY)
        return shard_read.read_tensor(self._fd, self._infos[key])

    def dtype_code(self, key: str) -> str:
        """safetensors dtype code of a tensor ("BF16", "F32", ...)."""
        if self._pickled is not None:
            return shard_read.st_code(self._pickled[key].dtype)
        return self._infos[key].dtype

    def raw(self, key: str) -> "np.ndarray":
        """One tensor as a numpy array in its storage dtype (bf16 as uint16), without torch for
        safetensors adapters (a private copy)."""
        if self._pickled is not None:
            t = self._pickled[key].detach().contiguous()
            return shard_read.raw_array(shard_read.st_code(t.dtype), t.view(-1).view(_torch().uint8).numpy().copy(),
                                  tuple(t.shape))
        with self._lock:
            if self._fd < 0:
                self._fd = os.open(self.weights_path, os.O_RDONLY)
        return shard_read.read_array(self._fd, self._infos[key])

    def array(self, key: str) -> "np.ndarray":
        """One float tensor of the adapter as a float32 numpy array (a private copy)."""
        return shard_read.to_float32(self.dtype_code(key), self.raw(key))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> "LoraAdapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- summary -------------------------------------------------------------------------------
    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def scales(self) -> dict[str, float]:
        return {m.module: m.scale for m in self.modules.values()}

    def summary(self) -> dict[str, Any]:
        sc = sorted({m.scale for m in self.modules.values()})
        return {
            "name": self.name,
            "path": str(self.path),
            "weights_file": self.weights_path.name,
            "modules": len(self.modules),
            "ranks": sorted(self.ranks),
            "scales": sc,
            "use_rslora": bool(self.config.get("use_rslora")),
            "use_dora": self.use_dora,
            "replaced_tensors": sorted(self.replacements),
        }


def _err(adapter: str, msg: str, fix: str) -> MergeError:
    return MergeError(f"adapter {adapter!r}: {msg}", fix=fix)


def _check_config(name: str, cfg: dict[str, Any], *, allow_dora: bool) -> None:
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise _err(name, f"is a {ptype} adapter, not LoRA; only LoRA adapters can be merged",
                   "use a LoRA adapter, or merge it with peft (merge_and_unload) yourself")
    if "r" not in cfg:
        raise _err(name, f"{ADAPTER_CONFIG} has no 'r'", "pass a PEFT LoRA adapter directory")
    if cfg.get("use_dora") and not allow_dora:
        raise _err(name, "uses DoRA (use_dora: true), which this merge does not support here",
                   "merge DoRA adapters one at a time with weight 1.0, or serve the adapter instead of merging")
    for fld, what in _VARIANT_FIELDS.items():
        v = cfg.get(fld)
        if v:
            raise _err(name, f"uses {what} ({fld}={json.dumps(v)[:60]}), which cannot be merged exactly "
                             "as W + scale·B·A", "serve this adapter with vLLM instead of merging it")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str):
        low = init.lower()
        if any(low.startswith(p) for p in _BASE_MODIFYING_INITS):
            raise _err(name, f"was initialised with init_lora_weights={init!r}, which modifies the base "
                             "weights; on the original backbone its merge is wrong",
                       "re-save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                       "to get a standard LoRA adapter")
        if low == "mica":
            raise _err(name, "uses MiCA (init_lora_weights='mica'), a LoRA variant this merge does not support",
                       "serve this adapter with vLLM instead of merging it")


def _layer_index(module: str, layers_pattern: Any) -> int | None:
    """The layer index of a module name, found as PEFT's check_target_module_exists finds it."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for p in pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _strip(key: str) -> str:
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def open_adapter(path: str | os.PathLike[str], *, name: str | None = None, allow_pickle: bool = False,
                 allow_dora: bool = True) -> LoraAdapter:
    """Open a PEFT LoRA adapter directory and parse it (config + tensor names/shapes only).

    Raises MergeError for anything that cannot be merged exactly (see the module docstring).
    """
    path = Path(path)
    name = name or path.name
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise _err(name, f"{cfg_path} not found", "point the adapter at a PEFT adapter directory "
                   f"(with {ADAPTER_CONFIG} and {ADAPTER_SAFETENSORS})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise _err(name, f"{cfg_path} is not valid JSON ({e})", "re-save the adapter with peft") from None
    from ..adapter_format import AdapterConfigError, check_adapter_config  # the checks plan runs too

    try:
        check_adapter_config(cfg, str(cfg_path))
    except AdapterConfigError as e:
        raise _err(name, str(e), e.fix) from None
    _check_config(name, cfg, allow_dora=allow_dora)

    st = path / ADAPTER_SAFETENSORS
    pk = path / ADAPTER_PICKLE
    infos: dict[str, shard_read.TensorInfo] = {}
    pickled = None
    if st.is_file():
        try:
            infos = shard_read.read_header(st).tensors
        except shard_read.SafetensorsFormatError as e:
            raise _err(name, f"{st} is not a valid safetensors file ({e})", "re-save the adapter") from None
        weights_path = st
        from ..adapter_format import LORA_FLOAT_DTYPES, parse_lora_name

        bad = sorted({i.dtype for k, i in infos.items() if parse_lora_name(k) and i.dtype not in LORA_FLOAT_DTYPES})
        if bad:
            raise _err(name, f"{st} has LoRA tensors of dtype {', '.join(bad)}; LoRA weights are floating point",
                       "re-save the adapter with peft")
        shapes = {k: v.shape for k, v in infos.items()}
    elif pk.is_file():
        if not allow_pickle:
            raise _err(name, f"has only a pickle weights file ({ADAPTER_PICKLE}); loading pickles can run "
                             "arbitrary code",
                       "convert it to adapter_model.safetensors (peft: model.save_pretrained(dir, "
                       "safe_serialization=True)), or allow pickles explicitly (allow_pickle=True)")
        import torch

        pickled = torch.load(pk, map_location="cpu", weights_only=True)
        if not isinstance(pickled, dict) or not all(isinstance(v, torch.Tensor) for v in pickled.values()):
            raise _err(name, f"{pk} is not a state dict of tensors", "re-save the adapter with peft")
        weights_path = pk
        shapes = {k: tuple(v.shape) for k, v in pickled.items()}
    else:
        raise _err(name, f"no {ADAPTER_SAFETENSORS} in {path}",
                   "point the adapter at a PEFT adapter directory that holds the weights")

    r_default = int(cfg["r"])
    alpha_default = cfg.get("lora_alpha", 8)
    use_rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = dict(cfg.get("rank_pattern") or {})
    alpha_pattern = dict(cfg.get("alpha_pattern") or {})
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    use_dora = bool(cfg.get("use_dora", False))

    # group keys by module
    parts: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    replacements: dict[str, str] = {}
    unknown: list[str] = []
    for key in shapes:
        k = _strip(key)
        if m := _RE_LINEAR.match(k):
            slot = f"{m['ab']}.{m['param']}"
            kinds.setdefault(m["mod"], "linear")
        elif m := _RE_EMBED.match(k):
            slot = f"{m['ab']}.weight"
            kinds.setdefault(m["mod"], "embedding")
        elif m := _RE_MAGNITUDE.match(k):
            slot = "magnitude"
        elif m := _RE_MODULES_TO_SAVE.match(k):
            replacements[f"{m['mod']}.{m['param']}"] = key
            continue
        elif m := _RE_BASE_LAYER.match(k):
            replacements[f"{m['mod']}.{m['param']}"] = key
            continue
        elif _RE_ORIGINAL.match(k):
            continue  # a copy of the untouched original module: nothing to merge
        elif "lora_" in k:
            unknown.append(key)
            continue
        else:
            replacements[k] = key  # modules_to_save / bias copies, saved under their plain name
            continue
        d = parts.setdefault(m["mod"], {})
        if slot in d:
            raise _err(name, f"holds several adapters' weights for {m['mod']} ({d[slot]} and {key})",
                       "save each adapter in its own directory (one adapter name per file)")
        d[slot] = key
    if unknown:
        raise _err(name, f"has tensors this merge does not understand: {', '.join(unknown[:5])}"
                         + (" …" if len(unknown) > 5 else ""),
                   "only standard PEFT LoRA adapters can be merged; serve this adapter instead")

    modules: dict[str, LoraModule] = {}
    for mod, d in parts.items():
        kind = kinds.get(mod)
        if kind is None or "A.weight" not in d or "B.weight" not in d:
            raise _err(name, f"module {mod} lacks lora_A or lora_B", "re-save the adapter with peft")
        if "magnitude" in d and not use_dora:
            raise _err(name, f"module {mod} has a DoRA magnitude vector but use_dora is false",
                       "fix adapter_config.json (use_dora)")
        if use_dora and "magnitude" not in d:
            raise _err(name, f"use_dora is true but module {mod} has no lora_magnitude_vector",
                       "re-save the adapter with peft")
        if "B.bias" in d and not cfg.get("lora_bias"):
            raise _err(name, f"module {mod} has a lora_B bias but lora_bias is false",
                       "fix adapter_config.json (lora_bias)")
        a_shape, b_shape = shapes[d["A.weight"]], shapes[d["B.weight"]]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise _err(name, f"module {mod}: lora_A/lora_B are {len(a_shape)}-D/{len(b_shape)}-D "
                             "(a convolution?); only Linear, Conv1D and Embedding LoRA can be merged",
                       "serve this adapter instead of merging it")
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise _err(name, f"module {mod}: lora_A has rank {rank} but lora_B has {b_shape[1]}",
                       "re-save the adapter with peft")
        r_key = get_pattern_key(list(rank_pattern), mod)
        a_key = get_pattern_key(list(alpha_pattern), mod)
        r_cfg = int(rank_pattern.get(r_key, r_default))
        alpha = alpha_pattern.get(a_key, alpha_default)
        if r_cfg != rank:
            raise _err(name, f"module {mod}: the weights have rank {rank} but the config says r={r_cfg}"
                             + (f" (rank_pattern {r_key!r})" if r_key in rank_pattern else ""),
                       "fix r / rank_pattern in adapter_config.json — the scale alpha/r depends on it")
        if use_dora and kind != "linear":
            raise _err(name, f"module {mod}: DoRA on an embedding cannot be merged here",
                       "serve this adapter instead of merging it")
        modules[f"{mod}.weight"] = LoraModule(
            module=mod, kind=kind, a_key=d["A.weight"], b_key=d["B.weight"], a_shape=tuple(a_shape),
            b_shape=tuple(b_shape), rank=rank, alpha=float(alpha), scale=lora_scale(rank, alpha, use_rslora),
            fan_in_fan_out=fan_in_fan_out, bias_key=d.get("B.bias"), magnitude_key=d.get("magnitude"),
        )

    if not modules and not replacements:
        raise _err(name, f"{weights_path.name} holds no LoRA weights", "check the adapter directory")

    # layers_to_transform: the file already says which layers were adapted; check it agrees.
    ltt = cfg.get("layers_to_transform")
    if ltt is not None and ltt != [] and not isinstance(cfg.get("target_modules"), str):
        allowed = {int(ltt)} if isinstance(ltt, int) else {int(i) for i in ltt}
        bad = []
        for m in modules.values():
            idx = _layer_index(m.module, cfg.get("layers_pattern"))
            if idx is None or idx not in allowed:
                bad.append(m.module)
        if bad:
            raise _err(name, f"layers_to_transform={sorted(allowed)} but the weights adapt "
                             f"{', '.join(sorted(bad)[:4])}{' …' if len(bad) > 4 else ''}",
                       "fix layers_to_transform in adapter_config.json or re-save the adapter")

    # modules_to_save: every replaced tensor should come from a module listed there (or from a
    # base_layer copy / a bias="all"|"lora_only" bias); flag stray plain keys.
    mts = cfg.get("modules_to_save") or []
    bias_mode = cfg.get("bias", "none")
    for tname, key in replacements.items():
        k = _strip(key)
        if _RE_BASE_LAYER.match(k) or _RE_MODULES_TO_SAVE.match(k):
            continue
        mod = tname.rsplit(".", 1)[0]
        if any(re.match(rf"(^|.*\.){m}($|\..*)", mod) for m in mts):
            continue
        if tname.endswith(".bias") and bias_mode in ("all", "lora_only"):
            continue
        raise _err(name, f"holds a full tensor {key!r} that is neither LoRA weights nor listed in "
                         "modules_to_save", "re-save the adapter with peft, or fix modules_to_save")

    return LoraAdapter(name=name, path=path, config=cfg, weights_path=weights_path, modules=modules,
                       replacements=replacements, use_dora=use_dora, _infos=infos, _pickled=pickled)


def adapter_fingerprint_files(path: Path) -> list[Path]:
    """The files whose content defines an adapter's merge (config + weights)."""
    files = [path / ADAPTER_CONFIG]
    st = path / ADAPTER_SAFETENSORS
    files.append(st if st.is_file() else path / ADAPTER_PICKLE)
    return files


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()
