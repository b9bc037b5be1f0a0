"""Test helpers: model configs of well-known shapes, tiny PEFT adapters written without torch, and a
pre-filled huggingface_hub cache (models--org--name/snapshots/<sha>/..., refs/<rev>) for offline tests."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from safetensors.numpy import save_file

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "sliding_window": 131072, "use_sliding_window": False,
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "sliding_window": None,
}
MISTRAL_7B_AWQ = {**MISTRAL_7B, "torch_dtype": "float16", "quantization_config": {
    "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 512, "tie_word_embeddings": True, "torch_dtype": "float32",
}


def module_dims(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h), "lm_head": (h, cfg["vocab_size"])}


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_model(dir: Path, cfg: dict[str, Any], *, weights: bool = False, dtype: str = "float32") -> Path:
    """config.json (and, with weights=True, a model.safetensors of zeros — only for tiny configs)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "config.json").write_text(json.dumps(cfg, indent=1))
    if weights:
        np_dt = {"float32": np.float32, "float16": np.float16}[dtype]
        t: dict[str, np.ndarray] = {}
        h, v = cfg["hidden_size"], cfg["vocab_size"]
        t["model.embed_tokens.weight"] = np.zeros((v, h), np_dt)
        for layer in range(cfg["num_hidden_layers"]):
            for name, (fin, fout) in module_dims(cfg).items():
                if name == "lm_head":
                    continue
                kind = "self_attn" if name in ATTN else "mlp"
                t[f"model.layers.{layer}.{kind}.{name}.weight"] = np.zeros((fout, fin), np_dt)
            t[f"model.layers.{layer}.input_layernorm.weight"] = np.zeros((h,), np_dt)
            t[f"model.layers.{layer}.post_attention_layernorm.weight"] = np.zeros((h,), np_dt)
        t["model.norm.weight"] = np.zeros((h,), np_dt)
        if not cfg.get("tie_word_embeddings"):
            t["lm_head.weight"] = np.zeros((v, h), np_dt)
        save_file(t, str(dir / "model.safetensors"))
    return dir


def write_adapter(dir: Path, cfg: dict[str, Any], *, r: int = 8, targets: Iterable[str] = ("q_proj", "v_proj"),
                  layers: Iterable[int] | None = None, dtype: Any = np.float16, base_model: str | None = "auto",
                  rank_pattern: dict[str, int] | None = None, pickle: bool = False,
                  shape_override: dict[str, tuple[int, int]] | None = None,
                  extra_tensors: dict[str, tuple[int, ...]] | None = None, embedding: bool = False,
                  **config: Any) -> Path:
    """A PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors) built with numpy."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    dims = {**module_dims(cfg), **(shape_override or {})}
    targets = list(targets)
    layer_ids = list(range(cfg["num_hidden_layers"])) if layers is None else list(layers)
    tensors: dict[str, np.ndarray] = {}
    for layer in layer_ids:
        for name in targets:
            if name in ("embed_tokens", "lm_head"):
                continue
            fin, fout = dims.get(name, (cfg["hidden_size"], cfg["hidden_size"]))
            rr = (rank_pattern or {}).get(name, r)
            kind = "self_attn" if name in ATTN else "mlp"
            pre = f"base_model.model.model.layers.{layer}.{kind}.{name}"
            tensors[f"{pre}.lora_A.weight"] = np.zeros((rr, fin), dtype)
            tensors[f"{pre}.lora_B.weight"] = np.zeros((fout, rr), dtype)
    if embedding or "embed_tokens" in targets:
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((r, cfg["vocab_size"]), dtype)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = np.zeros((cfg["hidden_size"], r), dtype)
    if "lm_head" in targets:
        tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((r, cfg["hidden_size"]), dtype)
        tensors["base_model.model.lm_head.lora_B.weight"] = np.zeros((cfg["vocab_size"], r), dtype)
    for name, shape in (extra_tensors or {}).items():
        tensors[name] = np.zeros(shape, dtype)
    if base_model == "auto":
        base_model = cfg.get("_name_or_path")
    ac = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
          "target_modules": targets, "bias": "none", "use_rslora": False, "use_dora": False,
          "modules_to_save": None, "base_model_name_or_path": base_model, "fan_in_fan_out": False,
          "rank_pattern": rank_pattern or {}, "alpha_pattern": {}, "init_lora_weights": True}
    ac.update(config)
    (dir / "adapter_config.json").write_text(json.dumps(ac, indent=1))
    if pickle:
        (dir / "adapter_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    else:
        save_file(tensors, str(dir / "adapter_model.safetensors"))
    return dir


def prefill_repo(cache: Path, repo_id: str, src_dir: Path, *, revision: str = "main",
                 commit: str | None = None) -> Path:
    """Copy src_dir's files into a hub-cache snapshot of repo_id and point refs/<revision> at it."""
    cache = Path(cache)
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in Path(src_dir).iterdir():
        if f.is_file():
            blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(f.read_bytes())
            link = snap / f.name
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (root / "refs").mkdir(exist_ok=True)
    if revision and len(revision) != 40:
        (root / "refs" / revision).write_text(commit)
    return snap


# What the shipped recipes (recipes/*.yaml) reference on the hub / s3.
SHIPPED_MODELS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": LLAMA3_8B,
    "Qwen/Qwen2.5-7B-Instruct": QWEN25_7B,
    "TheBloke/Mistral-7B-Instruct-v0.2-AWQ": MISTRAL_7B_AWQ,
    "mistralai/Mistral-7B-Instruct-v0.2": MISTRAL_7B,
}
SHIPPED_ADAPTERS = {
    "acme-ai/llama3-8b-billing-lora": ("meta-llama/Meta-Llama-3-8B-Instruct", 16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "acme-ai/llama3-8b-refunds-lora": ("meta-llama/Meta-Llama-3-8B-Instruct", 8, ("q_proj", "v_proj")),
    "acme-ai/llama3-8b-shipping-lora": ("meta-llama/Meta-Llama-3-8B-Instruct", 32, ("q_proj", "v_proj")),
    "acme-ai/qwen2.5-7b-contracts-lora": ("Qwen/Qwen2.5-7B-Instruct", 16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "acme-ai/mistral-7b-field-notes-qlora": ("mistralai/Mistral-7B-Instruct-v0.2", 16, ("q_proj", "v_proj")),
    "acme-ai/mistral-7b-summaries-qlora": ("mistralai/Mistral-7B-Instruct-v0.2", 8, ("q_proj", "v_proj")),
}
SHIPPED_S3 = {"acme-models/adapters/tone-formal": ("meta-llama/Meta-Llama-3-8B-Instruct", 8, ("q_proj", "v_proj"))}


def prefill_shipped(hub_cache: Path, peftdeploy_cache: Path, work: Path) -> None:
    """Everything the shipped recipes reference: backbone configs (no weights) and small adapters
    (adapters carry LoRA tensors for layer 0 only, to stay small)."""
    for repo, cfg in SHIPPED_MODELS.items():
        d = write_model(work / "models" / repo, {**cfg, "_name_or_path": repo})
        prefill_repo(hub_cache, repo, d)
    for repo, (base, r, targets) in SHIPPED_ADAPTERS.items():
        d = write_adapter(work / "adapters" / repo, SHIPPED_MODELS[base], r=r, targets=targets, layers=[0],
                          base_model=base)
        prefill_repo(hub_cache, repo, d)
    for key, (base, r, targets) in SHIPPED_S3.items():
        write_adapter(Path(peftdeploy_cache) / "s3" / key, SHIPPED_MODELS[base], r=r, targets=targets, layers=[0],
                      base_model=base)
