"""Tiny random models and LoRA adapters for tests (CPU, seconds, no hub access).

    from tests.tiny import build_tiny_llama, build_tiny_gpt2, build_tiny_phi3, build_tiny_lora

    model = build_tiny_llama(tmp_path / "llama")                 # fp32, one model.safetensors
    model = build_tiny_llama(tmp_path / "l3", shards=3)          # model-0000k-of-00003 + index
    ad = build_tiny_lora(model, tmp_path / "ad", r=8, alpha=16)  # PEFT adapter, non-zero delta

Models are saved with ``save_pretrained`` (safetensors) together with a byte-level tokenizer
(256 byte tokens + ``<s>``, ``</s>``, ``<pad>``), a chat template and a generation config, so
they load with ``AutoModelForCausalLM``/``AutoTokenizer`` and can be served by vLLM. Everything is
deterministic in ``seed``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
VOCAB = 320  # 256 byte tokens + 3 specials, padded
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def save_byte_tokenizer(out_dir: str | os.PathLike[str]) -> None:
    """A byte-level tokenizer (ids 0..255 = bytes, 256 <s>, 257 </s>, 258 <pad>) + chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable char (GPT-2's bytes_to_unicode); give byte b id b
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": []})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _save(model: Any, out: Path, dtype: torch.dtype, shards: int) -> None:
    from transformers import GenerationConfig

    model = model.to(dtype)
    kw: dict[str, Any] = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        kw["max_shard_size"] = total // shards + 1
    model.save_pretrained(str(out), safe_serialization=True, **kw)
    GenerationConfig(bos_token_id=256, eos_token_id=257, pad_token_id=258, max_new_tokens=16).save_pretrained(str(out))
    save_byte_tokenizer(out)


def build_tiny_llama(out_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, seed: int = 0,
                     shards: int = 1, tie: bool = False, **config_overrides: Any) -> Path:
    """A random LlamaForCausalLM: hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128, vocab 320.

    `shards` > 1 saves about that many safetensors shards (+ index; at least 2); `tie` ties lm_head to the embeddings
    (then lm_head has no weight of its own in the files). `config_overrides` go to LlamaConfig.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=tie,
               bos_token_id=256, eos_token_id=257, pad_token_id=258, rms_norm_eps=1e-6)
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():  # RMSNorm weights are 1.0 at init: make them non-trivial
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    _save(model, out, dtype, shards)
    return out


def build_tiny_gpt2(out_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, seed: int = 0,
                    shards: int = 1, **config_overrides: Any) -> Path:
    """A random GPT2LMHeadModel (Conv1D layers, weights stored (in, out)): n_embd 64, 2 layers, 4 heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    cfg = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=256,
               eos_token_id=257)
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg))
    with torch.no_grad():  # biases are 0 at init: make them non-trivial
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.02)
    _save(model, out, dtype, shards)
    return out


def build_tiny_phi3(out_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, seed: int = 0,
                    shards: int = 1, **config_overrides: Any) -> Path:
    """A random Phi3ForCausalLM, whose projections are stored packed (qkv_proj, gate_up_proj)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    out = Path(out_dir)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=256,
               eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**cfg))
    _save(model, out, dtype, shards)
    return out


def build_tiny_lora(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, r: int = 8,
                    alpha: float = 16, targets: Sequence[str] | str | None = None, use_rslora: bool = False,
                    rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                    layers_to_transform: list[int] | int | None = None,
                    modules_to_save: list[str] | None = None, use_dora: bool = False, lora_bias: bool = False,
                    init_random: bool = True, seed: int = 0, b_scale: float = 0.02) -> Path:
    """A PEFT LoRA adapter for `model_dir`, saved with PeftModel.save_pretrained (safetensors).

    With `init_random` (default) lora_B is random (times `b_scale`), so the delta is non-zero, as
    are DoRA magnitudes (randomly perturbed) and modules_to_save copies (perturbed). Targets
    default to all attention/MLP projections of the architecture.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, out = Path(model_dir), Path(out_dir)
    mcfg = AutoConfig.from_pretrained(str(model_dir))
    is_gpt2 = mcfg.model_type == "gpt2"
    if targets is None:
        targets = {"gpt2": GPT2_TARGETS, "phi3": PHI3_TARGETS}.get(mcfg.model_type, LLAMA_TARGETS)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lc = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets) if not isinstance(targets, str) else targets,
                    use_rslora=use_rslora, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                    layers_to_transform=layers_to_transform, modules_to_save=modules_to_save, use_dora=use_dora,
                    lora_bias=lora_bias, fan_in_fan_out=is_gpt2, init_lora_weights=True)
    torch.manual_seed(seed)
    pm = get_peft_model(model, lc)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in pm.modules():
            if isinstance(mod, LoraLayer):
                for d in (mod.lora_A, mod.lora_B):
                    for lin in d.values():
                        if init_random:
                            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (
                                1.0 / lin.weight.shape[1] ** 0.5 if d is mod.lora_A else b_scale))
                        if lin.bias is not None:
                            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * b_scale)
                for d in (mod.lora_embedding_A, mod.lora_embedding_B):
                    for name, p in d.items():
                        if init_random:
                            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if d is mod.lora_embedding_A else b_scale))
                if use_dora and init_random:
                    for mv in mod.lora_magnitude_vector.values():
                        mv.weight.mul_(1 + 0.1 * torch.randn(mv.weight.shape, generator=g))
        if modules_to_save and init_random:
            for n, p in pm.named_parameters():
                if ".modules_to_save." in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(out))
    return out


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())


def write_adapter_config(adapter_dir: str | os.PathLike[str], cfg: dict[str, Any]) -> None:
    (Path(adapter_dir) / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
