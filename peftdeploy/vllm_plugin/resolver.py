"""Recipe-aware LoRA resolver: vLLM asks it for an adapter by name on the first request for that name.

Two layers:

* `CatalogResolver` (no vLLM import): name validation, catalog lookup (the recipe's adapters by
  name, then ``policy.catalog`` sources in order), fetching (``sources.resolve_adapter_source``;
  remote adapters go through the size-bounded `AdapterCache`), sha256 verification and the same
  compatibility checks as ``plan`` (`compat.check_adapter`). It returns a `Resolution` or raises a
  `ResolveError` that carries the HTTP status the client should see.
* `make_vllm_resolver(core)`: the `vllm.lora.resolver.LoRAResolver` subclass registered with
  vLLM. It runs the blocking work in a thread, reads the server's real ``max_lora_rank`` and model
  from the calling `OpenAIServingModels`, and turns `ResolveError` into vLLM's own client-error
  exceptions, which vLLM's exception handlers send as 404 / 400 / 422 / 503 responses with our message.

Catalog sources (``policy.catalog``), tried in order for names not listed in ``adapters``:

* a local directory: ``<dir>/<name>/`` (holding adapter_config.json)
* a pattern with ``{name}``: ``hf://acme/{name}-lora``, ``s3://bucket/loras/{name}``, ``demo://adapters/{name}``
* ``hf://org`` (no repo part): same as ``hf://org/{name}``
* ``s3://bucket/prefix/``: same as ``s3://bucket/prefix/{name}``
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Finding, SourceError
from ..recipe.schema import ADAPTER_NAME_MAX, ADAPTER_NAME_PATTERN
from .cache import AdapterCache, materialize

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.loader import LoadedRecipe
    from ..recipe.schema import Recipe

logger = logging.getLogger("vllm.peftdeploy")

# The recipe's adapter-name rule (recipe/schema.py), so a name a recipe may not hold is never resolved.
NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
DEFAULT_MAX_LORA_RANK = 16  # vLLM's LoRAConfig default


# --------------------------------------------------------------------------------------------
# errors (each knows the HTTP status the client gets)
# --------------------------------------------------------------------------------------------
class ResolveError(Exception):
    status = 400
    code = "bad-request"

    def __init__(self, message: str, *, fix: str | None = None, code: str | None = None,
                 findings: tuple[Finding, ...] = ()):
        super().__init__(message)
        self.message = message
        self.fix = fix
        if code:
            self.code = code
        self.findings = findings

    def client_message(self) -> str:
        return self.message + (f" Fix: {self.fix}" if self.fix else "")


class AdapterNotFound(ResolveError):
    status = 404
    code = "adapter-not-found"


class InvalidAdapterName(AdapterNotFound):
    """Malformed names (path traversal, '/', uppercase, too long) are unknown names: 404."""

    code = "invalid-adapter-name"


class AdapterRefused(ResolveError):
    """Found, but refused: incompatible (plan's error findings), sha256 mismatch, pickle-only."""

    status = 422
    code = "adapter-incompatible"


class LoRANotEnabled(ResolveError):
    status = 400
    code = "lora-not-enabled"


class FetchFailed(ResolveError):
    """The adapter exists in the catalog but could not be fetched now (network, S3 outage)."""

    status = 503
    code = "adapter-fetch-failed"


class _NotHere(Exception):
    """A catalog source does not hold the name: try the next source."""


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str
    origin: str  # "adapters[i]" | "catalog[i]"
    revision: str | None = None
    sha256: str | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class Resolution:
    name: str
    path: Path
    source: str
    origin: str
    int_id: int
    rank: int
    cache_key: str | None  # set when the adapter lives in the plugin's cache (remote sources)
    warnings: tuple[Finding, ...] = ()
    seconds: float = 0.0


def stable_int_id(name: str) -> int:
    return (zlib.crc32(name.encode()) & 0x7FFFFFFF) or 1


def validate_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > ADAPTER_NAME_MAX or not NAME_RE.fullmatch(name) or ".." in name:
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:80]}..."
        raise InvalidAdapterName(
            f"The model `{shown}` does not exist: it is not a served model and not a valid adapter name "
            "(adapter names are lowercase letters, digits, '.', '_' and '-', start with a letter or digit, "
            "at most 128 characters, no '/' or '..').")
    return name


def _kind(source: str) -> str:
    from ..sources import source_kind

    return source_kind(source)


