"""Resolve: turn the recipe's sources (local paths, demo://, hf://, s3://) into local directories.

`resolve(loaded)` -> `ResolvedRecipe` (frozen). Nothing here imports torch or vLLM; huggingface_hub
and fsspec/s3fs are imported lazily, only when a recipe uses hf:// or s3://.

Hub sources:
* ``fetch="metadata"`` downloads only what inspection reads for the backbone (config.json,
  tokenizer/generation files, the safetensors index); adapters are always fetched whole (they are
  small and their sha256 is checked).
* Offline (``offline=True`` or ``HF_HUB_OFFLINE=1``) reads the huggingface_hub cache directly
  (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``): ``refs/<revision>`` ->
  ``snapshots/<sha>/``. A backbone missing from the cache is *not* an exception: it is returned with
  ``path=None`` and ``unavailable`` set, so planning can report it as a finding. Adapters missing
  offline raise `SourceError` (there is nothing to plan for them).
* The token comes only from the environment (``HF_TOKEN``); it is never logged or stored.

`resolve_adapter_source()` is the reusable single-adapter resolver (the vLLM plugin uses it for
adapters named on first request).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import Location, SourceError
from .util import cache_root, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from .recipe import LoadedRecipe

Fetch = Literal["metadata", "full"]

# Files inspection reads from a backbone repo (fetch="metadata").
BACKBONE_METADATA_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors.index.json", "quantize_config.json",
    "quant_config.json", "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.tiktoken",
    "chat_template*", "preprocessor_config.json", "params.json",
]
BACKBONE_WEIGHT_PATTERNS = ["*.safetensors", "*.py"]
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                    "*.json", "*.txt", "*.model", "*.tiktoken", "README.md"]

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class ResolvedSource:
    """One source, resolved (or not) to a local directory."""

    spec: str  # as written in the recipe (after interpolation / path resolution)
    kind: str  # "local" | "demo" | "hf" | "s3"
    path: Path | None  # local directory; None when unavailable (offline miss)
    revision: str | None = None  # requested revision (hub)
    commit: str | None = None  # resolved commit sha (hub), when known
    repo_id: str | None = None  # hub repo id (hf://) or bucket/prefix (s3://)
    subdir: str | None = None
    unavailable: str | None = None  # why path is None (e.g. offline and not cached)
    # For remote backbones whose weights were not downloaded: tensor name -> (dtype, shape) read from
    # the hub's safetensors metadata API (None when not available; inspection then estimates).
    remote_tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "path": str(self.path) if self.path else None,
                "revision": self.revision, "commit": self.commit, "unavailable": self.unavailable}


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    index: int  # position in recipe.adapters
    source: ResolvedSource
    weights_file: str | None  # "adapter_model.safetensors" | "adapter_model.bin" | None
    sha256: str | None  # of the weights file (computed when the recipe pins one, or always for small files)

    @property
    def path(self) -> Path:
        assert self.source.path is not None
        return self.source.path


@dataclass(frozen=True)
class ResolvedRecipe:
    loaded: "LoadedRecipe"
    backbone: ResolvedSource
    merge_base: ResolvedSource | None
    adapters: tuple[ResolvedAdapter, ...]
    fetch: str = "metadata"
    offline: bool = False

    @property
    def recipe(self):
        return self.loaded.recipe

    def adapter(self, name: str) -> ResolvedAdapter:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
_TRUE = ("1", "true", "yes", "on")


def hub_offline(offline: bool | None = None) -> bool:
    """Offline for hub sources: an explicit flag, else HF_HUB_OFFLINE or PEFTDEPLOY_OFFLINE."""
    if offline is not None:
        return offline
    return (os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
            or os.environ.get("PEFTDEPLOY_OFFLINE", "").strip().lower() in _TRUE)


def object_store_offline(offline: bool | None = None) -> bool:
    """Offline for s3:// sources: an explicit flag, else PEFTDEPLOY_OFFLINE (HF_HUB_OFFLINE is the hub's own)."""
    if offline is not None:
        return offline
    return os.environ.get("PEFTDEPLOY_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


_HF_RE = re.compile(r"^hf://([^/\s]+)/([^/\s]+)(?:/(.+?))?/?$")
_S3_RE = re.compile(r"^s3://([^/\s]+)/?(.*?)/?$")


def parse_hf(spec: str) -> tuple[str, str | None]:
    m = _HF_RE.match(spec)
    if not m:
        raise SourceError(f"bad hub source {spec!r}", fix="write hf://org/repo or hf://org/repo/subdir")
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def source_kind(spec: str) -> str:
    if spec.startswith("hf://"):
        return "hf"
    if spec.startswith("s3://"):
        return "s3"
    if spec.startswith("demo://"):
        return "demo"
    if spec.startswith("file://"):
        return "local"
    if re.match(r"^[a-z][a-z0-9+.-]*://", spec):
        return "unknown"
    return "local"


_FULL_SHA = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA = re.compile(r"[0-9a-f]{7,39}")


def _expand_short_sha(repo_id: str, revision: str | None, repo_type: str = "model") -> str | None:
    """A short commit sha (7-39 hex digits) -> the one full sha of a cached revision that starts with it.

    Read with huggingface_hub's `scan_cache_dir`; None when the revision is not a short sha or no
    single cached commit matches (then the hub sees the revision as written: a branch or tag may look
    like hex)."""
    if not revision or not _SHORT_SHA.fullmatch(revision):
        return None
    from huggingface_hub import scan_cache_dir  # lazy: only for hf:// recipes

    cache = hub_cache_dir()
    if not cache.is_dir():
        return None
    try:
        info = scan_cache_dir(cache)
    except Exception:  # noqa: BLE001 - CacheNotFound, a corrupt entry: nothing cached to match
        return None
    hits = {rev.commit_hash for repo in info.repos if repo.repo_id == repo_id and repo.repo_type == repo_type
            for rev in repo.revisions if rev.commit_hash.startswith(revision)}
    return hits.pop() if len(hits) == 1 else None


def cached_snapshot(repo_id: str, revision: str | None, repo_type: str = "model",
                    patterns: list[str] | None = None) -> tuple[Path, str] | None:
    """The snapshot dir and commit of a repo revision in the hub cache, without any network access.

    huggingface_hub's own `snapshot_download(local_files_only=True)` (refs/<branch>, a full sha, and
    its check that a cached tree listing is complete); a short sha is expanded first."""
    from huggingface_hub import snapshot_download  # lazy: only for hf:// recipes

    rev = _expand_short_sha(repo_id, revision, repo_type) or revision or "main"
    try:
        path = snapshot_download(repo_id, revision=rev, repo_type=repo_type, allow_patterns=patterns,
                                 local_files_only=True, cache_dir=str(hub_cache_dir()))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError / IncompleteSnapshotError: not (fully) cached
        return None
    p = Path(path)
    return p, p.name


def _hub_snapshot(repo_id: str, revision: str | None, patterns: list[str] | None, offline: bool,
                  progress: bool) -> tuple[Path, str | None]:
    """Download (or find offline) a snapshot. Raises LookupError when offline and not cached."""
    if offline:
        found = cached_snapshot(repo_id, revision, patterns=patterns)
        if found is None:
            raise LookupError(f"{repo_id}@{revision or 'main'} is not in the hub cache ({hub_cache_dir()})")
        return found
    from huggingface_hub import snapshot_download  # lazy: only for hf:// recipes

    kw: dict[str, Any] = {}
    if not progress:
        kw["tqdm_class"] = None
    revision = _expand_short_sha(repo_id, revision) or revision
    path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=_hf_token(),
                             cache_dir=str(hub_cache_dir()), **kw)
    p = Path(path)
    return p, p.name if _FULL_SHA.fullmatch(p.name) else None


