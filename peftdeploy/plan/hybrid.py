"""Planning for mode hybrid (no torch): which delta adapters the server will see, and where.

Served adapters are not scaled by their recipe `weight` (that is a merge-time blend), so in hybrid
mode H is merged with weight 1 and every delta is exact against plain multi-LoRA serving.
The hot adapter H is merged into the backbone; adapter i is served as a delta of rank r_i + r_H and
the bare backbone as a delta of rank r_H (peftdeploy/merge/delta.py builds them). Memory and
max_lora_rank are planned from these delta ranks, like any adapter.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..util import cache_root

if TYPE_CHECKING:  # pragma: no cover
    from ..inventory import Inventory
    from ..recipe.schema import Recipe


def delta_infos(recipe: Recipe, inventory: Inventory, hot: str) -> list[Any]:
    """AdapterInfo-shaped records of the served deltas: every non-hot adapter, then the bare backbone."""
    h = inventory.adapter(hot)
    out = []
    for a in inventory.adapters:
        if a.name == hot:
            continue
        targets = tuple(sorted(set(a.target_modules) | set(h.target_modules)))
        out.append(dataclasses.replace(a, max_rank=a.max_rank + h.max_rank, r=a.max_rank + h.max_rank,
                                       lora_alpha=float(a.max_rank + h.max_rank), use_rslora=False,
                                       target_modules=targets, rank_pattern={}, alpha_pattern={},
                                       bytes=a.bytes + h.bytes))
    out.append(dataclasses.replace(h, name=recipe.name, rank_pattern={}, alpha_pattern={}, r=h.max_rank,
                                   lora_alpha=float(h.max_rank), use_rslora=False))
    return out


def delta_dir(merge_key: str, recipe: Recipe, inventory: Inventory, hot: str) -> Path:
    """Content-addressed directory of the delta adapters (one subdirectory per served name)."""
    parts = {"merged": merge_key, "hot": hot, "base_name": recipe.name,
             "adapters": [{"name": a.name, "sha256": a.sha256} for a in inventory.adapters if a.name != hot]}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "hybrid" / key
