"""How many LoRA slots (vLLM's max_loras) the traffic needs: distinct adapters in one batch. Pure, no numpy.

vLLM runs a decode batch only with every adapter of the batch in a GPU slot; when a batch needs more
adapters than ``max_loras``, requests wait (TTFT spikes) and slots are swapped. So the planner sizes
``max_loras`` for the number of *distinct* adapters among the ``B`` requests of one batch, ``B`` being
max_num_seqs (the most the engine batches), with the request shares it is told (``policy.traffic``,
or the shares ``plan --observed`` counted; uniform over the adapters when neither is given).

With per-request shares ``p_i`` (requests without an adapter — base traffic, a hybrid's hot adapter —
need no slot), adapter ``i`` is in a batch of ``B`` independent requests with probability
``q_i = 1 - (1 - p_i)**B``: the expected number of distinct adapters is exactly ``Σ q_i``. The margin is
the 99th percentile of the count, computed exactly (dynamic programme, deterministic) for independent
indicators with these marginals (a Poisson-binomial). The real indicators are negatively correlated
(requests taken by one adapter are not the other's), which makes the real count *less* spread, so this
percentile errs high: the margin is kept, never overstated by more than the correlation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.schema import Recipe

QUANTILE = 0.99


@dataclass(frozen=True)
class BatchSlots:
    batch: int  # requests per batch
    adapters: int  # adapters with a share > 0
    mean: float  # expected distinct adapters in one batch (exact)
    p99: int  # 99th percentile (errs high, see the module docstring)


def presence(shares: Iterable[float], batch: int) -> list[float]:
    """Per adapter: probability that a batch of `batch` requests holds at least one of its requests."""
    return [1.0 - (1.0 - min(max(p, 0.0), 1.0)) ** batch for p in shares]


def distinct_adapters(shares: Iterable[float], batch: int, quantile: float = QUANTILE) -> BatchSlots:
    """Distinct adapters in a batch of `batch` requests drawn with these per-request shares.

    `shares` are fractions of all requests (they may sum to less than 1: the rest needs no slot)."""
    ps = [p for p in shares if p > 0]
    qs = presence(ps, max(0, batch))
    dist = [1.0]  # dist[k] = P(k distinct adapters), independent indicators
    for q in qs:
        nxt = [0.0] * (len(dist) + 1)
        for k, v in enumerate(dist):
            nxt[k] += v * (1.0 - q)
            nxt[k + 1] += v * q
        dist = nxt
    acc, pk = 0.0, len(dist) - 1
    for k, v in enumerate(dist):
        acc += v
        if acc >= quantile - 1e-12:
            pk = k
            break
    # independent indicators can exceed what a batch can hold: never more than `batch` distinct adapters
    return BatchSlots(batch=batch, adapters=len(ps), mean=sum(qs), p99=min(pk, max(0, batch)))


def largest_batch_within(shares: list[float], slots: int, batch: int, quantile: float = QUANTILE) -> int:
    """The largest batch <= `batch` whose p99 of distinct adapters fits in `slots` (0 if none)."""
    lo, hi = 0, batch
    while lo < hi:  # the count grows with the batch: binary search
        mid = (lo + hi + 1) // 2
        if distinct_adapters(shares, mid, quantile).p99 <= slots:
            lo = mid
        else:
            hi = mid - 1
    return lo


def served_shares(recipe: Recipe, served_names: Iterable[str], mode: str) -> dict[str, float] | None:
    """Per served LoRA name, its share of all requests, from ``policy.traffic`` (None when the recipe gives
    none: the planner then takes every served adapter as equally likely). Requests for merged adapters
    need no slot; in hybrid mode the bare backbone is served as a delta named like the recipe, so the
    ``base`` share goes to that name."""
    from .policy import _shares

    if not recipe.policy.traffic:
        return None
    shares, base, _ = _shares(recipe)
    out = {}
    for n in served_names:
        out[n] = base if (mode == "hybrid" and n == recipe.name) else shares.get(n, 0.0)
    return out


def describe_shares(shares: dict[str, float], source: str | None) -> str:
    """A noun phrase for findings and reasons: where the shares come from and how skewed they are.
    `source`: "policy.traffic", "observed traffic", ...; None when no traffic was given (uniform)."""
    live = sorted(((v, k) for k, v in shares.items() if v > 0), key=lambda vk: (-vk[0], vk[1]))
    if source is None:
        return f"uniform traffic over {len(live)} adapter(s) (no policy.traffic)"
    if not live:
        return f"{source} (no served adapter has a share)"
    top_v, top_k = live[0]
    if len({round(v, 9) for v, _ in live}) == 1:
        return f"{source} (uniform over {len(live)} adapter(s))"
    return f"{source} ({len(live)} adapters with a share, top {top_k} {top_v:.0%})"


__all__ = ["BatchSlots", "QUANTILE", "describe_shares", "distinct_adapters", "largest_batch_within", "presence",
           "served_shares"]