def hf_download_command(repo_id: str, revision: str | None = None, *files: str) -> str:
    """The huggingface_hub CLI command that fills the cache for a repo (`hf`; `huggingface-cli` is gone)."""
    rev = f" --revision {revision}" if revision and revision != "main" else ""
    return f"hf download {repo_id}{''.join(' ' + f for f in files)}{rev}"


def _remote_tensors(repo_id: str, revision: str | None) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """Tensor dtypes/shapes of a hub repo's safetensors, through the hub API (headers only)."""
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(repo_id, revision=revision, token=_hf_token())
    except Exception:  # noqa: BLE001 - no safetensors, gated, network: fall back to an estimate
        return None
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for fm in meta.files_metadata.values():
        for name, ti in fm.tensors.items():
            out[name] = (str(ti.dtype), tuple(int(x) for x in ti.shape))
    return out


def _s3_fetch(spec: str, offline: bool) -> Path:
    m = _S3_RE.match(spec)
    if not m:
        raise SourceError(f"bad s3 source {spec!r}", fix="write s3://bucket/prefix")
    bucket, prefix = m.group(1), m.group(2)
    local = cache_root() / "s3" / bucket / prefix
    if offline:
        if (local / "adapter_config.json").is_file() or (local / "config.json").is_file():
            return local
        raise LookupError(f"{spec} is not in the local cache ({local}) and offline mode is on")
    try:
        import fsspec  # lazy
    except ImportError as e:  # pragma: no cover
        raise SourceError(f"s3:// sources need fsspec and s3fs ({e})", fix="pip install 'peftdeploy[s3]'")
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)  # credentials are read from the environment now, not from an earlier instance
    except (ImportError, ValueError) as e:
        raise SourceError(f"s3:// sources need s3fs ({e})", fix="pip install 'peftdeploy[s3]'")
    local.mkdir(parents=True, exist_ok=True)
    remote = f"{bucket}/{prefix}".rstrip("/")
    try:
        fs.get(remote + "/", str(local) + "/", recursive=True)
    except Exception as e:  # noqa: BLE001
        if (local / "adapter_config.json").is_file() or (local / "config.json").is_file():
            return local  # use the cached copy
        raise SourceError(f"cannot download {spec}: {e}",
                          fix="check the bucket/prefix and your AWS credentials (AWS_* environment)")
    return local


