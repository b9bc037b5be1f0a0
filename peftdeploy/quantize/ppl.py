"""Perplexity of a model directory on the fixed text shipped in ``peftdeploy/data/eval/``, computed
by vLLM itself (``prompt_logprobs``), so what is measured is what is served: the quantized kernels,
the attention backend and the dtype vLLM runs.

Method: the text is tokenized once per model (the quantized model carries the merged model's
tokenizer files, so the ids are identical — the result records a digest of them to prove it),
then scored with the usual strided sliding window: windows of ``window`` tokens start every
``stride`` tokens; each window scores only the tokens not scored by the previous one (the first
window scores all but its first token), so every token after the first is scored exactly once,
with at least ``window - stride`` tokens of context (except in the first window).
Perplexity = exp(mean negative log-likelihood over scored tokens).

vLLM runs in a child process (``python -m peftdeploy.quantize.ppl``): it spawns workers, needs
a ``__main__`` guard and must not share a process with a caller that imported torch state; several
models are measured one after another in the same child to pay Python/vLLM start-up once.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

EVAL_TEXT_NAME = "lighthouse.txt"
EVAL_TEXT_SHA256 = "0a1fc719295d9cde35b299464aa21b026d44822bb14855fd62ad8eca755fd887"  # the eval text must not change (numbers are comparable only on the same bytes)
DEFAULT_WINDOW = 512
DEFAULT_STRIDE = 256


def eval_text_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "eval" / EVAL_TEXT_NAME


def eval_text() -> str:
    return eval_text_path().read_text(encoding="utf-8")


def eval_text_sha256() -> str:
    return hashlib.sha256(eval_text_path().read_bytes()).hexdigest()


def windows(n_tokens: int, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE
            ) -> list[tuple[int, int, int]]:
    """(begin, end, score_from): score positions [max(score_from, 1), end) of tokens[begin:end]."""
    if stride <= 0 or window <= 1 or stride >= window:
        raise ValueError("need 0 < stride < window (a window's first token has no context to be scored)")
    out = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        if end <= prev_end:
            break
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@dataclass
class PplResult:
    model: str
    ppl: float
    nll_mean: float
    tokens_scored: int
    n_tokens: int
    ids_sha256: str
    window: int
    stride: int
    dtype: str
    quantization: str | None
    text_sha256: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# in the child process (vLLM)
# ---------------------------------------------------------------------------------------------
def _measure_inprocess(model: str, *, dtype: str, window: int, stride: int, text: str,
                       quantization: str | None = None) -> PplResult:
    from vllm import LLM, SamplingParams  # ensure_vllm_cpu_compat() was called by main()

    t0 = time.perf_counter()
    kw = {"quantization": quantization} if quantization else {}
    llm = LLM(model=model, dtype=dtype, max_model_len=window + 16, enforce_eager=True, enable_prefix_caching=False,
              max_num_seqs=8, seed=0, **kw)
    try:
        cfg = llm.llm_engine.model_config
        quant = getattr(cfg, "quantization", None)
        run_dtype = str(getattr(cfg, "dtype", dtype)).removeprefix("torch.")
        tok = llm.get_tokenizer()
        ids = list(tok(text)["input_ids"])
        ws = windows(len(ids), window, stride)
        prompts = [{"prompt_token_ids": ids[b:e]} for b, e, _ in ws]
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                            use_tqdm=False)
        nll = 0.0
        n = 0
        for (b, e, s), o in zip(ws, outs):
            plp = o.prompt_logprobs
            for pos in range(s, e):
                lp = plp[pos - b]
                nll -= lp[ids[pos]].logprob
                n += 1
        assert n == len(ids) - 1, (n, len(ids))
        mean = nll / n
        return PplResult(model=str(model), ppl=math.exp(mean), nll_mean=mean, tokens_scored=n, n_tokens=len(ids),
                         ids_sha256=hashlib.sha256(json.dumps(ids).encode()).hexdigest(), window=window,
                         stride=stride, dtype=run_dtype, quantization=quant,
                         text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                         seconds=round(time.perf_counter() - t0, 2))
    finally:
        del llm
        gc.collect()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peftdeploy.quantize.ppl",
                                 description="perplexity of model dirs on peftdeploy's eval text, with vLLM")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    ap.add_argument("--stride", type=int, default=DEFAULT_STRIDE)
    ap.add_argument("--text-file", default=None)
    ap.add_argument("--quantization", action="append", default=None,
                    help="vLLM --quantization per model, in order ('' = from the checkpoint)")
    ap.add_argument("--json-out", default=None, help="write a JSON list of results here (default: stdout)")
    a = ap.parse_args(argv)
    from peftdeploy.vllm_compat import ensure_vllm_cpu_compat

    ensure_vllm_cpu_compat()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")  # as `up` serves 4-bit checkpoints (cpu_isa.W4A8_ENV)
    text = Path(a.text_file).read_text(encoding="utf-8") if a.text_file else eval_text()
    quants = list(a.quantization or [])
    quants += [""] * (len(a.models) - len(quants))
    res = []
    for m, q in zip(a.models, quants):
        r = _measure_inprocess(m, dtype=a.dtype, window=a.window, stride=a.stride, text=text, quantization=q or None)
        res.append(r.to_dict())
        if a.json_out:  # written after each model: partial results survive a later failure
            Path(a.json_out).write_text(json.dumps(res, indent=2) + "\n")
    if not a.json_out:
        print(json.dumps(res, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# caller side
# ---------------------------------------------------------------------------------------------
class PplError(RuntimeError):
    def __init__(self, msg: str, log_tail: str = ""):
        super().__init__(msg)
        self.log_tail = log_tail


def measure(models: Sequence[str | os.PathLike[str]], *, quantizations: Sequence[str | None] | None = None,
            dtype: str = "bfloat16", window: int = DEFAULT_WINDOW,
            stride: int = DEFAULT_STRIDE, timeout: float | None = 1800, log_path: str | os.PathLike[str] | None = None,
            env: dict[str, str] | None = None, text_file: str | os.PathLike[str] | None = None) -> list[PplResult]:
    """Perplexity of each model dir (one vLLM child process, models one after another).

    `quantizations`: per model, a vLLM ``--quantization`` (runtime schemes such as fp8) or None.
    `text_file`: score this UTF-8 text instead of the shipped eval text.
    `dtype`: the activation dtype every model runs in — the same for all so that the delta is the
    quantization's alone (bfloat16: what vLLM picks for quantized checkpoints on CPU).
    """
    with tempfile.TemporaryDirectory(prefix="peftdeploy-ppl-") as td:
        out = Path(td) / "ppl.json"
        log = Path(log_path) if log_path else Path(td) / "ppl.log"
        cmd = [sys.executable, "-m", "peftdeploy.quantize.ppl", *map(str, models), "--dtype", dtype,
               "--window", str(window), "--stride", str(stride), "--json-out", str(out)]
        if text_file:
            cmd += ["--text-file", str(Path(text_file).absolute())]
        for q in (quantizations or []):
            cmd += ["--quantization", q or ""]
        e = dict(os.environ)
        e.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        e.setdefault("VLLM_CPU_INT4_W4A8", "0")  # 4-bit checkpoints measured weight-only, as `up` serves them (cpu_isa)
        e.update(env or {})
        with open(log, "wb") as lf:
            try:
                p = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, timeout=timeout, env=e, cwd=td)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = -1
        done = json.loads(out.read_text()) if out.is_file() else []
        if rc != 0 or len(done) != len(models):
            tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
            raise PplError(f"perplexity run failed (exit {rc}) after {len(done)}/{len(models)} models", tail)
        return [PplResult(**d) for d in done]


if __name__ == "__main__":
    sys.exit(main())
