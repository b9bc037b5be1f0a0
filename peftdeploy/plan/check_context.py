"""What every compatibility check receives (`CheckContext`) and how it reports (`_f` -> Finding)."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import TYPE_CHECKING, Any

from ..errors import Finding, Location, Severity
from ..inventory import AdapterInfo, Inventory, ModelInfo

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.loader import LoadedRecipe


@dataclass(frozen=True)
class CheckContext:
    loaded: LoadedRecipe
    inventory: Inventory
    mode: str  # "serve" | "merge" (auto already decided)
    served: frozenset[str]  # adapters vLLM serves as LoRA
    merged: frozenset[str]  # adapters folded into the backbone
    device: str = "cuda"
    # hybrid: the rank vLLM actually serves per adapter (r_i + r_hot), when it differs from the file's
    served_ranks: dict[str, int] = dc_field(default_factory=dict)
    local: bool = True  # the plan is for `up` on this machine (False: `render`, the cluster supplies host/secret)

    @property
    def recipe(self):
        return self.loaded.recipe

    @property
    def model(self) -> ModelInfo | None:
        return self.inventory.model

    def loc(self, *path: Any) -> Location | None:
        from ..recipe.loader import field_location

        return field_location(self.loaded, *path)

    def adapter_index(self, name: str) -> int:
        return [a.name for a in self.recipe.adapters].index(name)

    def aloc(self, a: AdapterInfo, field: str = "source") -> Location | None:
        return self.loc("adapters", self.adapter_index(a.name), field)


def _f(code: str, sev: Severity, msg: str, fix: str, subject: str | None, loc: Location | None,
       **data: Any) -> Finding:
    return Finding(code=code, severity=sev, message=msg, fix=fix, subject=subject, location=loc, data=data)