def _resolve_one(spec: str, *, revision: str | None, base_dir: Path | None, patterns: list[str] | None,
                 offline: bool, progress: bool, what: str, location: Location | None,
                 s3_offline: bool | None = None) -> ResolvedSource:
    kind = source_kind(spec)
    if kind == "unknown":
        raise SourceError(f"unsupported source scheme in {spec!r}", location=location,
                          fix="use hf://org/repo, s3://bucket/prefix, demo://..., or a local path")
    if kind == "local":
        raw = spec[len("file://"):] if spec.startswith("file://") else spec
        p = Path(os.path.expanduser(raw))
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.exists():
            raise SourceError(f"{what} path {spec!r} does not exist", location=location,
                              fix="fix the path (relative paths are relative to the recipe file that "
                                  "wrote them), or use hf://org/repo")
        if not p.is_dir():
            raise SourceError(f"{what} path {spec!r} is a file; expected a directory", location=location,
                              fix="point at the directory that holds config.json / adapter_config.json")
        return ResolvedSource(spec, "local", p.resolve())
    if kind == "demo":
        try:
            from .demo import resolve_demo  # lazy: demo assets are optional
        except ImportError as e:
            raise SourceError(f"demo sources are not available in this installation ({e})", location=location,
                              fix="install peftdeploy with its demo assets, or use a local path")
        try:
            p = Path(resolve_demo(spec))
        except SourceError as e:
            raise SourceError(e.message, fix=e.fix, location=location or e.location)
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise SourceError(f"unknown demo source {spec!r} ({e})", location=location,
                              fix="use demo://smollm2-135m or demo://adapters/<name>")
        return ResolvedSource(spec, "demo", p)
    if kind == "hf":
        repo_id, subdir = parse_hf(spec)
        pats = patterns
        if subdir and pats is not None:
            pats = [f"{subdir}/{x}" for x in pats]
        try:
            snap, commit = _hub_snapshot(repo_id, revision, pats, offline, progress)
        except LookupError as e:
            return ResolvedSource(spec, "hf", None, revision=revision, repo_id=repo_id, subdir=subdir,
                                  unavailable=str(e))
        except Exception as e:  # noqa: BLE001 - hub errors (404, gated, network)
            name = type(e).__name__
            if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
                return ResolvedSource(spec, "hf", None, revision=revision, repo_id=repo_id, subdir=subdir,
                                      unavailable=f"{repo_id} is not cached and the hub is unreachable ({e})")
            fix = "check the repo id and revision"
            if name in ("GatedRepoError", "RepositoryNotFoundError") or "401" in str(e):
                fix = "check the repo id; for gated/private repos export HF_TOKEN (read access)"
            raise SourceError(f"cannot fetch {what} {spec}@{revision or 'main'}: {name}: {e}",
                              location=location, fix=fix)
        p = snap / subdir if subdir else snap
        return ResolvedSource(spec, "hf", p, revision=revision, commit=commit, repo_id=repo_id, subdir=subdir)
    # s3
    try:
        p = _s3_fetch(spec, offline if s3_offline is None else s3_offline)
    except LookupError as e:
        return ResolvedSource(spec, "s3", None, repo_id=spec[5:], unavailable=str(e))
    return ResolvedSource(spec, "s3", p, repo_id=spec[5:])


