"""The benchmark workload: which model each request targets, what it says, when it is sent.

Pure and seeded (standard library only, so it also runs on a bare GPU image): the same
:class:`WorkloadConfig` always gives the same list of :class:`RequestSpec`.

The shape follows the multi-LoRA serving literature (S-LoRA, Punica):

* **adapter popularity** — N adapters with Zipf(α) popularity: the adapter of rank *i* (0 = the
  hottest, in the order given) gets weight ``1 / (i + 1) ** α``; α = 0 is uniform, α = 1 the
  classic Zipf. A ``base_share`` of the requests goes to the base (or merged) model itself.
* **arrivals** — open loop: Poisson arrivals at ``rate`` requests/s (exponential inter-arrival
  times); or closed loop: ``concurrency`` requests in flight, the next one sent when one finishes.
  Both may be combined (Poisson arrivals, at most ``concurrency`` in flight), like
  ``vllm bench serve --request-rate R --max-concurrency C``.
* **lengths** — prompts from a shipped prompt set (``peftdeploy/data/prompts/mixed.jsonl``: 100
  varied prompts — short questions, instructions, long contexts, chat — each with an output
  length) or synthetic prompts of ``input_len`` words; the output length is fixed with
  ``output_len`` (the client sends ``ignore_eos`` so every request generates exactly that many
  tokens) or taken from the prompt set.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "BASE",
    "DEFAULT_PROMPTS",
    "Prompt",
    "RequestSpec",
    "Workload",
    "WorkloadConfig",
    "build_workload",
    "load_prompts",
    "model_shares",
    "synthetic_prompt",
    "zipf_weights",
]

BASE = "base"  # the adapter label of requests to the base / merged model
DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts" / "mixed.jsonl"

# Common English words that are one token each in most BPE vocabularies (with a leading space).
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal house point"
).split()


@dataclass(frozen=True)
class Prompt:
    text: str
    output_len: int | None = None
    id: str = ""
    kind: str = ""


@dataclass(frozen=True)
class WorkloadConfig:
    """Everything that determines a workload. ``adapters`` are served model names, hottest first."""

    adapters: tuple[str, ...] = ()
    base_model: str = BASE  # the served name of the base / merged model
    zipf_alpha: float = 1.0
    base_share: float = 0.0  # share of requests to the base model (0..1)
    num_requests: int = 64
    rate: float | None = None  # Poisson arrivals (requests/s); None = all at t=0 (closed loop)
    concurrency: int | None = None  # max in flight; None = unbounded (pure open loop)
    input_len: int | None = None  # synthetic prompts of this many words; None = prompt set
    output_len: int | None = 64  # fixed output tokens; None = per-prompt length from the set
    prompts_file: str | None = None  # JSONL with {"prompt": ..., "output_len": ...}; None = shipped set
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if not 0.0 <= self.base_share <= 1.0:
            raise ValueError("base_share must be between 0 and 1")
        if self.zipf_alpha < 0:
            raise ValueError("zipf_alpha must be >= 0")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0 (requests per second)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is None and self.concurrency is None:
            raise ValueError("give a rate (Poisson arrivals) or a concurrency (closed loop), or both")
        if self.input_len is not None and self.input_len < 1:
            raise ValueError("input_len must be >= 1")
        if self.output_len is not None and self.output_len < 1:
            raise ValueError("output_len must be >= 1")

    @property
    def load_label(self) -> str:
        parts = []
        if self.rate is not None:
            parts.append(f"rate={self.rate:g}/s")
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapters"] = list(self.adapters)
        return d


@dataclass(frozen=True)
class RequestSpec:
    index: int
    model: str  # the OpenAI `model` field (served adapter name, or the base model name)
    adapter: str  # adapter name, or BASE for base-model traffic
    prompt: str
    max_tokens: int
    arrival_s: float = 0.0  # send time relative to the start (0 for closed loop)
    prompt_id: str = ""


@dataclass(frozen=True)
class Workload:
    config: WorkloadConfig
    requests: tuple[RequestSpec, ...] = field(default_factory=tuple)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.requests:
            out[r.adapter] = out.get(r.adapter, 0) + 1
        return out

    @property
    def total_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)


# ------------------------------------------------------------------------------------- shares
def zipf_weights(n: int, alpha: float) -> list[float]:
    """Normalised Zipf(α) weights for ranks 0..n-1 (rank 0 the most popular)."""
    if n <= 0:
        return []
    w = [1.0 / (i + 1) ** alpha for i in range(n)]
    s = sum(w)
    return [x / s for x in w]


def model_shares(config: WorkloadConfig) -> dict[str, float]:
    """Expected share of requests per adapter label (BASE for the base model)."""
    shares: dict[str, float] = {}
    if config.base_share > 0 or not config.adapters:
        shares[BASE] = config.base_share if config.adapters else 1.0
    rest = 1.0 - shares.get(BASE, 0.0)
    for name, w in zip(config.adapters, zipf_weights(len(config.adapters), config.zipf_alpha)):
        shares[name] = rest * w
    return shares


# ------------------------------------------------------------------------------------ prompts
def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Prompts from a JSONL file (fields: prompt or text; optional output_len, id, kind)."""
    p = Path(path) if path else DEFAULT_PROMPTS
    out: list[Prompt] = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{p}:{n}: not a JSON object ({e})") from None
            if isinstance(rec, str):
                rec = {"prompt": rec}
            text = rec.get("prompt", rec.get("text"))
            if not isinstance(text, str) or not text:
                raise ValueError(f"{p}:{n}: needs a non-empty 'prompt' string")
            ol = rec.get("output_len")
            out.append(Prompt(text=text, output_len=int(ol) if ol else None,
                              id=str(rec.get("id", n)), kind=str(rec.get("kind", ""))))
    if not out:
        raise ValueError(f"{p}: no prompts")
    return out


