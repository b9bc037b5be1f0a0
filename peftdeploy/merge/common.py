"""What the merge engine and the cache share, without importing torch (so that a cache lookup —
``peftdeploy merge`` on an unchanged recipe — costs a few stats, not a torch import).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from peftdeploy.errors import MergeError
from peftdeploy.merge import shard_read
from peftdeploy.merge.hashing import HashCache
from peftdeploy.util import COMPLETE_MARKER  # noqa: F401 (re-exported)

# Part of every cache key: bump it whenever a merge of the same inputs would write other bytes
# (arithmetic, chunking, layout, copied files).
MERGE_ENGINE_VERSION = "3"
PROVENANCE_FILE = "peftdeploy-provenance.json"
DEFAULT_SHARD_SIZE = 5_000_000_000  # what the Hugging Face hub recommends (transformers "5GB")

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# Files never copied to the output: weight pickles (they would shadow or duplicate the merged
# weights, and can run code) and every *.safetensors we did not write (e.g. Mistral's
# consolidated.safetensors, which would still hold the unmerged weights).
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".h5", ".msgpack", ".pkl", ".pickle", ".gguf",
                 ".onnx")
SKIP_NAMES = {SAFE_INDEX, "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
              PROVENANCE_FILE, COMPLETE_MARKER}

# accepted spellings -> canonical name
DTYPE_NAMES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
ST_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class AdapterInput:
    """One adapter to merge: a PEFT LoRA adapter directory and its weight in the sum."""

    name: str
    path: str | os.PathLike[str]
    weight: float = 1.0


@dataclass
class MergeResult:
    """Where the merged model is; `cache_hit` when it was there already (nothing was merged)."""

    path: Path
    cache_hit: bool = False
    key: str | None = None  # cache key (merge_cached), None for a plain merge_model
    seconds: float = 0.0
    dtype: str | None = None  # output dtype name, e.g. "bfloat16"
    provenance: dict[str, Any] = field(default_factory=dict)  # peftdeploy-provenance.json


def dtype_name(dtype: Any) -> str | None:
    """Canonical output dtype name ("float16", "bfloat16", "float32"), None for "auto".

    Accepts the usual spellings and torch dtypes; raises MergeError otherwise.
    """
    if dtype is None:
        return None
    text = str(dtype).lower().removeprefix("torch.")
    if text == "auto":
        return None
    if text in DTYPE_NAMES:
        return DTYPE_NAMES[text]
    raise MergeError(f"unsupported merge dtype {dtype!r}", fix="use auto, float16, bfloat16 or float32")


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------------------------
@dataclass
class Backbone:
    path: Path
    files: list[Path]  # weight shards, in order
    tensors: dict[str, shard_read.TensorInfo]  # in (file, offset) order
    config: dict[str, Any]

    def stored_dtype(self) -> str:
        """The floating dtype holding most bytes (what "auto" means for config.json)."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in ST_FLOAT_NAMES:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        if not by:
            return "float32"
        return ST_FLOAT_NAMES[max(by, key=lambda k: by[k])]


def open_backbone(path: str | os.PathLike[str]) -> Backbone:
    """Parse a local model directory's safetensors headers (no tensor data) and config.json."""
    path = Path(path)
    if not path.is_dir():
        raise MergeError(f"backbone directory {path} not found", fix="point the merge at a local model directory")
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise MergeError(f"{index} is not a valid safetensors index", fix="re-save the model") from None
        names = list(dict.fromkeys(wm.values()))
        files = [path / n for n in sorted(names)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MergeError(f"backbone {path}: shards listed in {SAFE_INDEX} are missing: {', '.join(missing)}",
                             fix="finish downloading the model")
    elif (path / SAFE_SINGLE).is_file():
        files = [path / SAFE_SINGLE]
        wm = None
    else:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise MergeError(
            f"backbone {path} has no safetensors weights" + (f" (only {', '.join(pickles[:3])})" if pickles else ""),
            fix="convert the model to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True))")
    tensors: dict[str, shard_read.TensorInfo] = {}
    for f in files:
        try:
            hdr = shard_read.read_header(f)
        except shard_read.SafetensorsFormatError as e:
            raise MergeError(f"backbone shard {f} is not a valid safetensors file ({e})",
                             fix="re-download the model") from None
        for n, t in hdr.tensors.items():
            if n in tensors:
                raise MergeError(f"backbone tensor {n} is stored twice ({tensors[n].file.name}, {f.name})",
                                 fix="re-save the model")
            tensors[n] = t
    if wm is not None:
        lost = [n for n in wm if n not in tensors]
        if lost:
            raise MergeError(f"backbone {path}: {len(lost)} tensors of {SAFE_INDEX} are in no shard "
                             f"(e.g. {lost[0]})", fix="re-download the model")
    cfg: dict[str, Any] = {}
    if (path / "config.json").is_file():
        try:
            cfg = json.loads((path / "config.json").read_text())
        except ValueError:
            raise MergeError(f"{path / 'config.json'} is not valid JSON", fix="fix or re-download it") from None
    q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if q:
        meth = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise MergeError(f"backbone {path} is quantized ({meth}); LoRA cannot be merged exactly into "
                         "quantized weights", fix="merge into the unquantized model, then quantize the result")
    return Backbone(path, files, tensors, cfg)


def iter_aux_files(root: Path) -> Iterator[Path]:
    """The non-weight files of a model directory that a merge copies (config, tokenizer, ...)."""
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for fn in sorted(files):
            if fn in SKIP_NAMES or fn.lower().endswith(SKIP_SUFFIXES) or fn.startswith("."):
                continue
            yield Path(d) / fn


def backbone_fingerprint(backbone_dir: str | os.PathLike[str], hash_cache: HashCache) -> dict[str, Any]:
    """Content identity of a backbone directory: sha256 of every weight shard and copied file."""
    bb = open_backbone(backbone_dir)
    aux = list(iter_aux_files(bb.path))
    hs = hash_cache.sha256_many(list(bb.files) + aux, threads=2)
    return {"weights": {f.name: hs[str(f)] for f in bb.files},
            "files": {str(p.relative_to(bb.path)): hs[str(p)] for p in aux}}