def adapter_weights_file(path: Path) -> str | None:
    for f in ADAPTER_WEIGHTS:
        if (path / f).is_file():
            return f
    return None


def _check_adapter_dir(src: ResolvedSource, *, name: str, sha256: str | None, allow_pickle: bool | None,
                       location: Location | None) -> tuple[str | None, str | None]:
    """Checks every adapter must pass (config present, sha256). Returns (weights_file, sha256)."""
    if src.path is None:
        dl = f"`{hf_download_command(src.repo_id, src.revision)}`" if src.kind == "hf" and src.repo_id \
            else "a download"
        raise SourceError(f"adapter {name!r}: {src.unavailable}", location=location,
                          fix=f"run once online (unset HF_HUB_OFFLINE) or pre-download it with {dl}")
    p = src.path
    if not p.is_dir():
        raise SourceError(f"adapter {name!r}: {p} is not a directory", location=location,
                          fix="point at the directory holding adapter_config.json")
    if not (p / "adapter_config.json").is_file():
        raise SourceError(f"adapter {name!r}: no adapter_config.json in {src.spec} ({p})", location=location,
                          fix="point at a PEFT adapter directory (saved with model.save_pretrained)")
    wf = adapter_weights_file(p)
    if wf is None:
        raise SourceError(f"adapter {name!r}: no adapter_model.safetensors in {src.spec}", location=location,
                          fix="the directory must hold adapter_model.safetensors (PEFT save_pretrained)")
    if wf == "adapter_model.bin" and allow_pickle is False:
        raise SourceError(
            f"adapter {name!r} ships only adapter_model.bin (a pickle, which can run code when loaded)",
            location=location,
            fix="convert it to safetensors (PeftModel.from_pretrained(...).save_pretrained(dir, "
                "safe_serialization=True)) or set allow_pickle: true on the adapter if you trust it")
    digest = None
    if sha256 is not None:
        digest = sha256_file(p / wf)
        if digest != sha256.lower():
            raise SourceError(
                f"adapter {name!r}: sha256 of {wf} is {digest}, but the recipe pins {sha256}",
                location=location,
                fix="the adapter changed (or the wrong revision was fetched): re-check it and update "
                    "sha256 in the recipe, or pin the revision that matches")
    return wf, digest


