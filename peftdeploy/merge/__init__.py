"""Offline LoRA merge: stream a backbone's safetensors shards, add the adapters' deltas, write a
model directory; optionally through a content-addressed cache.

    from peftdeploy.merge import AdapterInput, merge_cached, merge_model

    res = merge_cached("models/llama", [AdapterInput("sql", "adapters/sql", weight=1.0)], dtype="bfloat16")
    res.path, res.cache_hit, res.key, res.seconds

Merging needs torch (the ``merge`` extra). torch is imported only when a merge actually runs: a
cache hit (``merge_cached``/``lookup_cached``) and adapter/backbone inspection do not import it.
Nothing here imports vllm.
"""
from __future__ import annotations

from typing import Any

from peftdeploy.merge.cache import cleanup_stale, default_cache_root, lookup_cached, merge_cached, merge_key
from peftdeploy.merge.common import (COMPLETE_MARKER, DEFAULT_SHARD_SIZE, MERGE_ENGINE_VERSION, PROVENANCE_FILE,
                                     AdapterInput, MergeResult, dtype_name, open_backbone)
from peftdeploy.merge.hashing import HashCache, sha256_file
from peftdeploy.merge.lora import LoraAdapter, LoraModule, get_pattern_key, lora_scale, open_adapter

_LAZY = {  # these import torch
    "merge_model": "peftdeploy.merge.engine",
    "plan_merge": "peftdeploy.merge.engine",
    "resolve_dtype": "peftdeploy.merge.engine",
    "default_threads": "peftdeploy.merge.engine",
}

__all__ = [
    "AdapterInput",
    "MergeResult",
    "merge_model",
    "merge_cached",
    "lookup_cached",
    "merge_key",
    "cleanup_stale",
    "default_cache_root",
    "open_adapter",
    "open_backbone",
    "plan_merge",
    "resolve_dtype",
    "dtype_name",
    "default_threads",
    "LoraAdapter",
    "LoraModule",
    "get_pattern_key",
    "lora_scale",
    "HashCache",
    "sha256_file",
    "DEFAULT_SHARD_SIZE",
    "MERGE_ENGINE_VERSION",
    "PROVENANCE_FILE",
    "COMPLETE_MARKER",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftdeploy.merge' has no attribute {name!r}")
