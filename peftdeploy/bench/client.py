"""The load generator's client: streaming OpenAI ``/v1/completions`` requests, timed per token.

Every request is sent with ``stream: true``, ``stream_options: {include_usage: true}``,
``ignore_eos: true`` and a fixed ``max_tokens`` — so each request generates exactly the asked
number of tokens and the timings are real: TTFT is the time to the first streamed token, TPOT the
mean time per output token after the first (``(e2e - ttft) / (output_tokens - 1)``, vLLM's own
definition), ITL the gaps between streamed chunks, e2e the whole request. Output tokens are
counted from the server's ``usage`` (falling back to the number of streamed chunks).

HTTP: ``aiohttp`` when installed (vLLM's own benchmark uses it; it is in every vLLM install and
parses streams with the least CPU), else ``httpx`` (a peftdeploy dependency). Standard library and
one of those two only, so the same client runs on a bare GPU image next to vLLM.

The API key is read from an environment variable *by name* (``api_key_env``), never passed as a
value on a command line.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .workload import RequestSpec, Workload

__all__ = ["RequestResult", "RunResult", "run_workload", "run_workload_sync", "pick_backend"]


@dataclass
class RequestResult:
    index: int
    model: str
    adapter: str
    ok: bool
    error: str | None = None
    status: int | None = None
    scheduled_s: float = 0.0  # planned arrival (relative to the run start)
    start_s: float = 0.0  # when it was sent (relative to the run start)
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    itl_mean_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    chunks: int = 0
    itls: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("itls")
        return d


@dataclass
class RunResult:
    url: str
    backend: str
    results: list[RequestResult]
    wall_s: float  # first send to last completion
    started_at: float  # time.time() at the start

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]


def pick_backend(preferred: str = "auto") -> str:
    if preferred in ("aiohttp", "httpx"):
        return preferred
    try:
        import aiohttp  # noqa: F401

        return "aiohttp"
    except ImportError:
        import httpx  # noqa: F401

        return "httpx"


def _headers(api_key_env: str | None) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        h["Authorization"] = f"Bearer {key}"
    return h


def _body(spec: RequestSpec, extra: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if extra:
        body.update(extra)
    return body


class _Timer:
    """Collects per-chunk timestamps of one streamed response."""

    def __init__(self, t_send: float):
        self.t_send = t_send
        self.first: float | None = None
        self.last: float | None = None
        self.chunks = 0
        self.itls: list[float] = []
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None

    def line(self, raw: bytes | str) -> None:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        raw = raw.strip()
        if not raw.startswith("data:"):
            return
        data = raw[5:].strip()
        if data == "[DONE]" or not data:
            return
        now = time.perf_counter()
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if "error" in obj and not obj.get("choices"):
            self.error = str(obj["error"])[:300]
            return
        if obj.get("usage"):
            self.usage = obj["usage"]
        choices = obj.get("choices") or []
        if choices and (choices[0].get("text") or choices[0].get("delta") or choices[0].get("finish_reason") is None):
            if self.first is None:
                self.first = now
            else:
                self.itls.append(now - (self.last or now))
            self.last = now
            self.chunks += 1


def _finish(spec: RequestSpec, res: RequestResult, timer: _Timer, t_end: float) -> None:
    res.chunks = timer.chunks
    if timer.error:
        res.ok, res.error = False, timer.error
        return
    if timer.first is None:
        res.ok, res.error = False, "no tokens streamed"
        return
    res.e2e_s = t_end - timer.t_send
    res.ttft_s = timer.first - timer.t_send
    usage = timer.usage or {}
    res.output_tokens = int(usage.get("completion_tokens") or timer.chunks)
    pt = usage.get("prompt_tokens")
    res.prompt_tokens = int(pt) if pt is not None else None
    if res.output_tokens > 1:
        res.tpot_s = (res.e2e_s - res.ttft_s) / (res.output_tokens - 1)
    if timer.itls:
        res.itl_mean_s = sum(timer.itls) / len(timer.itls)
    res.itls = timer.itls
    res.ok = True


async def _send_aiohttp(session: Any, url: str, headers: dict[str, str], spec: RequestSpec,
                        res: RequestResult, extra: dict[str, Any] | None) -> None:
    t0 = time.perf_counter()
    timer = _Timer(t0)
    async with session.post(url, json=_body(spec, extra), headers=headers) as r:
        res.status = r.status
        if r.status != 200:
            text = await r.text()
            res.ok, res.error = False, f"HTTP {r.status}: {text[:300]}"
            return
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    timer.line(line)
        if buf.strip():
            timer.line(buf)
    _finish(spec, res, timer, time.perf_counter())


async def _send_httpx(client: Any, url: str, headers: dict[str, str], spec: RequestSpec,
                      res: RequestResult, extra: dict[str, Any] | None) -> None:
    t0 = time.perf_counter()
    timer = _Timer(t0)
    async with client.stream("POST", url, json=_body(spec, extra), headers=headers) as r:
        res.status = r.status_code
        if r.status_code != 200:
            text = (await r.aread()).decode("utf-8", "replace")
            res.ok, res.error = False, f"HTTP {r.status_code}: {text[:300]}"
            return
        async for line in r.aiter_lines():
            if line:
                timer.line(line)
    _finish(spec, res, timer, time.perf_counter())


def completions_url(base_url: str) -> str:
    u = base_url.rstrip("/")
    if u.endswith("/v1/completions"):
        return u
    if u.endswith("/v1"):
        return u + "/completions"
    return u + "/v1/completions"


async def run_workload(
    base_url: str,
    workload: Workload,
    *,
    api_key_env: str | None = None,
    timeout_s: float = 600.0,
    backend: str = "auto",
    extra_body: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Send every request of ``workload`` (at its arrival times, at most ``concurrency`` in flight)."""
    url = completions_url(base_url)
    backend = pick_backend(backend)
    headers = _headers(api_key_env)
    conc = workload.config.concurrency
    sem = asyncio.Semaphore(conc) if conc else None
    n = len(workload.requests)
    results = [RequestResult(index=s.index, model=s.model, adapter=s.adapter, ok=False, scheduled_s=s.arrival_s)
               for s in workload.requests]
    done = 0
    limit = max(conc or n, 1)

    if backend == "aiohttp":
        import aiohttp

        session_cm: Any = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=limit + 4, force_close=False),
        )
        send: Any = _send_aiohttp
    else:
        import httpx

        session_cm = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4),
        )
        send = _send_httpx

    t_start = time.perf_counter()
    wall_start = time.time()

    async with session_cm as session:

        async def one(spec: RequestSpec, res: RequestResult) -> None:
            nonlocal done
            delay = spec.arrival_s - (time.perf_counter() - t_start)
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is not None:
                await sem.acquire()
            try:
                res.start_s = time.perf_counter() - t_start
                try:
                    await send(session, url, headers, spec, res, extra_body)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # connection reset, timeout, ...
                    res.ok, res.error = False, f"{type(e).__name__}: {e}"[:300]
            finally:
                if sem is not None:
                    sem.release()
                done += 1
                if progress:
                    progress(done, n)

        await asyncio.gather(*(one(s, r) for s, r in zip(workload.requests, results)))

    ends = [r.start_s + (r.e2e_s or 0.0) for r in results if r.ok]
    starts = [r.start_s for r in results]
    wall = (max(ends) - min(starts)) if ends else (time.perf_counter() - t_start)
    return RunResult(url=url, backend=backend, results=results, wall_s=wall, started_at=wall_start)


