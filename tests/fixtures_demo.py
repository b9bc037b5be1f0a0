"""Helpers for tests that use the embedded demo (demo://smollm2-135m and demo://adapters/*).

Plain functions, no fixtures: tests/conftest.py can wrap them, e.g.

    @pytest.fixture(scope="session")
    def demo_model_dir():
        from tests.fixtures_demo import demo_model_dir
        return demo_model_dir()

torch / transformers / peft are imported inside the functions only.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from peftdeploy.util import sha256_file  # noqa: E402,F401  (tests call fx.sha256_file)

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_NAMES = ("pirate", "json", "shout")

# Held-out prompts: none of them is in the adapters' training data (scripts/train_demo_adapters.py).
EVAL_PROMPTS = (
    "What is the capital of Germany?",
    "How many legs does a spider have?",
    "What color is the sky?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
)

_PIRATE = re.compile(
    r"\b(arr+|matey|mateys|ahoy|ye|yer|aye|avast|yo ho|landlubbers?|savvy|shiver|timbers|hearties|scallywag)\b"
)


def is_pirate(text: str) -> bool:
    return _PIRATE.search(text.lower()) is not None


def is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text.strip()), dict)
    except ValueError:
        return False


def is_shout(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 3 and sum(c.isupper() for c in letters) / len(letters) >= 0.8


STYLE_CHECKS = {"pirate": is_pirate, "json": is_json, "shout": is_shout}


def demo_model_dir() -> Path:
    """Build (first time, ~30 s) or reuse the demo model; its directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peftdeploy.demo import build_demo_model

    return build_demo_model(progress=False)


def adapter_dir(name: str) -> Path:
    from peftdeploy.demo import demo_adapter_dir

    return demo_adapter_dir(name)




@functools.lru_cache(maxsize=None)
def tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model_dir: str | Path, adapter: str | None = None):
    """A fresh float32 model (with a PEFT adapter applied, unmerged, when `adapter` is given)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir(adapter)))
    return model.eval()


def chat(model, tok, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy chat completion through the model's chat template."""
    import torch

    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat_batch(model, tok, prompts, max_new_tokens: int = 40) -> list[str]:
    """`chat` for several prompts in one left-padded greedy `generate` (the same completions as one by one on
    the demo model in float32, checked when this was written; ~1.7x faster on 2 cores)."""
    import torch

    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True, padding=True)
    finally:
        tok.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
