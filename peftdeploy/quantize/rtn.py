"""Streaming round-to-nearest (RTN) quantizer: plain HF model dir -> compressed-tensors checkpoint.

What it writes is exactly what llm-compressor writes for the same scheme and what vLLM's
``compressed-tensors`` quantization method reads (``config.json`` -> ``quantization_config``):

==========  ================================  ==========================================================
scheme      compressed-tensors scheme          tensors per quantized Linear (``<module>.`` prefix)
==========  ================================  ==========================================================
int8        W8A8: int8 symmetric per-channel   ``weight`` (I8, [out, in]), ``weight_scale`` ([out, 1])
            weights, int8 dynamic per-token     format ``int-quantized``
            symmetric activations
w8a16       int8 symmetric per-channel         ``weight_packed`` (I32, [out, in/4]), ``weight_scale``
            weights, activations unquantized    ([out, 1]), ``weight_shape`` (I64, [2]); ``pack-quantized``
w4a16       int4 symmetric per-group (128)     ``weight_packed`` (I32, [out, in/8]), ``weight_scale``
            weights, activations unquantized    ([out, in/group]), ``weight_shape``; ``pack-quantized``
==========  ================================  ==========================================================

The per-tensor arithmetic is compressed-tensors' own: scales from
``compressed_tensors.quantization.utils.calculate_qparams`` (min/max observer, i.e. RTN), the
integer codes and packing from the library's ``IntQuantizationCompressor`` /
``PackedQuantizationCompressor.compress``. Only the streaming around it is ours: tensors are read
one at a time with ``pread`` and written through :class:`peftdeploy.merge.shard_write.ShardWriter` in a
layout computed up front from the input headers — peak memory is one tensor (plus its float32
copy), never the model.

Which tensors are quantized: the 2-D ``*.weight`` tensors of the Linear projections inside the
decoder blocks (``...layers.<i>.<...>.weight`` whose module is not a norm). Embeddings, ``lm_head``
and norms stay in the model dtype — the usual choice of llm-compressor recipes (``ignore:
["lm_head"]``); tied embeddings stay tied. All modules that vLLM fuses (q/k/v, gate/up) get the
same scheme, so fused layers never mix schemes.

Group size (w4a16): 128 by default; vLLM needs the group to divide every input dimension of a
quantized layer, so when 128 does not (SmolLM2-135M: hidden 576 = 4.5 x 128) the largest of 128, 64,
32 that divides all of them is used, and recorded in the config and provenance.

Calibration (GPTQ/AWQ-style) is not implemented here: ``method="rtn"`` is the only method.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from peftdeploy.errors import MergeError
from peftdeploy.merge import shard_read, shard_write

QUANTIZER_VERSION = "1"
QUANT_PROVENANCE_FILE = "peftdeploy-quantization.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5_000_000_000
OFFLINE_SCHEMES = ("int8", "w8a16", "w4a16")
# scheme aliases users may write (recipe schema uses the canonical names)
_ALIASES = {"w8a8": "int8", "int8": "int8", "w8a16": "w8a16", "w4a16": "w4a16"}
_GROUP_CANDIDATES = (128, 64, 32)

# files never copied from the source dir
_SKIP_FILES = {SAFE_SINGLE, SAFE_INDEX, ".peftdeploy-complete", QUANT_PROVENANCE_FILE}
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".lock")

_LAYER_RE = re.compile(r"(^|\.)(layers|h|blocks|block|decoder\.layers)\.\d+\.")


@dataclass(frozen=True)
class OfflineSpec:
    """What an offline scheme means in compressed-tensors terms."""

    scheme: str
    num_bits: int
    strategy: str  # "channel" | "group"
    group_size: int | None
    act_int8_dynamic: bool
    format: str  # "int-quantized" | "pack-quantized"

    def quant_scheme(self, targets: list[str]):
        """The compressed_tensors QuantizationScheme for this spec."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        w = QuantizationArgs(num_bits=self.num_bits, type="int", symmetric=True, strategy=self.strategy,
                             group_size=self.group_size, dynamic=False, observer="minmax")
        a = None
        if self.act_int8_dynamic:
            a = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True,
                                 observer=None)
        return QuantizationScheme(targets=targets, weights=w, input_activations=a, format=self.format)


