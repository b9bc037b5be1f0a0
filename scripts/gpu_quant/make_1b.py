"""On the GPU box: a random-weight 1B-class Llama (TinyLlama-1.1B shape, bf16 safetensors, byte-level
tokenizer with a chat template) in $1 and a random rank-8 PEFT adapter in $2 (to merge)."""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

M, A = sys.argv[1], sys.argv[2]
os.makedirs(M, exist_ok=True)
os.makedirs(A, exist_ok=True)
V = 32000
cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=V, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16")
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(M, safe_serialization=True)
n = sum(p.numel() for p in model.parameters())
alphabet = pre_tokenizers.ByteLevel.alphabet()
vocab = {c: i + 3 for i, c in enumerate(sorted(alphabet))}
vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
while len(vocab) < V:
    vocab[f"<filler_{len(vocab)}>"] = len(vocab)
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
ft.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}")
ft.save_pretrained(M)
R = 8
t = {}
for L in range(cfg.num_hidden_layers):
    for n_, (fi, fo) in {"q_proj": (2048, 2048), "v_proj": (2048, 256)}.items():
        p = f"base_model.model.model.layers.{L}.self_attn.{n_}"
        t[f"{p}.lora_A.weight"] = (torch.randn(R, fi) * 0.01).to(torch.bfloat16)
        t[f"{p}.lora_B.weight"] = (torch.randn(fo, R) * 0.01).to(torch.bfloat16)
save_file(t, f"{A}/adapter_model.safetensors")
json.dump(dict(peft_type="LORA", task_type="CAUSAL_LM", r=R, lora_alpha=16, lora_dropout=0.0, bias="none",
               target_modules=["q_proj", "v_proj"], base_model_name_or_path=M, fan_in_fan_out=False,
               inference_mode=True), open(f"{A}/adapter_config.json", "w"))
print(f"model {M}: {n / 1e9:.2f}B params; adapter {A}")
