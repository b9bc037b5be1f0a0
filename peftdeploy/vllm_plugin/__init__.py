"""peftdeploy as a vLLM plugin: recipe-aware dynamic LoRA loading.

Installed with peftdeploy through the entry point ``vllm.general_plugins: peftdeploy =
peftdeploy.vllm_plugin:register``. vLLM calls `register()` in every process it starts (API server,
engine core, workers), so it is cheap and idempotent, and it never raises: a bad recipe is logged
as an error and nothing is registered (the server still starts and serves what it was told to).

What it does when ``PEFTDEPLOY_RECIPE`` names a recipe whose ``policy.dynamic_loading`` is true:

* registers a `LoRAResolver` (see `resolver.py`) under the name ``peftdeploy``: a request for an
  adapter name vLLM does not know yet is resolved from the recipe's catalog, fetched, verified and
  checked, then loaded by vLLM (vLLM calls resolvers only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``);
* selects peftdeploy's own LoRA kernels (`lora_kernels/`: segment GEMMs on the CPU, fused Triton
  kernels on CUDA) by pointing the platform's ``get_punica_wrapper`` at peftdeploy's punica wrapper,
  independent of any recipe; ``PEFTDEPLOY_LORA_KERNELS=vllm`` keeps vLLM's own, and so does an
  installed vLLM the kernels were not verified against (the log says which kernels are active);
* fixes vLLM's CPU LoRA kernels for base-model tokens batched with LoRA tokens (`cpu_fix.py`): needed
  by vLLM's kernels, and kept under peftdeploy's for the calls its wrapper hands to vLLM's ops;
* makes the engine's LoRA cache evictions visible at INFO level (``peftdeploy: engine evicted LoRA
  ...``): vLLM logs them only at DEBUG.

Environment: ``PEFTDEPLOY_RECIPE`` (recipe path), ``PEFTDEPLOY_ADAPTER_CACHE_DIR``,
``PEFTDEPLOY_ADAPTER_CACHE_BYTES`` (size bound of the downloaded-adapter cache),
``PEFTDEPLOY_MAX_LORA_RANK`` (only when the server's own value cannot be read),
``PEFTDEPLOY_PLUGIN_NEGATIVE_TTL`` (seconds a refusal is remembered, default 10),
``PEFTDEPLOY_PLUGIN_LOG_EVICTIONS=0`` (turn the eviction log off), ``PEFTDEPLOY_LORA_KERNELS``
(``peftdeploy``, the default, or ``vllm``).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Any

logger = logging.getLogger("vllm.peftdeploy")

RESOLVER_NAME = "peftdeploy"
_lock = threading.Lock()
_state: dict[str, Any] = {"registered": False, "resolver": None, "core": None, "eviction_log": False}


def _vllm_logger() -> logging.Logger:
    """Log through vLLM's configured "vllm" logger tree so messages land in the server log."""
    return logging.getLogger("vllm.peftdeploy")


def register() -> None:
    """vLLM general-plugin entry point. Idempotent; never raises."""
    try:
        with _lock:
            _register()
    except Exception:  # noqa: BLE001 - a plugin must never take vLLM down
        _vllm_logger().exception("peftdeploy: the vLLM plugin failed to register; dynamic LoRA loading "
                                 "from the recipe is off (the server itself is unaffected)")


def _load(path: str) -> Any:
    from ..errors import PeftDeployError
    from ..recipe import load_recipe

    try:
        return load_recipe(path)
    except PeftDeployError as first:
        # Secrets such as serving.api_key are irrelevant here: retry with unset ${VAR}s read as "".
        class _Lenient(dict):
            def __contains__(self, k: object) -> bool:
                return True

            def __missing__(self, k: str) -> str:
                return ""

            def get(self, k: str, default: Any = None) -> Any:  # type: ignore[override]
                return dict.get(self, k, "")

        try:
            return load_recipe(path, env=_Lenient(os.environ))
        except PeftDeployError:
            raise first from None