def resolve_adapter_source(source: str, *, revision: str | None = None, sha256: str | None = None,
                           base_dir: str | os.PathLike[str] | None = None, allow_pickle: bool = False,
                           offline: bool | None = None, name: str | None = None,
                           location: Location | None = None) -> Path:
    """Resolve one adapter source to a local PEFT adapter directory (downloaded whole when remote).

    Raises SourceError (missing, not an adapter, pickle-only without allow_pickle, sha256 mismatch).
    """
    src = _resolve_one(source, revision=revision, base_dir=Path(base_dir) if base_dir else None,
                       patterns=ADAPTER_PATTERNS, offline=hub_offline(offline), progress=False,
                       what="adapter", location=location, s3_offline=object_store_offline(offline))
    _check_adapter_dir(src, name=name or source, sha256=sha256, allow_pickle=allow_pickle, location=location)
    assert src.path is not None
    return src.path


def _loc(loaded: "LoadedRecipe", *path: Any) -> Location | None:
    from .recipe.loader import field_location

    return field_location(loaded, *path)


def resolve(loaded: "LoadedRecipe", *, fetch: Fetch = "metadata", offline: bool | None = None,
            progress: bool = True) -> ResolvedRecipe:
    """Resolve every source of a loaded recipe to local paths (see module docstring)."""
    r = loaded.recipe
    off = hub_offline(offline)
    base_dir = loaded.path.parent
    bb_patterns = None if fetch == "full" else BACKBONE_METADATA_PATTERNS
    backbone = _resolve_one(r.backbone.model, revision=r.backbone.revision, base_dir=base_dir,
                            patterns=bb_patterns, offline=off, progress=progress, what="backbone",
                            location=_loc(loaded, "backbone", "model"), s3_offline=object_store_offline(offline))
    if backbone.kind == "hf" and backbone.path is not None and fetch == "metadata" and not off:
        if not any(backbone.path.glob("*.safetensors")):
            rt = _remote_tensors(backbone.repo_id or "", r.backbone.revision)
            if rt is not None:
                backbone = ResolvedSource(**{**backbone.__dict__, "remote_tensors": rt})
    merge_base = None
    if r.backbone.merge_base:
        mb_fetch = None if fetch == "full" and r.policy.mode != "serve" else BACKBONE_METADATA_PATTERNS
        merge_base = _resolve_one(r.backbone.merge_base, revision=r.backbone.merge_base_revision,
                                  base_dir=base_dir, patterns=mb_fetch, offline=off, progress=progress,
                                  what="merge_base", location=_loc(loaded, "backbone", "merge_base"),
                                  s3_offline=object_store_offline(offline))
    adapters = []
    for i, a in enumerate(r.adapters):
        loc = _loc(loaded, "adapters", i, "source")
        src = _resolve_one(a.source, revision=a.revision, base_dir=base_dir, patterns=ADAPTER_PATTERNS,
                           offline=off, progress=progress, what=f"adapter {a.name!r}", location=loc,
                           s3_offline=object_store_offline(offline))
        # pickle-only adapters are reported by plan as a finding (allow_pickle=None: don't raise here)
        wf, digest = _check_adapter_dir(src, name=a.name, sha256=a.sha256, allow_pickle=None, location=loc)
        adapters.append(ResolvedAdapter(a.name, i, src, wf, digest))
    return ResolvedRecipe(loaded, backbone, merge_base, tuple(adapters), fetch=fetch, offline=off)


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


__all__ = [
    "ResolvedAdapter", "ResolvedRecipe", "ResolvedSource", "adapter_weights_file", "cached_snapshot",
    "hf_download_command", "hub_cache_dir",
    "hub_offline", "parse_hf", "resolve", "resolve_adapter_source", "source_kind",
]