def _cache_key(entry: CatalogEntry) -> str:
    h = hashlib.sha256(f"{entry.source}\0{entry.revision or ''}\0{entry.sha256 or ''}".encode()).hexdigest()
    return f"{entry.name}-{h[:12]}"


_NOT_FOUND_MARKERS = ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError",
                      "is not in the hub cache", "is not cached", "404", "does not exist", "NoSuchKey",
                      "no adapter_config.json")


class CatalogResolver:
    """The recipe as a catalog of adapters (see the module docstring). Thread-safe."""

    def __init__(self, loaded: LoadedRecipe, *, cache: AdapterCache | None = None, model_path: str | None = None,
                 max_lora_rank: int | None = None, negative_ttl: float | None = None):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.base_dir = Path(loaded.path).parent if getattr(loaded, "path", None) else None
        self.cache = cache if cache is not None else AdapterCache()
        self.model_path = model_path
        self.max_lora_rank = max_lora_rank
        ttl = os.environ.get("PEFTDEPLOY_PLUGIN_NEGATIVE_TTL")
        self.negative_ttl = negative_ttl if negative_ttl is not None else float(ttl) if ttl else 10.0
        self._recipe_adapters = {a.name: (i, a) for i, a in enumerate(self.recipe.adapters)}
        self._model_infos: dict[str, Any] = {}
        self._model_lock = threading.Lock()
        self._refused: dict[str, tuple[float, ResolveError]] = {}
        self.stats = {"resolved": 0, "refused": 0, "not_found": 0}
        self.resolved_names: set[str] = set()  # counted under their own name by the traffic middleware

    # -- catalog -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._recipe_adapters)

    def describe(self) -> str:
        parts = [f"{len(self._recipe_adapters)} recipe adapter(s)"]
        if self.recipe.policy.catalog:
            parts.append("catalog sources " + ", ".join(self.recipe.policy.catalog))
        return "; ".join(parts)

    def _candidates(self, name: str) -> list[CatalogEntry]:
        out: list[CatalogEntry] = []
        if name in self._recipe_adapters:
            i, a = self._recipe_adapters[name]
            return [CatalogEntry(name, a.source, f"adapters[{i}]", a.revision, a.sha256, a.allow_pickle)]
        for i, src in enumerate(self.recipe.policy.catalog):
            origin = f"catalog[{i}]"
            if "{name}" in src:
                out.append(CatalogEntry(name, src.replace("{name}", name), origin))
                continue
            kind = _kind(src)
            if kind == "hf":
                body = src[len("hf://"):].strip("/")
                out.append(CatalogEntry(name, f"hf://{body}/{name}", origin))  # org -> repo; org/repo -> subdir
            elif kind in ("s3", "demo"):
                out.append(CatalogEntry(name, src.rstrip("/") + "/" + name, origin))
            elif kind == "local":
                raw = src[len("file://"):] if src.startswith("file://") else src
                d = Path(os.path.expanduser(raw))
                if not d.is_absolute() and self.base_dir is not None:
                    d = self.base_dir / d
                out.append(CatalogEntry(name, str(d / name), origin))
            else:
                logger.warning("peftdeploy: ignoring catalog source %r (unsupported scheme)", src)
        return out

    # -- the server's model --------------------------------------------------------------------
    def model_info(self, model_path: str | None = None):
        """ModelInfo of the served backbone (None when it cannot be inspected: shape checks are skipped)."""
        key = model_path or self.model_path or ""
        with self._model_lock:
            if key in self._model_infos:
                return self._model_infos[key]
            info = None
            from . import compat

            tried: list[str] = []
            if key and Path(key).is_dir():
                try:
                    info = compat.model_info(key)
                except Exception as e:  # noqa: BLE001
                    tried.append(f"{key}: {e}")
            if info is None and key and re.fullmatch(r"[\w.-]+/[\w.-]+", key):
                from ..sources import cached_snapshot

                snap = cached_snapshot(key, self.recipe.backbone.revision)
                if snap is not None:
                    try:
                        info = compat.model_info(snap[0])
                    except Exception as e:  # noqa: BLE001
                        tried.append(f"{snap[0]}: {e}")
            if info is None:
                try:
                    from ..inventory import inspect_model
                    from ..sources import BACKBONE_METADATA_PATTERNS, _resolve_one, hub_offline

                    src = _resolve_one(self.recipe.backbone.model, revision=self.recipe.backbone.revision,
                                       base_dir=self.base_dir, patterns=BACKBONE_METADATA_PATTERNS,
                                       offline=hub_offline(), progress=False, what="backbone", location=None)
                    if src.path is not None:
                        info = inspect_model(src)
                    else:
                        tried.append(f"{self.recipe.backbone.model}: {src.unavailable}")
                except Exception as e:  # noqa: BLE001
                    tried.append(f"{self.recipe.backbone.model}: {e}")
            if info is None:
                logger.warning("peftdeploy: cannot inspect the served backbone (%s); adapter shape checks are "
                               "skipped", "; ".join(tried) or "no model path")
            self._model_infos[key] = info
            return info

    # -- fetching --------------------------------------------------------------------------------
    def _fetch_local(self, entry: CatalogEntry) -> Path:
        from ..sources import resolve_adapter_source

        return resolve_adapter_source(entry.source, revision=entry.revision, sha256=entry.sha256,
                                      base_dir=self.base_dir, allow_pickle=entry.allow_pickle, name=entry.name)

    def _probe_remote(self, entry: CatalogEntry) -> None:
        """Raise _NotHere when a catalog source does not hold the adapter (cheap checks first)."""
        kind = _kind(entry.source)
        if kind == "s3":
            from ..sources import _S3_RE

            m = _S3_RE.match(entry.source)
            if not m:
                raise _NotHere()
            try:
                import fsspec

                fs = fsspec.filesystem("s3", skip_instance_cache=True)  # credentials are read from the environment now, not from an earlier instance
                ok = fs.exists(f"{m.group(1)}/{m.group(2).rstrip('/')}/adapter_config.json")
            except Exception as e:  # noqa: BLE001 - S3 unreachable: a fetch failure, not "unknown"
                raise FetchFailed(f"LoRA adapter `{entry.name}`: cannot reach {entry.source} ({type(e).__name__}: "
                                  f"{e})", fix="check the S3 endpoint and credentials; retry later") from e
            if not ok:
                raise _NotHere()
        elif kind == "hf":
            from ..sources import cached_snapshot, hub_offline, parse_hf

            if hub_offline():
                repo_id, _sub = parse_hf(entry.source)
                if cached_snapshot(repo_id, entry.revision) is None:
                    raise _NotHere()

    def _fetch_remote(self, entry: CatalogEntry) -> tuple[Path, str]:
        key = _cache_key(entry)
        from ..sources import _S3_RE
        from ..util import cache_root

        def fill(tmp: Path) -> None:
            staging = None
            if _kind(entry.source) == "s3":
                m = _S3_RE.match(entry.source)
                if m:
                    staging = cache_root() / "s3" / m.group(1) / m.group(2)
            try:
                p = self._fetch_local(entry)
                materialize(p, tmp)
            finally:
                # sources.py stages s3 downloads under <cache>/s3/: the bounded cache holds the only copy
                if staging is not None and staging.is_dir():
                    shutil.rmtree(staging, ignore_errors=True)

        path = self.cache.get_or_create(key, fill, meta={"name": entry.name, "source": entry.source,
                                                          "revision": entry.revision, "sha256": entry.sha256})
        return path, key

    def _fetch(self, entry: CatalogEntry, *, from_catalog: bool) -> tuple[Path, str | None]:
        kind = _kind(entry.source)
        try:
            if kind in ("hf", "s3"):
                if from_catalog:
                    self._probe_remote(entry)
                return self._fetch_remote(entry)
            if from_catalog and kind == "local" and not (Path(entry.source) / "adapter_config.json").is_file():
                raise _NotHere()
            return self._fetch_local(entry), None
        except (_NotHere, ResolveError):
            raise
        except SourceError as e:
            text = e.message
            if from_catalog and any(m in text for m in _NOT_FOUND_MARKERS):
                raise _NotHere() from e
            if "sha256" in text or "pickle" in text or "adapter_model" in text or "adapter_config" in text:
                raise AdapterRefused(f"LoRA adapter `{entry.name}` is refused: {text}.", fix=e.fix,
                                     code="adapter-source-refused") from e
            if "cannot download" in text or "cannot fetch" in text or "unreachable" in text:
                raise FetchFailed(f"LoRA adapter `{entry.name}` could not be fetched: {text}.", fix=e.fix) from e
            raise AdapterRefused(f"LoRA adapter `{entry.name}` cannot be loaded: {text}.", fix=e.fix,
                                 code="adapter-source-refused") from e
        except OSError as e:
            raise FetchFailed(f"LoRA adapter `{entry.name}` could not be fetched from {entry.source}: {e}",
                              fix="retry later; check the source") from e

    # -- the public call ---------------------------------------------------------------------
    def resolve(self, name: str, *, model_path: str | None = None, max_lora_rank: int | None = None,
                pin: bool = False) -> Resolution:
        t0 = time.perf_counter()
        validate_name(name)
        hit = self._refused.get(name)
        if hit is not None and time.monotonic() - hit[0] < self.negative_ttl:
            raise hit[1]
        candidates = self._candidates(name)
        entry = path = key = None
        for cand in candidates:
            try:
                path, key = self._fetch(cand, from_catalog=cand.origin.startswith("catalog"))
            except _NotHere:
                continue
            except AdapterRefused as e:
                self._remember(name, e)
                raise
            entry = cand
            break
        if entry is None or path is None:
            self.stats["not_found"] += 1
            known = self.names
            shown = ", ".join(known[:20]) + (f" (+{len(known) - 20} more)" if len(known) > 20 else "")
            where = f"; catalog sources searched: {', '.join(self.recipe.policy.catalog)}" \
                if self.recipe.policy.catalog else ""
            raise AdapterNotFound(
                f"The model `{name}` does not exist: it is not served and not in the catalog of recipe "
                f"'{self.recipe.name}' (adapters: {shown or 'none'}{where}).")
        rank_limit = max_lora_rank or self.max_lora_rank or _rank_from_environment(self.recipe)
        from . import compat

        try:
            info, findings = compat.check_adapter(
                name=name, path=path, source=entry.source, recipe=self.recipe, loaded=self.loaded,
                model=self.model_info(model_path), max_lora_rank=rank_limit, allow_pickle=entry.allow_pickle,
                sha256=entry.sha256)
        except SourceError as e:
            err = AdapterRefused(f"LoRA adapter `{name}` cannot be read: {e.message}.", fix=e.fix,
                                 code="adapter-unreadable")
            self._remember(name, err)
            raise err from e
        errs = compat.errors(findings)
        if errs:
            reasons = " ".join(f"[{f.code}] {f.message}." for f in errs)
            fixes = "; ".join(dict.fromkeys(f.fix for f in errs if f.fix))
            err = AdapterRefused(f"LoRA adapter `{name}` is incompatible with this server: {reasons}",
                                 fix=fixes or None, findings=tuple(errs), code=errs[0].code)
            self._remember(name, err)
            logger.warning("peftdeploy: refused LoRA adapter %r (%s): %s", name, entry.source, reasons)
            raise err
        warns = tuple(f for f in findings if f.severity.value == "warning")
        for w in warns:
            logger.info("peftdeploy: adapter %r: %s", name, w.message)
        if key is not None and pin:
            self.cache.pin(key)
        self.stats["resolved"] += 1
        self.resolved_names.add(name)
        dt = time.perf_counter() - t0
        logger.info("peftdeploy: resolved LoRA adapter %r from %s (%s, rank %d) in %.3f s", name, entry.source,
                    entry.origin, info.max_rank, dt)
        return Resolution(name=name, path=Path(path), source=entry.source, origin=entry.origin,
                          int_id=stable_int_id(name), rank=info.max_rank, cache_key=key, warnings=warns, seconds=dt)

    def _remember(self, name: str, err: ResolveError) -> None:
        self.stats["refused"] += 1
        if self.negative_ttl > 0:
            self._refused[name] = (time.monotonic(), err)


