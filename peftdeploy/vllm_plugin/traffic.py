"""Requests per served model name, counted inside vLLM's API server: ``peftdeploy_requests_total{model=...}``.

vLLM 0.32 labels its own request counters with the base model's served name only, so it cannot say
how traffic splits over the adapters. This pure-ASGI middleware can: `up` starts vLLM with

    --middleware peftdeploy.vllm_plugin.traffic.TrafficMiddleware

(vLLM's ``--middleware`` takes an import path; a class is added with ``app.add_middleware(cls)``,
so it is constructed as ``TrafficMiddleware(app)`` and wraps the whole app, outside vLLM's own
middleware). For each POST to an OpenAI inference route (:data:`ROUTES`) it buffers the request body,
reads its JSON ``"model"``, hands the very same body messages to the app through a wrapped
``receive``, and when the response starts with a status < 400 increments the prometheus_client
counter ``peftdeploy_requests_total{model="<name>"}`` in the default registry — the registry vLLM's
``/metrics`` serves (in its multi-process mode, prometheus_client's files, which vLLM's collector
reads). Responses, streaming ones included, pass through untouched.

Label values are bounded: only the names this deployment serves (``PEFTDEPLOY_MODEL_NAMES``, comma
separated, the base / merged model's served name first — set by the planned launch command; without
it, the recipe named by ``PEFTDEPLOY_RECIPE``: its name and its adapters' names). A request without a
``model`` counts for the first name (vLLM serves the base model then); any other name, a body that is
not JSON or is larger than :data:`MAX_BODY_BYTES`, counts as ``model="other"``. The middleware never
raises: on any problem of its own the request passes through as if it were not there.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Awaitable, Callable, Iterable

from ..plan.spec import MODEL_NAMES_ENV  # pure data

__all__ = ["TrafficMiddleware", "ROUTES", "OTHER", "METRIC", "ENV_MODEL_NAMES", "MAX_BODY_BYTES",
           "model_names_from_env", "requests_counter"]

logger = logging.getLogger("vllm.peftdeploy")

ENV_MODEL_NAMES = MODEL_NAMES_ENV
METRIC = "peftdeploy_requests"  # exported as peftdeploy_requests_total
OTHER = "__other__"  # cannot be an adapter or recipe name (their patterns start with [a-z0-9])
MAX_BODY_BYTES = 8 << 20  # bodies up to this size are parsed; larger ones pass through (counted as "other")
# POST routes whose JSON body names the model (vLLM 0.32's OpenAI-compatible inference routes)
ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/invocations"})
# SageMaker's /invocations names the adapter in this header (vLLM routes the request to it)
ADAPTER_HEADER = b"x-amzn-sagemaker-adapter-identifier"
# Adapters the plugin's resolver loaded on demand (catalog) get their own label, up to this many.
MAX_DYNAMIC_LABELS = 1024
# Completions per request (n / best_of) above this are refused with 400: n=10000 held a CPU server for
# minutes. PEFTDEPLOY_MAX_N (plan sets it to serving.max_num_seqs) overrides it.
MAX_N_ENV = "PEFTDEPLOY_MAX_N"
DEFAULT_MAX_N = 16


def _resolved_names() -> Any:
    """Names the peftdeploy resolver of this process loaded on demand (empty without the plugin)."""
    from . import _state

    return getattr(_state.get("core"), "resolved_names", ())

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_counter: Any = None


def requests_counter() -> Any:
    """The process's ``peftdeploy_requests_total`` counter (created once in the default registry)."""
    global _counter
    if _counter is None:
        from prometheus_client import REGISTRY, Counter

        try:
            _counter = Counter(METRIC, "Requests to the OpenAI inference routes per served model name "
                               "(peftdeploy; unknown names are counted as model=\"other\")", ["model"])
        except ValueError:  # registered already (this module imported twice under another name)
            _counter = REGISTRY._names_to_collectors[METRIC]  # noqa: SLF001
    return _counter


