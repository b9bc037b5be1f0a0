"""Read a running vLLM server's Prometheus `/metrics` text into per-deployment / per-adapter figures.

Names are those of vLLM 0.32 (`vllm/v1/metrics/loggers.py`):

* ``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` — gauges, labels ``model_name``
  (the served model name of the base), ``engine``;
* ``vllm:kv_cache_usage_perc`` — gauge in [0, 1];
* ``vllm:lora_requests_info`` — a gauge whose *labels* carry the LoRA state: ``max_lora``,
  ``running_lora_adapters`` and ``waiting_lora_adapters`` (comma-joined adapter names). vLLM sets
  the series of the current label combination to the current time, so older combinations stay
  exported with older timestamps: the series with the largest value is the current state;
* ``vllm:request_success_total`` (labels ``finished_reason``), ``vllm:prompt_tokens_total``,
  ``vllm:generation_tokens_total`` — counters.

vLLM labels its request counters with the base model's served name only, so "per adapter" here
means which adapters have requests running / waiting (vLLM does not export per-adapter counts).

Pure text parsing, no dependencies.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

__all__ = ["Sample", "parse_prometheus", "Snapshot", "snapshot", "fetch_metrics"]

_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r"\s+(?P<value>[^\s]+)"
    r"(?:\s+(?P<ts>-?\d+))?\s*$"
)
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def _unescape(s: str) -> str:
    return s.replace(r"\\", "\x00").replace(r"\"", '"').replace(r"\n", "\n").replace("\x00", "\\")


def _parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL_RE.match(text, pos)
        if not m:
            break
        out[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return out


def _float(s: str) -> float:
    s = s.strip()
    if s in ("+Inf", "Inf"):
        return math.inf
    if s == "-Inf":
        return -math.inf
    if s == "NaN":
        return math.nan
    return float(s)


def parse_prometheus(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (comments / HELP / TYPE lines are skipped)."""
    out: list[Sample] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        try:
            value = _float(m.group("value"))
        except ValueError:
            continue
        out.append(Sample(m.group("name"), _parse_labels(m.group("labels") or ""), value))
    return out


def _split_names(s: str | None) -> list[str]:
    return [x for x in (s or "").split(",") if x]


@dataclass
class Snapshot:
    """What `peftdeploy status` shows for one deployment."""

    running: float | None = None  # requests running (all models)
    waiting: float | None = None
    kv_cache_usage: float | None = None  # 0..1
    max_loras: int | None = None
    running_adapters: list[str] = field(default_factory=list)  # adapters with requests running now
    waiting_adapters: list[str] = field(default_factory=list)
    requests_finished: float | None = None  # vllm:request_success_total summed over reasons
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    per_adapter: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sum(samples: Iterable[Sample], name: str) -> float | None:
    vals = [s.value for s in samples if s.name == name]
    return sum(vals) if vals else None


def snapshot(text: str, adapters: Iterable[str] = ()) -> Snapshot:
    """Figures from a `/metrics` text; `adapters` are the names that get a `per_adapter` row."""
    samples = parse_prometheus(text)
    snap = Snapshot(
        running=_sum(samples, "vllm:num_requests_running"),
        waiting=_sum(samples, "vllm:num_requests_waiting"),
        requests_finished=_sum(samples, "vllm:request_success_total"),
        prompt_tokens=_sum(samples, "vllm:prompt_tokens_total"),
        generation_tokens=_sum(samples, "vllm:generation_tokens_total"),
    )
    kv = [s.value for s in samples if s.name == "vllm:kv_cache_usage_perc"]
    if kv:
        snap.kv_cache_usage = max(kv)
    info = [s for s in samples if s.name == "vllm:lora_requests_info"]
    if info:
        cur = max(info, key=lambda s: s.value)  # value = time the combination was last seen
        try:
            snap.max_loras = int(float(cur.labels.get("max_lora", "")))
        except ValueError:
            snap.max_loras = None
        snap.running_adapters = _split_names(cur.labels.get("running_lora_adapters"))
        snap.waiting_adapters = _split_names(cur.labels.get("waiting_lora_adapters"))
    for name in adapters:
        snap.per_adapter[name] = {
            "running": name in snap.running_adapters,
            "waiting": name in snap.waiting_adapters,
        }
    return snap


def fetch_metrics(base_url: str, *, timeout: float = 3.0, api_key: str | None = None) -> str:
    """GET <base_url>/metrics (text)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout, headers=headers)
    r.raise_for_status()
    return r.text
