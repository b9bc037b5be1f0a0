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

vLLM labels its request counters with the base model's served name only, so from vLLM's own series
"per adapter" means which adapters have requests running / waiting (vLLM does not export per-adapter
counts). Deployments started by `up` also export peftdeploy's own counter (vLLM API-server middleware
`peftdeploy.vllm_plugin.traffic`):

* ``peftdeploy_requests_total`` (label ``model``: a served model name, or ``other`` for any other
  name) — successful requests to the OpenAI inference routes per model name: `requests_by_model`
  and `observed_shares` (None when the series is absent: a server started without the middleware).

Parsed with prometheus_client (installed with vLLM); nothing else.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

__all__ = ["Sample", "parse_prometheus", "Snapshot", "snapshot", "fetch_metrics", "requests_by_model",
           "shares", "traffic_from_requests", "REQUESTS_METRIC", "OTHER_MODEL"]

REQUESTS_METRIC = "peftdeploy_requests_total"  # peftdeploy.vllm_plugin.traffic
OTHER_MODEL = "__other__"  # its label value for names the deployment does not serve

@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition, read by `prometheus_client.parser` (a dependency of
    every vLLM install). A malformed line is skipped, not fatal: the rest of the page is read."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return _samples(text_string_to_metric_families(text))
    except ValueError:  # one bad line makes the parser give up on the page: read it line by line
        out: list[Sample] = []
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    out += _samples(text_string_to_metric_families(line + "\n"))
                except ValueError:
                    continue
        return out


def _samples(families: Iterable[Any]) -> list[Sample]:
    return [Sample(s.name, dict(s.labels), float(s.value)) for fam in families for s in fam.samples]


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
    # peftdeploy_requests_total per model label (served names and "other"); None: not exported
    requests_by_model: dict[str, float] | None = None
    # each label's share of requests_by_model (sums to 1); None: not exported, or no request counted yet
    observed_shares: dict[str, float] | None = None
    per_adapter: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sum(samples: Iterable[Sample], name: str) -> float | None:
    vals = [s.value for s in samples if s.name == name]
    return sum(vals) if vals else None


def requests_by_model(samples: Iterable[Sample]) -> dict[str, float] | None:
    """``peftdeploy_requests_total`` per ``model`` label (summed over any other labels, e.g. several
    API-server processes); None when the metric is not in the samples."""
    out: dict[str, float] | None = None
    for s in samples:
        if s.name == REQUESTS_METRIC and "model" in s.labels and math.isfinite(s.value):
            out = {} if out is None else out
            out[s.labels["model"]] = out.get(s.labels["model"], 0.0) + s.value
    return out


def shares(counts: dict[str, float] | None) -> dict[str, float] | None:
    """Each key's fraction of the total (None when there is nothing counted)."""
    if not counts:
        return None
    total = sum(counts.values())
    if total <= 0:
        return None
    return {k: v / total for k, v in counts.items()}


def snapshot(text: str, adapters: Iterable[str] = ()) -> Snapshot:
    """Figures from a `/metrics` text; `adapters` are the names that get a `per_adapter` row."""
    samples = parse_prometheus(text)
    snap = Snapshot(
        running=_sum(samples, "vllm:num_requests_running"),
        waiting=_sum(samples, "vllm:num_requests_waiting"),
        requests_finished=_sum(samples, "vllm:request_success_total"),
        prompt_tokens=_sum(samples, "vllm:prompt_tokens_total"),
        generation_tokens=_sum(samples, "vllm:generation_tokens_total"),
        requests_by_model=requests_by_model(samples),
    )
    snap.observed_shares = shares(snap.requests_by_model)
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
            "requests": None if snap.requests_by_model is None else snap.requests_by_model.get(name, 0.0),
            "share": None if snap.observed_shares is None else snap.observed_shares.get(name, 0.0),
        }
    return snap


def fetch_metrics(base_url: str, *, timeout: float = 3.0, api_key: str | None = None) -> str:
    """GET <base_url>/metrics (text)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout, headers=headers)
    r.raise_for_status()
    return r.text


def traffic_from_requests(counts: dict[str, float], *, recipe_name: str, served_model_name: str, mode: str,
                          merge_adapters: Iterable[str] = (), adapter_names: Iterable[str] = ()
                          ) -> tuple[dict[str, float], float, dict[str, float]]:
    """Observed request counts per served name -> `policy.traffic` shares (adapter names and "base").

    Returns (shares, requests attributed, counts left out). The served names map to traffic keys as
    the deployment serves them: the recipe's name is the bare backbone ("base": the base model in
    serve mode, its exact delta in hybrid mode) except in merge mode, where the served model *is*
    the merged adapter (attributed to it when exactly one was merged; a merge of several cannot be
    split, so raises ValueError); adapter names are themselves. "other" and names that are not
    adapters of the recipe are left out.
    """
    adapters = set(adapter_names)
    merged = list(merge_adapters)
    by_key: dict[str, float] = {}
    left_out: dict[str, float] = {}
    for name, n in counts.items():
        if mode == "merge" and name == served_model_name:
            if len(merged) != 1:
                if n > 0:
                    raise ValueError(f"the running deployment serves one model merged from "
                                     f"{', '.join(merged) or 'its adapters'}: its {n:g} requests cannot be "
                                     f"attributed to one adapter")
                continue
            key = merged[0]
        elif name == recipe_name:
            key = "base"
        elif name in adapters:
            key = name
        else:
            if n > 0:
                left_out[name] = left_out.get(name, 0.0) + n
            continue
        if key != "base" and key not in adapters:
            if n > 0:
                left_out[name] = left_out.get(name, 0.0) + n
            continue
        by_key[key] = by_key.get(key, 0.0) + n
    total = sum(by_key.values())
    out = {k: (v / total if total > 0 else 0.0) for k, v in by_key.items()}
    return out, total, left_out
