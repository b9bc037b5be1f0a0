"""Which quantization an adapter was trained against (QLoRA), best effort — pure data, no torch.

``adapter_config.json`` does not record the base model's quantization. What PEFT does record:

* ``README.md`` (the model card ``save_pretrained`` writes): when the base model had a
  ``quantization_config`` (bitsandbytes QLoRA) PEFT appends a block
  ``The following `bitsandbytes` quantization config was used during training:`` followed by
  ``- load_in_4bit: True`` / ``- bnb_4bit_quant_type: nf4`` / ``- quant_method: bitsandbytes`` lines
  (``PeftModel.create_or_update_model_card``); ``tags`` may include ``qlora`` / ``4-bit`` /
  ``bitsandbytes``.
* ``adapter_config.json``: ``use_qalora: true`` (QA-LoRA, trained on a GPTQ-style grouped base,
  ``qalora_group_size``) and a non-empty ``loftq_config`` (LoftQ: initialised against an nf4/int
  quantized base, ``loftq_bits``).
* ``base_model_name_or_path`` naming a pre-quantized repository (``…-bnb-4bit``, ``…-AWQ``,
  ``…-GPTQ``, ``…-int4``).
* a ``training_args``/``trainer_state`` is not enough (it does not say how the base was loaded).

:func:`qlora_base_quant` returns one of ``"bnb-nf4"``, ``"bnb-fp4"``, ``"bnb-int8"``, ``"bnb"``,
``"gptq"``, ``"awq"``, ``"int4"``, ``"qalora"``, ``"loftq-<bits>bit"``, or None (nothing says the
base was quantized). :func:`qlora_match` compares that with the served backbone's scheme.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

_BNB_PREFIX = "quantization config was used during training"


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _card_quant(card: str) -> str | None:
    if _BNB_PREFIX in card or "quant_method: bitsandbytes" in card:
        block = card[card.find(_BNB_PREFIX):] if _BNB_PREFIX in card else card
        kv = dict(re.findall(r"^-\s*([A-Za-z0-9_]+):\s*(.+?)\s*$", block, flags=re.M))
        if kv.get("load_in_4bit", "").lower() == "true":
            qt = kv.get("bnb_4bit_quant_type", "fp4").strip().lower()
            return f"bnb-{qt}"
        if kv.get("load_in_8bit", "").lower() == "true":
            return "bnb-int8"
        return "bnb"
    m = re.search(r"^tags:\s*\n((?:\s*-\s*.+\n)+)", card, flags=re.M)
    tags = {t.strip().lower() for t in re.findall(r"-\s*(.+)", m.group(1))} if m else set()
    if {"qlora", "bitsandbytes", "4-bit"} & tags:
        return "bnb"
    return None


def _name_quant(name: str) -> str | None:
    n = name.lower()
    if "bnb-4bit" in n or "bnb_4bit" in n or "4bit-bnb" in n:
        return "bnb-nf4"
    if "bnb-8bit" in n:
        return "bnb-int8"
    if re.search(r"(^|[-_/.])awq($|[-_/.])", n):
        return "awq"
    if re.search(r"(^|[-_/.])gptq($|[-_/.])", n):
        return "gptq"
    if re.search(r"(^|[-_/.])(int4|w4a16)($|[-_/.])", n):
        return "int4"
    return None


def qlora_base_quant(adapter_dir: str | os.PathLike[str]) -> str | None:
    """The quantization the adapter's base model had during training, or None if nothing says so."""
    d = Path(adapter_dir)
    try:
        cfg = json.loads(_read(d / "adapter_config.json") or "{}")
    except ValueError:
        cfg = {}
    q = _card_quant(_read(d / "README.md"))
    if q:
        return q
    if cfg.get("use_qalora"):
        return "qalora"
    loftq = cfg.get("loftq_config") or {}
    if isinstance(loftq, dict) and loftq.get("loftq_bits"):
        return f"loftq-{int(loftq['loftq_bits'])}bit"
    return _name_quant(str(cfg.get("base_model_name_or_path") or ""))


# the served scheme's weight grid family
_FAMILY = {"none": "full", "fp8": "fp8", "int8": "int8", "w8a16": "int8", "w4a16": "int4-group",
           "awq": "int4-group", "gptq": "int4-group", "bitsandbytes": "bnb"}
_TRAINED_FAMILY = {"bnb-nf4": "bnb", "bnb-fp4": "bnb", "bnb-int8": "bnb-int8", "bnb": "bnb", "gptq": "int4-group",
                   "awq": "int4-group", "int4": "int4-group", "qalora": "int4-group"}


def qlora_match(trained: str | None, served_scheme: str | None) -> tuple[str, str]:
    """(status, explanation): status is "n/a" (not a QLoRA adapter), "match", "full-precision"
    (trained quantized, served unquantized) or "mismatch"."""
    s = (served_scheme or "none").lower()
    if trained is None:
        return "n/a", "adapter records no quantized training base"
    fam = _TRAINED_FAMILY.get(trained, trained)
    served = _FAMILY.get(s, s)
    if served == "full":
        return ("full-precision",
                f"adapter was trained on a {trained} quantized base; the served backbone is unquantized. "
                "QLoRA adapters usually work as well or better on the full-precision base (they learned "
                "on a noisier copy of the same weights), but outputs are not bit-identical to training")
    if fam == served:
        if trained == s or (trained in ("int4", "qalora") and s == "w4a16"):
            return "match", f"served backbone quantization ({s}) matches the adapter's training quantization ({trained})"
        return ("match",
                f"adapter trained on {trained}, served on {s}: same 4-bit grouped integer weight family "
                "but different rounding (RTN/AWQ/GPTQ pick different codes); expect a small shift")
    if fam.startswith("bnb"):
        return ("mismatch",
                f"adapter was trained on a bitsandbytes ({trained}) base, which vLLM 0.32 cannot serve; the "
                f"served {s} backbone rounds the weights differently, so the adapter's corrections no longer "
                "line up exactly. Check quality with `peftdeploy eval`, or serve on the full-precision base")
    return ("mismatch",
            f"adapter was trained on a {trained} base but the served backbone is {s}: the quantization "
            "errors the adapter compensated for are different ones; evaluate before deploying")
