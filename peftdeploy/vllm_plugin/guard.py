"""The API key locks every route of the server, and vLLM's runtime adapter-management routes stay closed.

vLLM checks ``--api-key`` / ``VLLM_API_KEY`` only under ``/v1``, ``/v2``, ``/inference`` and ``/cohere``:
``/tokenize``, ``/invocations``, ``/scale_elastic_ep``, ``/metrics``, the SageMaker ``/adapters`` routes ...
answer anyone. And vLLM asks LoRA resolvers (peftdeploy's catalog) only with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, which also opens ``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``, ``POST /adapters`` and ``DELETE /adapters/{name}``: any local directory
loaded as an adapter, past the recipe, the catalog, sha256 and pickle checks.

`up` starts vLLM with ``--middleware peftdeploy.vllm_plugin.guard.GuardMiddleware`` (outermost, before
vLLM's own middleware). It

* refuses the runtime adapter-management routes (:data:`ADAPTER_ROUTES`) with 403, key or not: adapters
  come from the recipe and its catalog (``PEFTDEPLOY_ALLOW_ADAPTER_API=1`` keeps vLLM's behaviour);
* when ``VLLM_API_KEY`` is set (``serving.api_key``), answers 401 to every request without
  ``Authorization: Bearer <key>`` except ``GET /health`` (and ``/metrics`` with
  ``PEFTDEPLOY_METRICS_PUBLIC=1``), websockets included.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any, Awaitable, Callable

__all__ = ["ADAPTER_ROUTES", "OPEN_ROUTES", "GuardMiddleware", "is_adapter_route"]

OPEN_ROUTES = frozenset({"/health"})
ADAPTER_ROUTES = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters"})


def is_adapter_route(path: str) -> bool:
    return path in ADAPTER_ROUTES or path.startswith("/adapters/")


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes")


class GuardMiddleware:
    """Pure ASGI middleware (see the module docstring). Constructed by vLLM as ``GuardMiddleware(app)``."""

    def __init__(self, app: Any, api_key: str | None = None, environ: Any = None) -> None:
        env = os.environ if environ is None else environ
        self.app = app
        key = env.get("VLLM_API_KEY", "") if api_key is None else api_key
        self._key = hashlib.sha256(key.encode()).digest() if key else None
        self.allow_adapter_api = _truthy(env.get("PEFTDEPLOY_ALLOW_ADAPTER_API"))
        self.open = OPEN_ROUTES | ({"/metrics"} if _truthy(env.get("PEFTDEPLOY_METRICS_PUBLIC")) else set())

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for k, v in scope.get("headers") or ():
            if k.lower() == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._key)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope.get("type") not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").removeprefix(scope.get("root_path", "") or "") or "/"
        path = "/" + path.lstrip("/")
        if path != "/" and path.endswith("/"):
            path = path.rstrip("/")
        if self._key is not None and path not in self.open and not self._authorized(scope):
            return await _refuse(scope, send, 401, "Unauthorized: send the serving.api_key as "
                                 "'Authorization: Bearer <key>'")
        if is_adapter_route(path) and not self.allow_adapter_api:
            return await _refuse(scope, send, 403, "runtime adapter loading/unloading is disabled: adapters come "
                                 "from the recipe (adapters, policy.catalog); see peftdeploy docs/plugin.md")
        return await self.app(scope, receive, send)


async def _refuse(scope: dict[str, Any], send: Callable[[Any], Awaitable[None]], status: int, message: str) -> None:
    if scope["type"] == "websocket":  # closing before accept is an HTTP 403 to the client
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + ([(b"www-authenticate", b"Bearer")] if status == 401 else [])})
    await send({"type": "http.response.body", "body": body})
