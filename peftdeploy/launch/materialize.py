"""Materialize a plan's MergeStep before `up` starts the server: exactly the paths the plan names.

    merge (full precision, peftdeploy.merge.merge_cached)            -> MergeStep.output_dir
    offline quantization of the merged weights (quantize_cached)     -> MergeStep.quantized_dir
    hybrid: delta adapters of every other adapter and the base       -> MergeStep.delta_dir/<name>

Every step is cached (content keys in completion markers, temp dir + atomic rename, file locks), so
a second `up` of the same recipe finds everything in place and prints "cache hit" per step. The
planned command (`peftdeploy plan`, `up --dry-run`) already names these directories; this module
checks that what it built is what the command serves (served model dir, delta adapter paths and
ranks) and refuses to start a server on anything else.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LaunchError
from ..util import COMPLETE_MARKER, dir_build, marker_key

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.spec import LaunchSpec
    from ..plan import Plan



def _same(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.abspath(os.fspath(a)) == os.path.abspath(os.fspath(b))


# ------------------------------------------------------------------------------ quantized checkpoint


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "link"
    except OSError:  # another file system, or links not allowed: copy
        shutil.copy2(src, dst)
        return "copy"


def install_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, key: str,
                       lock_timeout: float = -1) -> bool:
    """Make `dst` hold the checkpoint `src` (a complete quantize-cache entry with content key `key`).

    Files are hard-linked (copied across file systems) into ``<parent>/.tmp-<name>-<pid>/``, a marker
    with `key` is written last, and the directory is renamed to `dst`, under ``<parent>/.<name>.lock``.
    A `dst` that already has the marker of `key` is kept (returns True: a hit); one of another key is
    replaced. Returns False when it was (re)built.
    """
    src, final = Path(src), Path(dst).expanduser().absolute()
    if marker_key(final) == key:
        return True

    def timed_out(lock_path: Path) -> Exception:
        return LaunchError(f"timed out waiting for another `up` installing {final}",
                           fix=f"wait for it, or remove a stale {lock_path} if none is running")

    with dir_build(final, lock_timeout=lock_timeout, on_timeout=timed_out) as tmp:
        if marker_key(final) == key:
            return True
        tmp.mkdir()
        for root, dirs, files in os.walk(src):
            rel = Path(root).relative_to(src)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                if rel == Path(".") and f == COMPLETE_MARKER:
                    continue  # never a link to the cache's own marker: ours is written below
                _link_or_copy(Path(root) / f, tmp / rel / f)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(
            {"key": key, "source": str(src), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            + "\n")
    return False


# ---------------------------------------------------------------------------------------- pipeline
def materialize(plan: Plan, spec: LaunchSpec, *, quiet: bool = False,
                log: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Build what `spec.merge` asks for; returns (spec, info). `spec` is returned unchanged: the plan
    names the directories, and a mismatch with what was built is an error, not a silent rewrite."""
    from ..merge import AdapterInput, merge_cached
    from ..sources import resolve

    step = spec.merge
    r = plan.recipe
    say = (lambda m: None) if quiet or log is None else log
    info: dict[str, Any] = {}

    # -- the backbone to merge into, on local disk -------------------------------------------
    resolved = plan.resolved
    bb = resolved.merge_base or resolved.backbone
    if bb.kind == "hf" and (bb.path is None or not any(Path(bb.path).glob("*.safetensors"))):
        resolved = resolve(plan.loaded, fetch="full", progress=not quiet)
        bb = resolved.merge_base or resolved.backbone
    if bb.path is None:
        raise LaunchError(f"the backbone to merge into is not available locally ({bb.unavailable or bb.spec})",
                          fix="download it (unset HF_HUB_OFFLINE) or point backbone.model at a local directory")

    def adapter_path(name: str) -> str:
        try:
            ra = resolved.adapter(name)
        except KeyError:  # the plan names an adapter the recipe (as resolved) does not have
            known = ", ".join(a.name for a in resolved.adapters) or "none"
            raise LaunchError(f"adapter {name!r} is not in the recipe's adapters ({known})",
                              fix="name one of the recipe's adapters in policy.merge.adapters / policy.hybrid.hot") \
                from None
        if ra.source.path is None:
            raise LaunchError(f"adapter {name!r} is not available locally ({ra.source.unavailable})",
                              fix="check its source in the recipe")
        return str(ra.path)

    # -- 1. merge in full precision ----------------------------------------------------------------
    weights = step.weights or tuple(r.adapter(n).weight for n in step.adapters)
    adapters = [AdapterInput(n, adapter_path(n), weight=w) for n, w in zip(step.adapters, weights)]
    say(f"merge: {', '.join(step.adapters)} into {bb.spec} ...")
    res = merge_cached(bb.path, adapters, dtype=r.backbone.dtype, output=step.output_dir, progress=not quiet,
                       provenance={"recipe": r.name, "recipe_hash": spec.recipe_hash},
                       overwrite=r.policy.merge.output is None)  # plan-named cache dirs may be re-merged
    info.update(cache_hit=res.cache_hit, key=res.key, seconds=round(res.seconds, 3), path=str(res.path))
    say(f"merge: cache hit ({res.path})" if res.cache_hit else f"merge: done in {res.seconds:.1f} s ({res.path})")
    if not _same(res.path, step.output_dir):
        raise LaunchError(f"the merge was written to {res.path}, not to the planned {step.output_dir}",
                          fix="report this as a peftdeploy bug")

    # -- 2. quantize the merged weights (offline schemes) ------------------------------------------
    if step.quantize_scheme:
        try:
            from ..quantize.cache import quantize_cached_result
        except ImportError as e:
            raise LaunchError(f"quantization scheme {step.quantize_scheme!r} is produced by peftdeploy's quantize "
                              f"stage, which cannot be imported here ({e})",
                              fix="install the merge extra (torch) and compressed-tensors, or use "
                                  "quantization.scheme none / fp8") from None
        from ..quantize.calibration import load_calibration

        method = step.quantize_method or "rtn"
        cal = load_calibration(r.quantization.calibration) if method in ("gptq", "awq") else None
        say(f"quantize: {step.quantize_scheme} of the merged weights with {method}"
            + (f" (calibration {cal.dataset}, up to {cal.samples} x {cal.seq_len} tokens)" if cal else "") + " ...")
        t0 = time.perf_counter()
        gs = r.quantization.group_size
        q = quantize_cached_result(res.path, step.quantize_scheme, method=method, calibration=cal,
                                   group_size=128 if gs == "auto" else int(gs),
                                   progress=None if quiet else (lambda m: say(f"quantize: {m}")))
        hit = install_checkpoint(q.path, step.quantized_dir, key=q.key)
        dt = time.perf_counter() - t0
        info["quantize"] = {"scheme": q.scheme, "method": method, "cache_hit": q.cache_hit and hit, "key": q.key,
                            "cache_path": str(q.path), "path": step.quantized_dir, "seconds": round(dt, 3)}
        say(f"quantize: {'cache hit' if q.cache_hit and hit else f'done in {dt:.1f} s'} ({step.quantized_dir})")

    if not _same(spec.model, step.served_dir):
        raise LaunchError(f"the planned command serves {spec.model}, but the merge step produced {step.served_dir}",
                          fix="report this as a peftdeploy bug")

    # -- 3. hybrid: delta adapters against the merged backbone ---------------------------------
    if step.hot:
        from ..merge.delta import build_delta_cached

        hot = (step.hot, adapter_path(step.hot), float(weights[0]))
        others = [(a.name, adapter_path(a.name), 1.0) for a in r.adapters if a.name != step.hot]
        say(f"delta: adapters against the {step.hot}-merged backbone ...")
        d = build_delta_cached(hot, others, step.delta_dir, base_name=r.name,
                               progress=None if quiet else (lambda m: say(f"delta: {m}")))
        info["delta"] = {"cache_hit": d.cache_hit, "key": d.key, "path": str(d.path), "ranks": d.ranks,
                         "seconds": round(d.seconds, 3)}
        say(f"delta: cache hit ({d.path})" if d.cache_hit else f"delta: done in {d.seconds:.1f} s ({d.path})")
        _check_served_deltas(spec, d)
    return spec, info


def _check_served_deltas(spec: LaunchSpec, d: Any) -> None:
    """The command's --lora-modules are exactly the built deltas, and max_lora_rank covers them."""
    served = {a.name: a for a in spec.adapters}
    problems = []
    if set(served) != set(d.adapters):
        problems.append(f"the command serves {sorted(served)}, the delta build made {sorted(d.adapters)}")
    for name, a in served.items():
        if name in d.adapters and not _same(a.path, d.adapters[name]):
            problems.append(f"{name}: command path {a.path} != built {d.adapters[name]}")
        if name in d.ranks and a.rank != d.ranks[name]:
            problems.append(f"{name}: planned rank {a.rank} != built rank {d.ranks[name]}")
    mlr = dict(spec.args).get("--max-lora-rank")
    if mlr is not None and d.ranks and max(d.ranks.values()) > int(mlr):
        problems.append(f"max_lora_rank {mlr} < largest delta rank {max(d.ranks.values())}")
    if problems:
        raise LaunchError("the hybrid plan does not match the delta adapters that were built: " + "; ".join(problems),
                          fix="if serving.max_lora_rank is set in the recipe, raise it to cover r_i + r_hot; "
                              "otherwise report this as a peftdeploy bug")