def canonical_scheme(scheme: str) -> str:
    s = _ALIASES.get(str(scheme).lower())
    if s is None:
        raise MergeError(f"quantization scheme {scheme!r} has no offline (checkpoint) form here",
                         fix=f"use one of {', '.join(OFFLINE_SCHEMES)} for an offline checkpoint, or a "
                             "runtime scheme (fp8, bitsandbytes) that vLLM applies at load time")
    return s


def offline_spec(scheme: str, group_size: int | None = 128) -> OfflineSpec:
    s = canonical_scheme(scheme)
    if s == "int8":
        return OfflineSpec("int8", 8, "channel", None, True, "int-quantized")
    if s == "w8a16":
        return OfflineSpec("w8a16", 8, "channel", None, False, "pack-quantized")
    return OfflineSpec("w4a16", 4, "group", int(group_size or 128), False, "pack-quantized")


# ---------------------------------------------------------------------------------------------
# source model
# ---------------------------------------------------------------------------------------------
@dataclass
class _Source:
    path: Path
    files: list[Path]
    tensors: dict[str, shard_read.TensorInfo]
    config: dict[str, Any]


def _open_source(path: Path) -> _Source:
    """Open an unquantized safetensors model (refuses quantized ones: never re-quantize)."""
    from peftdeploy.merge import open_backbone

    bb = open_backbone(path)  # raises MergeError for quantized models / missing weights
    return _Source(bb.path, bb.files, bb.tensors, bb.config)


def _text_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    for k in ("text_config", "language_config", "llm_config"):
        if isinstance(cfg.get(k), dict):
            return cfg[k]
    return cfg


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """A decoder-block Linear weight (2-D, not a norm/embedding/head)."""
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    mod = name[: -len(".weight")]
    leaf = mod.rsplit(".", 1)[-1].lower()
    if "norm" in leaf or "embed" in leaf or leaf in ("lm_head", "wte", "wpe"):
        return False
    if "visual" in mod or "vision" in mod:
        return False
    return bool(_LAYER_RE.search(mod))


def choose_group_size(in_dims: list[int], requested: int = 128) -> int:
    """The largest allowed group size <= requested dividing every input dimension."""
    for g in (requested,) + tuple(c for c in _GROUP_CANDIDATES if c < requested):
        if all(d % g == 0 for d in in_dims):
            return g
    raise MergeError(f"no group size in {sorted({requested, *_GROUP_CANDIDATES}, reverse=True)} divides all "
                     f"input dimensions {sorted(set(in_dims))}",
                     fix="use a per-channel scheme (int8 or w8a16) for this model")