def synthetic_prompt(rng: random.Random, n_words: int) -> str:
    """A prompt of exactly ``n_words`` common words (about one token each in BPE vocabularies)."""
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


# ---------------------------------------------------------------------------------- workload
def _labels(config: WorkloadConfig, rng: random.Random) -> list[str]:
    shares = model_shares(config)
    names = list(shares)
    weights = [shares[n] for n in names]
    return rng.choices(names, weights=weights, k=config.num_requests)


def _arrivals(config: WorkloadConfig, rng: random.Random) -> list[float]:
    if config.rate is None:
        return [0.0] * config.num_requests
    t, out = 0.0, []
    for _ in range(config.num_requests):
        out.append(t)
        t += rng.expovariate(config.rate)
    return out


def build_workload(config: WorkloadConfig) -> Workload:
    """The requests of a workload, deterministic given ``config`` (its seed included).

    Independent random streams are used for adapters, arrivals and prompts, so changing e.g. the
    rate does not change which adapter each request targets.
    """
    seed = config.seed
    r_adapter = random.Random(f"{seed}/adapter")
    r_arrival = random.Random(f"{seed}/arrival")
    r_prompt = random.Random(f"{seed}/prompt")
    labels = _labels(config, r_adapter)
    arrivals = _arrivals(config, r_arrival)
    prompts: Sequence[Prompt] | None = None
    if config.input_len is None:
        prompts = load_prompts(config.prompts_file)
        order = list(range(len(prompts)))
        r_prompt.shuffle(order)
    reqs = []
    for i in range(config.num_requests):
        label = labels[i]
        model = config.base_model if label == BASE else label
        if prompts is not None:
            pr = prompts[order[i % len(order)]]
            text, pid = pr.text, pr.id
            out_len = config.output_len or pr.output_len or 128
        else:
            text, pid = synthetic_prompt(r_prompt, config.input_len or 1), f"synthetic-{i}"
            out_len = config.output_len or 128
        reqs.append(RequestSpec(index=i, model=model, adapter=label, prompt=text, max_tokens=int(out_len),
                                arrival_s=arrivals[i], prompt_id=pid))
    return Workload(config=config, requests=tuple(reqs))


def expected_count_bound(n: int, p: float, z: float = 5.0) -> float:
    """A z-sigma bound on |count - n p| for a binomial count (used by tests and sanity checks)."""
    return z * math.sqrt(n * p * (1 - p)) + 1