def _rank_from_environment(recipe: Recipe) -> int:
    """The server's --max-lora-rank when the engine cannot be asked: env, argv, recipe, vLLM default."""
    env = os.environ.get("PEFTDEPLOY_MAX_LORA_RANK")
    if env and env.isdigit():
        return int(env)
    argv = sys.argv
    for i, a in enumerate(argv):
        if a in ("--max-lora-rank", "--max_lora_rank") and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        for flag in ("--max-lora-rank=", "--max_lora_rank="):
            if a.startswith(flag) and a[len(flag):].isdigit():
                return int(a[len(flag):])
    mlr = recipe.serving.max_lora_rank
    return int(mlr) if isinstance(mlr, int) else DEFAULT_MAX_LORA_RANK


# --------------------------------------------------------------------------------------------
# the vLLM side
# --------------------------------------------------------------------------------------------
def _serving_models_from_stack(max_depth: int = 6) -> Any:
    """The `OpenAIServingModels` that awaits us (vLLM passes only the base model name)."""
    try:
        f = sys._getframe(2)
    except ValueError:
        return None
    for _ in range(max_depth):
        if f is None:
            return None
        owner = f.f_locals.get("self")
        if owner is not None and hasattr(owner, "lora_requests") and hasattr(owner, "engine_client"):
            return owner
        f = f.f_back
    return None