def _register() -> None:
    log = _vllm_logger()
    if _state["registered"]:
        return
    from . import cpu_fix

    cpu_fix.apply()  # independent of any recipe: base requests batched with LoRA ones on CPU
    from .lora_kernels import install as install_lora_kernels

    install_lora_kernels()  # peftdeploy's punica wrapper (PEFTDEPLOY_LORA_KERNELS); never raises
    path = os.environ.get("PEFTDEPLOY_RECIPE", "").strip()
    if not path:
        log.debug("peftdeploy: PEFTDEPLOY_RECIPE is not set; the LoRA resolver plugin stays off")
        return
    _state["registered"] = True  # from here on, one attempt per process
    if os.environ.get("PEFTDEPLOY_PLUGIN_LOG_EVICTIONS", "1") not in ("0", "false", "False"):
        install_eviction_log()
    from ..errors import PeftDeployError

    try:
        loaded = _load(path)
    except PeftDeployError as e:
        log.error("peftdeploy: cannot load PEFTDEPLOY_RECIPE=%s; no adapters will be resolved on demand.\n%s",
                  path, e.render())
        return
    except OSError as e:
        log.error("peftdeploy: cannot read PEFTDEPLOY_RECIPE=%s (%s); no adapters will be resolved on demand",
                  path, e)
        return
    r = loaded.recipe
    if not r.policy.dynamic_loading:
        log.info("peftdeploy: recipe %s has policy.dynamic_loading: false; the LoRA resolver is not registered",
                 r.name)
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    from .cache import AdapterCache, default_cache_dir, default_max_bytes
    from .resolver import CatalogResolver, make_vllm_resolver

    cache = AdapterCache(default_cache_dir(), default_max_bytes())
    core = CatalogResolver(loaded, cache=cache)
    resolver = make_vllm_resolver(core, registered_name=RESOLVER_NAME)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
    atexit.register(cache.unpin_all)
    _state.update(resolver=resolver, core=core)
    allow = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true")
    log.debug("peftdeploy: LoRA resolver registered in pid %d", os.getpid())
    if _is_api_process():
        log.info("peftdeploy: LoRA resolver registered for recipe %s (%s); adapter cache %s (bound %s)",
                 r.name, core.describe(), cache.root,
                 f"{cache.max_bytes} bytes" if cache.max_bytes else "none")
        if not allow:
            log.warning("peftdeploy: VLLM_ALLOW_RUNTIME_LORA_UPDATING is not true, so vLLM will not ask the "
                        "peftdeploy resolver for unknown adapter names; export "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to enable dynamic loading")


def _is_api_process() -> bool:
    import multiprocessing

    return multiprocessing.parent_process() is None


# --------------------------------------------------------------------------------------------
# engine LoRA-cache evictions, made visible
# --------------------------------------------------------------------------------------------
def _eviction_kind(frames: list[tuple[str, str]]) -> str | None:
    """Which eviction a "Removing adapter int id" record is, from the call chain that logged it (innermost
    first: (function name, the deactivate_fn name of the AdapterLRUCache whose `_on_remove` it is, else "")).

    "cpu": the CPU cache (deactivate_fn ``deactivate_adapter``) made room; "gpu": the active slots
    (``_deactivate_adapter``) did. None for removals that are not evictions: vLLM clearing its warm-up dummy
    adapters or resetting (``remove_all_adapters``: max_loras of each, twice, at every start), an explicit
    unload (``remove_adapter``), and a slot freed because its adapter left the CPU cache (counted there)."""
    names = [name for name, _ in frames]
    if "remove_all_adapters" in names or "remove_adapter" in names:
        return None
    cache = next((fn for name, fn in frames if name == "_on_remove"), "")
    if cache == "deactivate_adapter":
        return "cpu"
    if cache == "_deactivate_adapter":
        return None if "deactivate_adapter" in names else "gpu"
    return None


class _EvictionLog(logging.Handler):
    """Turns vLLM's DEBUG "Removing adapter int id" records into one INFO line saying which cache."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts = {"cpu": 0, "gpu": 0}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if not msg.startswith("Removing adapter int id"):
                return
            # The CPU cache (_registered_adapters, deactivate_fn deactivate_adapter) or the active slots
            # (_active_adapters, deactivate_fn _deactivate_adapter), and why: read from the call chain.
            frames = []
            f = sys._getframe(0)
            for _ in range(20):
                f = f.f_back
                if f is None:
                    break
                fn = getattr(f.f_locals.get("self"), "deactivate_fn", None) if f.f_code.co_name == "_on_remove" else None
                frames.append((f.f_code.co_name, getattr(fn, "__name__", "")))
            which = _eviction_kind(frames)
            if which is None:
                return
            self.counts[which] += 1
            if which == "cpu":
                text = (f"peftdeploy: engine evicted LoRA int id {msg.rsplit(' ', 1)[-1]} from its CPU LoRA cache "
                        f"(max_cpu_loras full; {self.counts['cpu']} CPU evictions so far)")
            else:
                text = (f"peftdeploy: engine swapped LoRA int id {msg.rsplit(' ', 1)[-1]} out of its active "
                        f"slots (max_loras full; {self.counts['gpu']} slot evictions so far)")
            _vllm_logger().info(text)
        except Exception:  # noqa: BLE001 - logging must never break the engine
            pass


def install_eviction_log() -> None:
    if _state["eviction_log"]:
        return
    lg = logging.getLogger("vllm.lora.model_manager")
    if lg.getEffectiveLevel() > logging.DEBUG:
        lg.setLevel(logging.DEBUG)  # vLLM's handler keeps filtering DEBUG records out of the log
    lg.addHandler(_EvictionLog())
    _state["eviction_log"] = True


__all__ = ["RESOLVER_NAME", "install_eviction_log", "register"]
