"""vLLM's engine arguments as peftdeploy knows them: the flags the plan manages (`MANAGED_ARGS`) and the
frozen table of the verified vLLM's arguments (peftdeploy/data), the fallback when vLLM is not importable."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


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