# ---------------------------------------------------------------------------------------------
# per-tensor quantization (compressed-tensors arithmetic)
# ---------------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor, spec: OfflineSpec, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Quantize one [out, in] weight: the module's compressed tensors, keyed by local name."""
    from compressed_tensors.compressors.naive_quantized import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    qs = spec.quant_scheme(["Linear"])
    wf = w.float()
    out_f, in_f = wf.shape
    if spec.strategy == "channel":
        mn, mx = wf.amin(dim=1, keepdim=True), wf.amax(dim=1, keepdim=True)  # [out, 1]
    else:
        g = spec.group_size
        assert g and in_f % g == 0, (in_f, g)
        v = wf.view(out_f, in_f // g, g)
        mn, mx = v.amin(dim=2), v.amax(dim=2)  # [out, in/g]
    scale, zp = calculate_qparams(mn, mx, qs.weights)
    # round the scale to the stored dtype *before* quantizing, so codes match what is loaded
    scale = scale.to(scale_dtype).float()
    sd = {"weight": wf, "weight_scale": scale, "weight_zero_point": zp}
    comp = IntQuantizationCompressor if spec.format == "int-quantized" else PackedQuantizationCompressor
    out = comp.compress(sd, qs)
    out["weight_scale"] = scale.to(scale_dtype)
    out.pop("weight_zero_point", None)  # symmetric
    if "weight_shape" in out:
        out["weight_shape"] = out["weight_shape"].to(torch.int64)
    return out


def dequantize_weight(tensors: dict[str, torch.Tensor], spec: OfflineSpec) -> torch.Tensor:
    """Inverse of :func:`quantize_weight` through compressed-tensors' own decompressors."""
    from compressed_tensors.compressors.naive_quantized import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    qs = spec.quant_scheme(["Linear"])
    sd = {k: v for k, v in tensors.items()}
    sd["weight_scale"] = sd["weight_scale"].float()
    comp = IntQuantizationCompressor if spec.format == "int-quantized" else PackedQuantizationCompressor
    return comp.decompress(sd, qs)["weight"].float()


def _out_layout(name: str, shape: tuple[int, ...], spec: OfflineSpec, scale_st: str) -> list[shard_write.OutTensor]:
    mod = name[: -len(".weight")]
    out_f, in_f = shape
    ns = 1 if spec.strategy == "channel" else in_f // spec.group_size
    if spec.format == "int-quantized":
        return [shard_write.OutTensor(f"{mod}.weight", "I8", (out_f, in_f)),
                shard_write.OutTensor(f"{mod}.weight_scale", scale_st, (out_f, ns))]
    pf = 32 // spec.num_bits
    return [shard_write.OutTensor(f"{mod}.weight_packed", "I32", (out_f, math.ceil(in_f / pf))),
            shard_write.OutTensor(f"{mod}.weight_scale", scale_st, (out_f, ns)),
            shard_write.OutTensor(f"{mod}.weight_shape", "I64", (2,))]


# ---------------------------------------------------------------------------------------------
# the quantizer
# ---------------------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    path: Path
    scheme: str
    spec: OfflineSpec
    quantized_tensors: int
    kept_tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float
    max_rel_rmse: float
    mean_rel_rmse: float
    cache_hit: bool = False
    key: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def _copy_aux(src: Path, dst: Path) -> list[str]:
    copied = []
    for fn in sorted(os.listdir(src)):
        s = src / fn
        if fn in _SKIP_FILES or fn.startswith(".") or fn.lower().endswith(_SKIP_SUFFIXES) or not s.is_file():
            continue
        if fn in ("peftdeploy-provenance.json",):
            shutil.copyfile(s, dst / "peftdeploy-merge-provenance.json")
        elif fn != "config.json":
            shutil.copyfile(s, dst / fn)
        copied.append(fn)
    # sub-directories (rare: e.g. tokenizer assets)
    for fn in sorted(os.listdir(src)):
        s = src / fn
        if s.is_dir() and not fn.startswith("."):
            shutil.copytree(s, dst / fn, dirs_exist_ok=True)
            copied.append(fn + "/")
    return copied


def quantization_config(spec: OfflineSpec, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json (as llm-compressor writes it)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(config_groups={"group_0": spec.quant_scheme(["Linear"])}, format=spec.format,
                            quantization_status="compressed", ignore=ignore)
    d = qc.model_dump(mode="json")
    d["version"] = getattr(compressed_tensors, "__version__", "unknown")
    d.setdefault("sparsity_config", {})
    d.setdefault("transform_config", {})
    return d


def quantize_model(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    scheme: str,
    *,
    group_size: int = 128,
    method: str = "rtn",
    shard_size_bytes: int = DEFAULT_SHARD_SIZE,
    progress: Callable[[str], None] | None = None,
    provenance: dict[str, Any] | None = None,
) -> QuantizeResult:
    """Quantize the unquantized HF model in `src_dir` into a new directory `out_dir` (must not
    exist or be empty). Streams: one tensor in memory at a time."""
    if method != "rtn":
        raise MergeError(f"quantization method {method!r} is not available",
                         fix="use method 'rtn' (round-to-nearest, no calibration data)")
    t0 = time.perf_counter()
    src = _open_source(Path(src_dir))
    spec = offline_spec(scheme, group_size)
    names = list(src.tensors)
    qnames = [n for n in names if is_quantizable(n, src.tensors[n].shape)
              and src.tensors[n].dtype in shard_read.FLOAT_ST]
    if not qnames:
        raise MergeError(f"{src.path}: found no decoder Linear weights to quantize",
                         fix="only decoder-only transformer checkpoints (…layers.N.*_proj.weight) are supported")
    if spec.strategy == "group":
        g = choose_group_size([src.tensors[n].shape[1] for n in qnames], spec.group_size or 128)
        if g != spec.group_size:
            spec = OfflineSpec(spec.scheme, spec.num_bits, spec.strategy, g, spec.act_int8_dynamic, spec.format)
    # the dtype activations run in = the dtype of the kept float tensors; scales are stored in it
    by: dict[str, int] = {}
    for t in src.tensors.values():
        if t.dtype in shard_read.FLOAT_ST:
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
    scale_st = max(by, key=by.get) if by else "F32"
    scale_dtype = shard_read.torch_dtype(scale_st)

    qset = set(qnames)
    layout: list[tuple[str, list[shard_write.OutTensor]]] = []
    for n in names:
        t = src.tensors[n]
        if n in qset:
            layout.append((n, _out_layout(n, t.shape, spec, scale_st)))
        else:
            layout.append((n, [shard_write.OutTensor(n, t.dtype, t.shape)]))
    # shards
    shards: list[list[tuple[str, list[shard_write.OutTensor]]]] = [[]]
    size = 0
    for item in layout:
        nb = sum(o.nbytes for o in item[1])
        if shards[-1] and size + nb > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nb

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise MergeError(f"quantization output {out} is not empty", fix="choose an empty directory")
    n_sh = len(shards)
    fnames = [SAFE_SINGLE] if n_sh == 1 else [f"model-{i + 1:05d}-of-{n_sh:05d}.safetensors" for i in range(n_sh)]
    fds: dict[Path, int] = {}
    errs: list[float] = []
    weight_map: dict[str, str] = {}
    bytes_out = 0
    try:
        for fname, shard in zip(fnames, shards):
            outs = [o for _, os_ in shard for o in os_]
            w = shard_write.ShardWriter(out / fname, outs, {"format": "pt"})
            try:
                for n, os_ in shard:
                    info = src.tensors[n]
                    fd = fds.get(info.file)
                    if fd is None:
                        fd = fds[info.file] = os.open(info.file, os.O_RDONLY)
                    if n in qset:
                        wt = shard_read.read_tensor(fd, info)
                        q = quantize_weight(wt, spec, scale_dtype)
                        deq = dequantize_weight(q, spec)
                        wf = wt.float()
                        errs.append(float((deq - wf).norm() / wf.norm().clamp_min(1e-12)))
                        mod = n[: -len(".weight")]
                        for o in os_:
                            local = o.name[len(mod) + 1:]
                            tq = q[local].contiguous()
                            assert tuple(tq.shape) == o.shape and shard_read.st_code(tq.dtype) == o.dtype, \
                                (o, tq.shape, tq.dtype)
                            w.write_bytes(o.name, shard_write.tensor_bytes(tq))
                        del wt, q, deq, wf
                    else:
                        w.copy_from(n, fd, info.offset, info.nbytes)
                    for o in os_:
                        weight_map[o.name] = fname
                if progress:
                    progress(f"wrote {fname}")
            except BaseException:
                w.abort()
                raise
            w.close()
            bytes_out += w.size
    finally:
        for fd in fds.values():
            os.close(fd)
    if n_sh > 1:
        total = sum(o.nbytes for _, os_ in layout for o in os_)
        (out / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    _copy_aux(src.path, out)
    cfg = dict(src.config)
    # modules of Linear type that stay unquantized must be listed, lm_head always
    ignore = ["lm_head"]
    # quantization_config lives at the top level (where vLLM and transformers look for it)
    cfg["quantization_config"] = quantization_config(spec, ignore)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    secs = time.perf_counter() - t0
    bytes_in = sum(f.stat().st_size for f in src.files)
    prov = {
        "quantizer": "peftdeploy.quantize.rtn", "quantizer_version": QUANTIZER_VERSION, "method": method,
        "scheme": spec.scheme, "spec": spec.__dict__, "source": str(src.path),
        "compressed_tensors_version": _ct_version(),
        "quantized_tensors": len(qnames), "kept_tensors": len(names) - len(qnames),
        "bytes_in": bytes_in, "bytes_out": bytes_out,
        "rel_rmse_max": max(errs), "rel_rmse_mean": sum(errs) / len(errs), "seconds": round(secs, 3),
        **(provenance or {}),
    }
    (out / QUANT_PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return QuantizeResult(out, spec.scheme, spec, len(qnames), len(names) - len(qnames), bytes_in, bytes_out,
                          secs, max(errs), sum(errs) / len(errs), provenance=prov)


def _ct_version() -> str:
    try:
        import compressed_tensors
        return str(getattr(compressed_tensors, "__version__", "unknown"))
    except ImportError:  # pragma: no cover
        return "absent"
