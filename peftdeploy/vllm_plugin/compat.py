"""The plan's compatibility checks, applied to one adapter that a running server is asked for.

`plan.findings` runs its checks over a whole recipe (`CheckContext` + `Inventory`). Here the same
functions (`ADAPTER_CHECKS`) run for a single adapter: the adapter is inspected with
`inspect.inspect_adapter`, the backbone is the model the server actually serves, and
`serving.max_lora_rank` is the server's real ``--max-lora-rank`` (not the recipe's ``auto``). An adapter
found through a catalog source (not listed in the recipe) is appended to a copy of the recipe so that
the checks that look it up by name (pickle, locations) work unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Finding, Location, Severity
from ..inventory import AdapterInfo, Inventory, ModelInfo, inspect_adapter, inspect_model
from ..plan.adapter_checks import ADAPTER_CHECKS
from ..plan.check_context import CheckContext
from ..recipe.schema import Adapter, Recipe
from ..sources import ResolvedSource

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.loader import LoadedRecipe


class _PluginLoaded:
    """Stands in for `LoadedRecipe` in a `CheckContext`: the recipe (possibly amended) + locations."""

    def __init__(self, recipe: Recipe, loaded: LoadedRecipe | None = None):
        self.recipe = recipe
        self._loaded = loaded
        self.path = getattr(loaded, "path", None)

    def location(self, *path: Any) -> Location | None:
        if self._loaded is None:
            return None
        try:
            return self._loaded.location(*path)
        except Exception:  # noqa: BLE001 - locations are decoration only
            return None


def model_info(path: str | Path) -> ModelInfo:
    """ModelInfo of a local backbone directory (config.json + safetensors headers)."""
    p = Path(path)
    return inspect_model(ResolvedSource(str(p), "local", p))


def check_adapter(*, name: str, path: Path, source: str, recipe: Recipe, model: ModelInfo | None,
                  max_lora_rank: int | None, loaded: LoadedRecipe | None = None, allow_pickle: bool = False,
                  sha256: str | None = None) -> tuple[AdapterInfo, list[Finding]]:
    """Inspect the adapter at ``path`` and run every adapter check of `plan` on it, as served LoRA."""
    info = inspect_adapter(name, Path(path), source=source, sha256=sha256)
    adapters = list(recipe.adapters)
    if name not in {a.name for a in adapters}:
        adapters.append(Adapter(name=name, source=source, allow_pickle=allow_pickle))
    update: dict[str, Any] = {"adapters": adapters}
    if max_lora_rank:
        update["serving"] = recipe.serving.model_copy(update={"max_lora_rank": int(max_lora_rank)})
    amended = recipe.model_copy(update=update)
    ctx = CheckContext(loaded=_PluginLoaded(amended, loaded), inventory=Inventory(model=model, adapters=(info,)),
                       mode="serve", served=frozenset({name}), merged=frozenset())
    out: list[Finding] = []
    for _code, fn in ADAPTER_CHECKS:
        out.extend(fn(ctx, info))
    return info, out


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == Severity.ERROR]


__all__ = ["check_adapter", "errors", "model_info"]