def model_names_from_env(environ: Any = None) -> list[str]:
    """Served model names: ``PEFTDEPLOY_MODEL_NAMES``, else the recipe at ``PEFTDEPLOY_RECIPE``
    (its name, then its adapters' names), else none."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_MODEL_NAMES)
    if raw:
        return [n.strip() for n in raw.split(",") if n.strip()]
    path = env.get("PEFTDEPLOY_RECIPE")
    if path:
        try:
            from ..recipe import load_recipe

            r = load_recipe(path).recipe
            return [r.name, *(a.name for a in r.adapters)]
        except Exception as e:  # noqa: BLE001 - never take the server down
            logger.warning("peftdeploy: traffic counting cannot read the recipe %s (%s); every request is "
                           "counted as model=%r", path, e, OTHER)
    return []


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v
    return None


class TrafficMiddleware:
    """Pure ASGI middleware counting requests per served model name (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], model_names: Iterable[str] | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, counter: Any = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.names: list[str] = []
        self.counter = None
        try:
            names = list(model_names) if model_names is not None else model_names_from_env()
            self.names = list(dict.fromkeys(n for n in names if n))
            self.counter = counter if counter is not None else requests_counter()
            for n in [*self.names, OTHER]:  # every label value exists (at 0) from the start
                self.counter.labels(model=n)
        except Exception:  # noqa: BLE001
            logger.exception("peftdeploy: traffic counting is off (the server itself is unaffected)")
            self.counter = None
        self.known = frozenset(self.names)
        self.dynamic: set[str] = set()
        try:
            self.max_n = max(1, int(os.environ.get(MAX_N_ENV) or DEFAULT_MAX_N))
        except ValueError:
            self.max_n = DEFAULT_MAX_N

    def label(self, model: Any) -> str:
        """The label value a request body's ``model`` is counted under."""
        if model is None or model == "":
            return self.names[0] if self.names else OTHER
        if isinstance(model, str) and model in self.known:
            return model
        if isinstance(model, str) and (model in self.dynamic or (
                len(self.dynamic) < MAX_DYNAMIC_LABELS and model in _resolved_names())):
            self.dynamic.add(model)
            return model  # a catalog adapter the resolver loaded
        return OTHER

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.counter is None or scope.get("type") != "http" or scope.get("method") != "POST"
                or scope.get("path") not in ROUTES):
            await self.app(scope, receive, send)
            return
        label, n = OTHER, None
        buffered: list[Message] = []  # the messages read from the client, replayed to the app as they came
        try:
            label, n = await self._read_model(scope, receive, buffered)
        except Exception:  # noqa: BLE001 - whatever was received is still replayed below
            label = OTHER
        if n is not None and n > self.max_n:
            body = json.dumps({"error": {"message": f"n / best_of is {n}; this deployment allows at most "
                                         f"{self.max_n} completions per request", "type": "BadRequestError",
                                         "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        replay = list(buffered)

        async def receive_replayed() -> Message:
            if replay:
                return replay.pop(0)
            return await receive()

        counted = False

        async def send_counting(message: Message) -> None:
            nonlocal counted
            if not counted and message.get("type") == "http.response.start":
                counted = True
                try:
                    if int(message.get("status", 500)) < 400:
                        self.counter.labels(model=label).inc()
                except Exception:  # noqa: BLE001
                    pass
            await send(message)

        await self.app(scope, receive_replayed if buffered else receive, send_counting)

    async def _read_model(self, scope: Scope, receive: Receive, messages: list[Message]) -> tuple[str, int | None]:
        """The label of this request: reads the body (appending each message received to
        `messages`) up to max_body_bytes and parses its model.

        Stops reading (and labels "other") once the body is not JSON or exceeds the cap; the app
        then gets the messages read so far, followed by the rest from the client."""
        ctype = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype and ctype != b"application/json" and not ctype.endswith(b"+json"):
            return OTHER, None
        clen = _header(scope, b"content-length")
        if clen is not None and clen.strip().isdigit() and int(clen) > self.max_body_bytes:
            return OTHER, None
        size = 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg.get("type") != "http.request":  # http.disconnect: the app sees it next
                return OTHER, None
            size += len(msg.get("body") or b"")
            if size > self.max_body_bytes:
                return OTHER, None
            if not msg.get("more_body", False):
                break
        try:
            body = json.loads(b"".join(m.get("body") or b"" for m in messages))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return OTHER, None
        if not isinstance(body, dict):
            return OTHER, None
        n = max((v for v in (body.get("n"), body.get("best_of")) if isinstance(v, int) and not isinstance(v, bool)),
                default=None)
        hdr = _header(scope, ADAPTER_HEADER)
        model = hdr.decode("latin-1").strip() if hdr else body.get("model")
        return self.label(model), n