def http_error(msg: str, status: int) -> Exception:
    """An exception vLLM's handlers answer with `status`: ``vllm.exceptions.GracefulHTTPError`` where it exists
    (0.32), else Starlette's HTTPException (vLLM 0.26 has no GracefulHTTPError; its http_exception_handler
    answers HTTPException with its status). Feature-detected, never imported by name."""
    from http import HTTPStatus

    from vllm import exceptions as vx

    graceful = getattr(vx, "GracefulHTTPError", None)
    if graceful is not None:
        return graceful(msg, HTTPStatus(status))
    from starlette.exceptions import HTTPException

    return HTTPException(status_code=int(status), detail=msg)


def to_vllm_exception(err: ResolveError) -> Exception:
    """The vLLM client-error exception that its HTTP exception handlers turn into ``err.status``."""
    from vllm import exceptions as vx

    msg = err.client_message()
    if err.status == 404:
        return vx.VLLMNotFoundError(msg)
    if err.status == 422:
        return vx.VLLMUnprocessableEntityError(msg)
    if err.status == 400:
        return vx.VLLMValidationError(msg)
    return http_error(msg, err.status)


def make_vllm_resolver(core: CatalogResolver, *, registered_name: str = "peftdeploy") -> Any:
    """The `LoRAResolver` instance registered with vLLM (imports vLLM)."""
    import asyncio
    from http import HTTPStatus

    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class PeftDeployLoRAResolver(LoRAResolver):
        """Resolves adapter names from a peftdeploy recipe (see peftdeploy.vllm_plugin.resolver)."""

        def __init__(self) -> None:
            self.core = core
            self.registered_name = registered_name

        def _others(self) -> bool:
            return any(n != self.registered_name for n in LoRAResolverRegistry.get_supported_resolvers())

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            owner = _serving_models_from_stack()
            model_path, rank = base_model_name, None
            if owner is not None:
                vcfg = getattr(getattr(owner, "engine_client", None), "vllm_config", None)
                if vcfg is not None:
                    lcfg = getattr(vcfg, "lora_config", None)
                    if lcfg is None:
                        raise to_vllm_exception(LoRANotEnabled(
                            f"LoRA adapter `{lora_name}` cannot be served: this vLLM server was started "
                            "without --enable-lora.", fix="restart it with --enable-lora --max-lora-rank N"))
                    rank = int(lcfg.max_lora_rank)
                mc = getattr(owner, "model_config", None)
                model_path = getattr(mc, "model", None) or base_model_name
            try:
                res = await asyncio.to_thread(self.core.resolve, lora_name, model_path=model_path,
                                              max_lora_rank=rank, pin=True)
            except AdapterNotFound as e:
                if self._others():  # let the other registered resolvers try
                    return None
                raise to_vllm_exception(e) from None
            except ResolveError as e:
                raise to_vllm_exception(e) from None
            except Exception as e:  # noqa: BLE001 - never a 500 / never a crashed server
                logger.exception("peftdeploy: unexpected error resolving LoRA adapter %r", lora_name)
                raise http_error(f"LoRA adapter `{lora_name}` could not be resolved: {type(e).__name__}: {e}",
                                 HTTPStatus.SERVICE_UNAVAILABLE) from None
            return LoRARequest(lora_name=lora_name, lora_int_id=res.int_id, lora_path=str(res.path))

    return PeftDeployLoRAResolver()


__all__ = ["AdapterNotFound", "AdapterRefused", "CatalogEntry", "CatalogResolver", "FetchFailed",
           "InvalidAdapterName", "LoRANotEnabled", "http_error", "Resolution", "ResolveError", "make_vllm_resolver",
           "stable_int_id", "to_vllm_exception", "validate_name"]
