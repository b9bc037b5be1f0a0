"""The merge's layout plan: which tensor of the backbone gets which adapter contributions, in which
output dtype, in which output shard — all decided from the safetensors headers and the adapters'
files before any byte of data is read (`plan_merge`), so every mismatch is reported before anything
is written. Bookkeeping only: no merge arithmetic, no torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from peftdeploy.errors import MergeError
from peftdeploy.merge import shard_read, shard_write
from peftdeploy.merge.common import SAFE_SINGLE, Backbone, dtype_name
from peftdeploy.merge.lora import LoraAdapter, LoraModule

if TYPE_CHECKING:
    import torch

_NAME_CODE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def _out_code(dtype: Any) -> str | None:
    """safetensors code of the output dtype (a name, a torch dtype or None/"auto")."""
    name = dtype_name(dtype)
    return None if name is None else _NAME_CODE[name]


@dataclass(frozen=True)
class Contribution:
    adapter: int  # index into the adapters list
    module: LoraModule
    transposed: bool
    coef: float  # weight * scale


@dataclass
class TensorPlan:
    name: str
    src: shard_read.TensorInfo
    out_dtype: str  # safetensors code
    contributions: list[Contribution] = field(default_factory=list)
    bias_from: list[tuple[int, LoraModule]] = field(default_factory=list)  # lora_bias deltas
    replacement: tuple[int, str] | None = None  # (adapter index, key)
    dora: tuple[int, LoraModule, bool] | None = None

    @property
    def passthrough(self) -> bool:
        return (not self.contributions and not self.bias_from and self.replacement is None
                and self.dora is None and self.out_dtype == self.src.dtype)

    @property
    def out(self) -> shard_write.OutTensor:
        return shard_write.OutTensor(self.name, self.out_dtype, self.src.shape)


@dataclass
class Plan:
    tensors: list[TensorPlan]
    shards: list[list[TensorPlan]]
    shard_names: list[str]


def _fmt_list(items: Sequence[str], n: int = 8) -> str:
    items = list(items)
    s = ", ".join(items[:n])
    return s + (f" … (+{len(items) - n} more)" if len(items) > n else "")


def _values_equal(code: str, a: np.ndarray, b: np.ndarray) -> bool:
    """torch.equal for two storage arrays of the same dtype code (bf16 compared as values)."""
    if a.shape != b.shape:
        return False
    if code == "BF16":
        a, b = shard_read.to_float32(code, a), shard_read.to_float32(code, b)
    return bool(np.array_equal(a, b))


def plan_merge(backbone: Backbone, adapters: Sequence[LoraAdapter], weights: Sequence[float],
               out_dtype: "torch.dtype | str | None", shard_size_bytes: int) -> Plan:
    """Check every adapter against the backbone and lay the output out. Reads no backbone tensor data.

    `out_dtype`: a torch dtype or a dtype name ("bfloat16", ...); None or "auto" keeps each tensor's."""
    plans = {}
    oc = _out_code(out_dtype)
    for n, t in backbone.tensors.items():
        od = t.dtype
        if oc is not None and t.dtype in shard_read.FLOAT_ST:
            od = oc
        plans[n] = TensorPlan(n, t, od)

    unmatched: list[str] = []
    for ai, (ad, w) in enumerate(zip(adapters, weights)):
        mism: list[str] = []
        for target, m in ad.modules.items():
            src = backbone.tensors.get(target)
            if src is None:
                unmatched.append(f"{ad.name}:{m.module}")
                continue
            if src.dtype not in shard_read.FLOAT_ST:
                raise MergeError(f"backbone tensor {target} is {src.dtype}, not a float tensor (quantized?)",
                                 fix="merge into an unquantized backbone")
            tr = m.orientation(src.shape)
            if tr is None:
                mism.append(f"{m.module} (adapter delta {m.natural_shape[0]}x{m.natural_shape[1]}"
                            f"{', embedding' if m.kind == 'embedding' else ''}, backbone {tuple(src.shape)})")
                continue
            tp = plans[target]
            if m.magnitude_key is not None:
                if w != 1.0:
                    raise MergeError(f"adapter {ad.name!r} uses DoRA, which cannot be merged with weight {w}",
                                     fix="merge DoRA adapters with weight 1.0")
                mshape = ad.shape(m.magnitude_key)
                if tuple(mshape) not in ((m.natural_shape[0],), (1, m.natural_shape[0])):
                    raise MergeError(f"adapter {ad.name!r}: DoRA magnitude of {m.module} has shape {mshape}",
                                     fix="re-save the adapter with peft")
                tp.dora = (ai, m, tr)
            else:
                tp.contributions.append(Contribution(ai, m, tr, float(w) * m.scale))
            if m.bias_key is not None:
                bt = backbone.tensors.get(m.bias_target)
                if bt is None:
                    raise MergeError(f"adapter {ad.name!r} has a LoRA bias (lora_bias) for {m.module} but the "
                                     "backbone layer has no bias", fix="use an adapter trained on this backbone")
                if tuple(bt.shape) != (m.natural_shape[0],):
                    mism.append(f"{m.bias_target} (lora bias {ad.shape(m.bias_key)}, backbone {bt.shape})")
                    continue
                plans[m.bias_target].bias_from.append((ai, m))
        for target, key in ad.replacements.items():
            src = backbone.tensors.get(target)
            if src is None:
                unmatched.append(f"{ad.name}:{target} (modules_to_save)")
                continue
            if tuple(ad.shape(key)) != tuple(src.shape):
                mism.append(f"{target} (adapter's saved copy {tuple(ad.shape(key))}, backbone {tuple(src.shape)})")
                continue
            tp = plans[target]
            if tp.replacement is not None:
                prev_ai, prev_key = tp.replacement
                pa = adapters[prev_ai]
                if pa.dtype_code(prev_key) != ad.dtype_code(key) or not _values_equal(
                        ad.dtype_code(key), pa.raw(prev_key), ad.raw(key)):
                    raise MergeError(
                        f"adapters {adapters[prev_ai].name!r} and {ad.name!r} both replace {target} "
                        "(modules_to_save) with different values; a merge can keep only one",
                        fix="merge them separately, or drop modules_to_save from one of them")
                continue
            tp.replacement = (ai, key)
        if mism:
            raise MergeError(f"adapter {ad.name!r} does not fit the backbone: shape mismatch for "
                             f"{_fmt_list(mism, 4)}",
                             fix="use an adapter trained on this backbone (same architecture and size)")
    if unmatched:
        hint = ""
        if any(u.split(":", 1)[1].startswith("lm_head") for u in unmatched) and \
                backbone.config.get("tie_word_embeddings") and "lm_head.weight" not in backbone.tensors:
            hint = " (lm_head is tied to the input embeddings in this backbone, so it has no weight of its own)"
        raise MergeError(
            f"{len(unmatched)} adapted module(s) have no weight in the backbone: {_fmt_list(unmatched)}{hint}",
            fix="use an adapter trained on this backbone; module names must match the backbone's tensor names "
                "(e.g. an adapter on q_proj/k_proj/v_proj cannot be merged into a backbone storing a packed qkv_proj)")

    for tp in plans.values():
        if tp.dora is not None and (tp.contributions or tp.replacement is not None):
            others = {adapters[c.adapter].name for c in tp.contributions}
            raise MergeError(f"{tp.name}: a DoRA adapter ({adapters[tp.dora[0]].name!r}) and other adapters "
                             f"({_fmt_list(sorted(others))}) adapt the same weight; this merge cannot combine them",
                             fix="merge the DoRA adapter alone")

    # layout: input order, greedy shards; within a shard largest itemsize first (alignment)
    ordered = list(plans.values())
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tp in ordered:
        nb = tp.out.nbytes
        if shards[-1] and size + nb > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tp)
        size += nb
    for s in shards:
        s.sort(key=lambda tp: -shard_read.ST_ITEMSIZE[tp.out_dtype])  # stable
    if len(shards) == 1:
        names = [SAFE_SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return Plan([tp for s in shards for tp in s], shards, names)


