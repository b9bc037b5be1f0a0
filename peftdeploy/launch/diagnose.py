"""Turn the log of a vLLM server that died (or never became ready) into one readable paragraph.

Table-driven: each :class:`Rule` is a regular expression over the log text and a function that
writes the cause and the fix. The first rule that matches (in table order — most specific first)
wins; otherwise the generic fallback quotes the last error line. Lines that are noise on every
start (a vLLM plugin that failed to import, deprecation warnings) are ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["Diagnosis", "Rule", "RULES", "diagnose", "diagnose_file", "fatal_line", "root_error", "strip_prefix"]

# "(EngineCore pid=123) ERROR 11-28 13:42:52 [core.py:1510] " / "(APIServer pid=1) INFO 11-28 ... [x.py:1] "
_PREFIX_RE = re.compile(
    r"^(?:\((?:[A-Za-z_\-]+\d*(?:-\d+)?)\s+pid=\d+\)\s*)?"
    r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d\s+[\d:.]+\s+\[[^\]]*\]\s?)?"
)
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# lines that look like errors but are not the cause (plugins that failed to import, warnings)
_NOISE_RE = re.compile(
    r"Failed to load plugin|No module named 'peftdeploy\.vllm_plugin'|FutureWarning|DeprecationWarning|"
    r"UserWarning|Found ulimit of|failed to automatically increase|libtcmalloc|libiomp|"
    r"Triton is not installed|Triton is installed"
)


def strip_prefix(line: str) -> str:
    line = _ANSI_RE.sub("", line.rstrip("\n"))
    return _PREFIX_RE.sub("", line, count=1).strip()


@dataclass(frozen=True)
class Diagnosis:
    kind: str  # "oom" | "kv-cache" | "bad-argument" | "port-in-use" | "lora-load" | "model-not-found" | ...
    cause: str  # one paragraph
    fix: str | None = None
    line: str | None = None  # the log line it is based on

    def paragraph(self, log_path: str | None = None) -> str:
        text = self.cause.rstrip(".") + "."
        if self.fix:
            text += f" Fix: {self.fix.rstrip('.')}."
        if log_path:
            text += f" Full log: {log_path}"
        return text


@dataclass(frozen=True)
class Rule:
    kind: str
    pattern: re.Pattern[str]
    make: Callable[[re.Match[str]], tuple[str, str | None]]


def _rx(p: str) -> re.Pattern[str]:
    return re.compile(p, re.IGNORECASE | re.MULTILINE)


def _oom(m: re.Match[str]) -> tuple[str, str | None]:
    return ("vLLM ran out of memory while starting (" + m.group(0).strip()[:200] + ")",
            "lower serving.gpu_memory_utilization / VLLM_CPU_KVCACHE_SPACE, backbone.max_model_len, "
            "serving.max_num_seqs or serving.max_loras, or use a quantization scheme")


def _kv(m: re.Match[str]) -> tuple[str, str | None]:
    text = m.group(0)
    est = re.search(r"estimated maximum model length is (\d+)", text)
    need = re.search(r"max seq len \((\d+)\)", text)
    msg = "the KV cache is too small for one request of max_model_len"
    if need:
        msg += f" ({need.group(1)} tokens)"
    fix = "lower backbone.max_model_len"
    if est:
        fix += f" to at most {est.group(1)}"
    fix += ", or give the KV cache more memory (serving.gpu_memory_utilization; on CPU VLLM_CPU_KVCACHE_SPACE)"
    return msg, fix


def _kv_none(m: re.Match[str]) -> tuple[str, str | None]:
    return ("no memory is left for the KV cache after loading the weights",
            "raise serving.gpu_memory_utilization (on CPU: VLLM_CPU_KVCACHE_SPACE), or use a smaller/quantized model")


def _bad_arg(m: re.Match[str]) -> tuple[str, str | None]:
    return (f"vLLM rejected its command line: {m.group(1).strip()}",
            "remove or rename the flag in serving.extra_args (check `peftdeploy-vllm serve --help` for this "
            "vLLM version)")


def _bad_value(m: re.Match[str]) -> tuple[str, str | None]:
    return (f"vLLM rejected an argument value: {m.group(1).strip()}",
            "correct the value in the recipe (serving / serving.extra_args)")


def _port(m: re.Match[str]) -> tuple[str, str | None]:
    return ("the server's port is already in use (another server, or an earlier deployment still running)",
            "stop the other process (`peftdeploy status` / `peftdeploy down`), or pick another port with "
            "--port or serving.port")


def _lora_notfound(m: re.Match[str]) -> tuple[str, str | None]:
    name, path = m.group(1), m.group(2)
    return (f"LoRA adapter '{name}' could not be loaded: no adapter found at {path}",
            "check the adapter's source in the recipe (`peftdeploy plan` shows the resolved paths)")


def _lora_generic(m: re.Match[str]) -> tuple[str, str | None]:
    reason = m.group(0).strip()
    name = re.search(r"(?:lora|adapter)\s+'?([A-Za-z0-9._-]+)'?", reason, re.IGNORECASE)
    subject = f"LoRA adapter '{name.group(1)}'" if name else "a LoRA adapter"
    return (f"{subject} could not be loaded: {reason[:300]}",
            "check the adapter's rank against max_lora_rank, its target modules and base model "
            "(`peftdeploy plan` checks these)")


def _rank(m: re.Match[str]) -> tuple[str, str | None]:
    return (f"a LoRA adapter's rank is larger than --max-lora-rank: {m.group(0).strip()[:300]}",
            "leave serving.max_lora_rank on auto (the largest adapter rank), or raise it")


def _model_nf(m: re.Match[str]) -> tuple[str, str | None]:
    return (f"the model could not be found: {m.group(0).strip()[:300]}",
            "check backbone.model (a local directory with config.json, or hf://org/repo with network / "
            "HF cache access)")


def _engine_dead(m: re.Match[str]) -> tuple[str, str | None]:
    return ("the vLLM engine process died while starting (a worker exited without an error message — often "
            "killed by the kernel's out-of-memory killer)",
            "check free memory (`free -g`, `dmesg`), lower max_model_len / max_num_seqs / the KV-cache size")


_ENGINE_DIED_RE = _rx(r"Worker proc \S+ died unexpectedly.*|Engine core initialization failed.*")
RULES: list[Rule] = [
    Rule("port-in-use", _rx(r"(?:\[Errno 98\] )?(?:address already in use|error while attempting to bind)"), _port),
    Rule("bad-argument", _rx(r"error: (unrecognized arguments: .*)$"), _bad_arg),
    Rule("bad-argument", _rx(r"error: (argument .*)$"), _bad_value),
    Rule("kv-cache", _rx(r"To serve at least one request with the model's max seq len.*"), _kv),
    Rule("kv-cache", _rx(r"larger than the maximum number of tokens that can be stored in KV cache.*"), _kv),
    Rule("kv-cache", _rx(r"No available memory for the cache blocks.*"), _kv_none),
    Rule("oom", _rx(r"(?:torch\.)?(?:cuda\.)?OutOfMemoryError.*|CUDA out of memory.*|"
                    r"Cannot allocate memory.*|std::bad_alloc.*|MemoryError\b.*"), _oom),
    Rule("lora-load", _rx(r"Loading lora (\S+) failed: No adapter found for (\S+)"), _lora_notfound),
    Rule("lora-load", _rx(r"LoRA rank \d+ is greater than max_lora_rank \d+.*"), _rank),
    Rule("lora-load", _rx(r"^.*(?:Loading lora \S+ failed|LoRAAdapterNotFound|"
                          r"lora.*(?:not supported|unsupported|is unsupported LoRA weight)|"
                          r"While loading .*lora).*$"), _lora_generic),
    Rule("model-not-found", _rx(r"(?:Repo id must be in the form.*|is not a local folder and is not a valid "
                                r"model identifier.*|Invalid repository ID or local directory.*|"
                                r"No such file or directory: '[^']*config\.json'.*|"
                                r"RepositoryNotFoundError.*|LocalEntryNotFoundError.*|"
                                r"Can't load the configuration of .*)"), _model_nf),
    Rule("engine-died", _ENGINE_DIED_RE, _engine_dead),
]

_ERRORISH_RE = re.compile(r"(?:^\w*(?:Error|Exception)\b|\bERROR\b|\berror:|Traceback|Killed)")


def fatal_line(lines: list[str]) -> str | None:
    """The last line that looks like an error (exception message preferred), noise excluded."""
    best = None
    for raw in lines:
        if _NOISE_RE.search(raw):
            continue
        s = strip_prefix(raw)
        if not s:
            continue
        if re.match(r"^[A-Za-z_.]*(?:Error|Exception|Interrupt)\b", s) or re.match(r"^\w+: error:", s):
            best = s
        elif best is None and _ERRORISH_RE.search(raw) and not s.startswith(("Traceback", "File ", "^")):
            best = s
    return best


def _clean_text(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if not _NOISE_RE.search(ln)]


_EXC_RE = re.compile(r"^[A-Za-z_.]*(?:Error|Exception)\b:?\s*(.*)$")


def root_error(lines: list[str]) -> str | None:
    """The first exception message of the log that is not vLLM's own "the engine/worker died" wrapper: when a
    worker raises (a kernel's RuntimeError), the engine then reports "Worker proc ... died unexpectedly" and
    "Engine core initialization failed. See root cause above" — the root cause is the first one."""
    for raw in lines:
        s = strip_prefix(raw)
        m = _EXC_RE.match(s)
        if m and m.group(1) and not _ENGINE_DIED_RE.search(s) and "See root cause above" not in s:
            return s
    return None


def diagnose(text: str, *, exit_code: int | None = None) -> Diagnosis:
    lines = _clean_text(text)
    body = "\n".join(strip_prefix(ln) for ln in lines)
    for rule in RULES:
        m = rule.pattern.search(body)
        if m:
            root = root_error(lines) if rule.kind == "engine-died" else None
            if root is not None:
                return Diagnosis("engine-error", f"the vLLM engine failed while starting: {root[:400]}",
                                 "this is vLLM's own error (a kernel or model the engine cannot run with these "
                                 "settings): `peftdeploy plan` checks the recipe against this host; the full log "
                                 "has the stack", root)
            cause, fix = rule.make(m)
            return Diagnosis(rule.kind, cause, fix, m.group(0).strip())
    last = fatal_line(lines)
    if exit_code is not None and exit_code < 0:
        import signal

        try:
            sig = signal.Signals(-exit_code).name
        except ValueError:
            sig = f"signal {-exit_code}"
        if sig == "SIGKILL" and last is None:
            return Diagnosis("killed", "the vLLM server was killed (SIGKILL) — often the kernel's out-of-memory "
                             "killer", "check free memory and lower max_model_len / max_num_seqs / KV-cache size")
        cause = f"the vLLM server was stopped by {sig}"
        if last:
            cause += f"; last error: {last}"
        return Diagnosis("signal", cause, None, last)
    if last:
        return Diagnosis("error", f"vLLM failed: {last}", None, last)
    tail = [strip_prefix(ln) for ln in lines if strip_prefix(ln)][-1:]
    code = f" with exit code {exit_code}" if exit_code is not None else ""
    if tail:
        return Diagnosis("unknown", f"the vLLM server exited{code}; its last log line: {tail[0]}", None, tail[0])
    return Diagnosis("unknown", f"the vLLM server exited{code} without writing a log", None, None)


def diagnose_file(path: str | Path, *, exit_code: int | None = None, max_bytes: int = 2_000_000) -> Diagnosis:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    return diagnose(text, exit_code=exit_code)