def run_workload_sync(base_url: str, workload: Workload, **kw: Any) -> RunResult:
    return asyncio.run(run_workload(base_url, workload, **kw))


# ------------------------------------------------------------------------------- server probes
def wait_ready(base_url: str, timeout_s: float = 600.0, proc: Any = None, api_key_env: str | None = None) -> float:
    """Poll ``/health`` then ``/v1/models`` until the server answers; returns seconds waited.

    ``proc`` (a Popen) makes it fail fast when the server process dies.
    """
    import urllib.error
    import urllib.request

    root = base_url.rstrip("/")
    for suffix in ("/v1/completions", "/v1"):
        if root.endswith(suffix):
            root = root[: -len(suffix)]
    t0 = time.time()
    headers = _headers(api_key_env)
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(root + "/health", timeout=5) as r:
                if r.status == 200:
                    req = urllib.request.Request(root + "/v1/models", headers=headers)
                    with urllib.request.urlopen(req, timeout=5) as r2:
                        if r2.status == 200:
                            return time.time() - t0
        except (urllib.error.URLError, OSError, ConnectionError):
            pass
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"{root} not ready after {timeout_s:.0f} s")
        time.sleep(1.0)


def list_models(base_url: str, api_key_env: str | None = None) -> list[str]:
    import urllib.request

    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[:-3]
    req = urllib.request.Request(root + "/v1/models", headers=_headers(api_key_env))
    with urllib.request.urlopen(req, timeout=10) as r:
        data = json.loads(r.read())
    return [m["id"] for m in data.get("data", [])]


def served_models(url: str, api_key_env: str | None) -> tuple[str, list[str]]:
    """(base model name, adapter names) as the running server lists them in /v1/models."""
    import json
    import urllib.request

    root = url.rstrip("/")
    for suffix in ("/v1/completions", "/v1"):
        if root.endswith(suffix):
            root = root[: -len(suffix)]
    req = urllib.request.Request(root + "/v1/models", headers=_headers(api_key_env))
    with urllib.request.urlopen(req, timeout=10) as r:
        data = json.loads(r.read()).get("data", [])
    bases = [m["id"] for m in data if not m.get("parent")]
    loras = [m["id"] for m in data if m.get("parent")]
    if not bases:
        from ..errors import PeftDeployError

        raise PeftDeployError(f"{root}/v1/models lists no base model")
    return bases[0], loras
