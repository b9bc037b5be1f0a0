"""llm-compressor worker: runs in the quantize tool venv (``.venv-quantize``), never in peftdeploy's.

    .venv-quantize/bin/python peftdeploy/quantize/llmc_worker.py JOB.json

Started by :mod:`peftdeploy.quantize.llmc` as a subprocess (by file path: peftdeploy itself is not
installed in the tool venv, and this file imports nothing of it). JOB.json::

    {"src": merged model dir, "out": empty output dir, "scheme": "w4a16" | "int8" | "w8a16" | "fp8",
     "method": "gptq" | "awq" | "rtn", "group_size": 64 | 128 | null,
     "calibration": {"text_file": ..., "samples": 64, "seq_len": 512} | null, "threads": 2}

Progress goes to stdout as ``peftdeploy-progress: <message>`` lines (llm-compressor's own log goes
to stderr); on success the last stdout line is ``peftdeploy-result: {json}``. Non-zero exit = failure.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

# tokenizer / chat template / generation files copied from the source (the checkpoint must tokenize
# exactly as the merged model does); config.json is the one llm-compressor writes (quantization_config)
_COPY_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".lock")
_COPY_SKIP = {"config.json", "model.safetensors.index.json", ".peftdeploy-complete", "recipe.yaml"}


# int8 (W8A8) SmoothQuant + GPTQ settings; a job's "options" overrides them (scripts/sweep_int8.py).
# Measured on the demo (issue 19): a fake-quant check says the loss is the activations' and that a zero
# point per token (act_symmetric False) would remove it (+1.6% -> -0.6%), but vLLM 0.32 CPU serves such a
# checkpoint wrongly (perplexity 14344 vs 32.6: its oneDNN azp path), so activations stay symmetric and
# the previous SmoothQuant 0.8 + GPTQ stays the default until a better setting is measured with vLLM.
INT8_GPTQ: dict = {
    "smoothing_strength": 0.8,  # SmoothQuant alpha before GPTQ; 0 = none
    "smooth_mappings": None,  # None = llm-compressor's (q/k/v <- input_layernorm, gate/up <- post_attention_layernorm)
    "dampening_frac": 0.01, "block_size": 128, "actorder": "static",  # llm-compressor's GPTQ defaults
    "act_symmetric": True,  # per-token dynamic int8 activations; False (a zero point) breaks on vLLM 0.32 CPU
}


def say(msg: str) -> None:
    print(f"peftdeploy-progress: {msg}", flush=True)


def _weight_args(bits: int, group_size: int | None, symmetric: bool = True) -> dict:
    if group_size:
        return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
                "group_size": group_size, "dynamic": False}
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "channel", "dynamic": False}


def build_recipe(scheme: str, method: str, group_size: int | None, symmetric: bool = True,
                 options: dict | None = None) -> list:
    """The llm-compressor modifiers for (scheme, method). lm_head (and embeddings: not Linear) stay
    in the model dtype, as peftdeploy's RTN checkpoints do."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = ["lm_head"]
    if scheme == "fp8":
        if method != "rtn":
            raise ValueError(f"fp8 is data-free (FP8_DYNAMIC): method rtn, not {method}")
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    if scheme == "int8":
        o = {**INT8_GPTQ, **(options or {})}
        cfg = {"group_0": {"targets": ["Linear"], "weights": _weight_args(8, None),
                           "input_activations": {"num_bits": 8, "type": "int", "symmetric": bool(o["act_symmetric"]),
                                                 "strategy": "token", "dynamic": True}}}
        if method == "gptq":  # GPTQ on the weights; SmoothQuant first only when smoothing_strength > 0
            mods = []
            if o["smoothing_strength"]:
                from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

                mods.append(SmoothQuantModifier(smoothing_strength=float(o["smoothing_strength"]),
                                                mappings=o["smooth_mappings"]))
            return mods + [GPTQModifier(config_groups=cfg, ignore=ignore, dampening_frac=float(o["dampening_frac"]),
                                        block_size=int(o["block_size"]), actorder=o["actorder"])]
        raise ValueError(f"int8 (W8A8) with llm-compressor: method gptq, not {method}")
    bits = {"w4a16": 4, "w8a16": 8}[scheme]
    gs = group_size if scheme == "w4a16" else None
    # calibrated 4-bit: asymmetric (a zero point per group; llm-compressor's W4A16_ASYM), which vLLM's
    # CPU (cpu_gemm_wna16) and GPU (Marlin) wNa16 kernels take; measured on the demo: g32 sym/asym below
    cfg = {"group_0": {"targets": ["Linear"], "weights": _weight_args(bits, gs, symmetric and bits != 4)}}
    if method == "gptq":
        return [GPTQModifier(config_groups=cfg, ignore=ignore)]
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQ's scale search then the (symmetric, vLLM-CPU-loadable) weight quantization
        return [AWQModifier(ignore=ignore), QuantizationModifier(config_groups=cfg, ignore=ignore)]
    raise ValueError(f"{scheme} with llm-compressor: method gptq or awq, not {method}")


def calibration_dataset(tokenizer, cal: dict):
    """Non-overlapping windows of `seq_len` tokens of the calibration text, at most `samples`."""
    from datasets import Dataset

    text = Path(cal["text_file"]).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    L = int(cal["seq_len"])
    n = min(int(cal["samples"]), max(len(ids) // L, 1))
    rows = [ids[i * L:(i + 1) * L] for i in range(n)]
    rows = [r for r in rows if len(r) >= 16]
    if not rows:
        raise ValueError(f"the calibration text has {len(ids)} tokens: too short for one sample")
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}), \
        {"samples_used": len(rows), "tokens_used": sum(map(len, rows)), "text_tokens": len(ids)}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    threads = int(job.get("threads") or 0)
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    t0 = time.perf_counter()
    say("loading llm-compressor")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    from llmcompressor import oneshot

    src, out = Path(job["src"]), Path(job["out"])
    scheme, method, cal = job["scheme"], job["method"], job.get("calibration")
    say(f"loading {src}")
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    recipe = build_recipe(scheme, method, job.get("group_size"), bool(job.get("symmetric", True)), job.get("options"))
    kw: dict = {}
    stats: dict = {}
    if method in ("gptq", "awq"):
        ds, stats = calibration_dataset(tok, cal)
        kw = {"dataset": ds, "num_calibration_samples": stats["samples_used"], "max_seq_length": int(cal["seq_len"]),
              "shuffle_calibration_samples": False}
        say(f"{method} {scheme}: calibrating on {stats['samples_used']} samples x {cal['seq_len']} tokens")
    else:
        say(f"{method} {scheme}: data-free")
    oneshot(model=model, recipe=recipe, **kw)
    say(f"writing the compressed-tensors checkpoint to {out}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    for p in src.iterdir():
        if p.is_file() and p.name not in _COPY_SKIP and not p.name.endswith(_COPY_SKIP_SUFFIXES) \
                and not p.name.startswith(".") and not p.name.startswith("peftdeploy-"):
            shutil.copy2(p, out / p.name)
    from importlib.metadata import version

    res = {"seconds": round(time.perf_counter() - t0, 2), **stats,
           "tool": {"llmcompressor": version("llmcompressor"), "compressed-tensors": version("compressed-tensors"),
                    "transformers": version("transformers"), "torch": version("torch")}}
    print("peftdeploy-result: " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
