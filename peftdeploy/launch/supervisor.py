"""Run vLLM's OpenAI-compatible server for a LaunchSpec: pre-flight, start, readiness, progress, stop.

* The server runs in its own session / process group (``start_new_session=True``), so stopping it
  means signalling the group: SIGTERM, up to `grace` seconds, then SIGKILL — the API server, the
  engine core and its workers all go, nothing is orphaned. Descendants that left the group are
  found with psutil (when installed) and killed too.
* Environment: ``os.environ`` + ``spec.env`` + secrets copied *by reference* — ``spec.secret_env``
  names the variable the value is read from at start; the value is never printed or stored.
* Output goes to a log file; the progress display tails it (phase from log patterns, elapsed time,
  last log line).
* Ready = ``GET /health`` is 200 and ``GET /v1/models`` lists every expected model name.
* A server that dies (or reports a fatal engine error) before it is ready becomes a
  :class:`~peftdeploy.errors.LaunchError` whose message is one paragraph from :mod:`.diagnose`.

No torch / vLLM imports: vLLM runs in the child process (``peftdeploy-vllm serve ...``).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..errors import LaunchError, ServerFailure
from ..util import cache_root
from .diagnose import _NOISE_RE, diagnose_file, strip_prefix
from ..plan.spec import LaunchSpec

__all__ = ["Supervisor", "Progress", "PHASES", "phase_of", "default_log_path", "server_executable",
           "check_port_free", "stop_process_group", "group_alive", "server_env"]

# (phase, pattern) — checked in order on each new log line; the phase only moves forward.
PHASES: list[tuple[str, re.Pattern[str]]] = [
    ("starting vLLM", re.compile(r"non-default args|vLLM API server version|version \d")),
    ("initializing engine", re.compile(r"Initializing a V1 LLM engine|EngineCore|Initializing model")),
    ("loading weights", re.compile(r"Starting to load model|Loading safetensors|Loading weights|load_weights")),
    ("profiling / KV cache", re.compile(r"KV cache|Memory profiling|profile|determine_available_memory",
                                        re.IGNORECASE)),
    ("capturing graphs / warm-up", re.compile(r"Capturing CUDA graph|CUDA graph|Warming up|torch\.compile|"
                                              r"Compiling a graph|compil", re.IGNORECASE)),
    ("loading adapters", re.compile(r"Loaded new LoRA adapter|Supported tasks")),
    ("starting API server", re.compile(r"Starting vLLM API server|Route: |Started server process|"
                                       r"Application startup complete|Uvicorn running")),
]
_PHASE_ORDER = {p: i for i, (p, _) in enumerate(PHASES)}

# fatal patterns in the log of a process that may not exit by itself (the API server can hang
# after its engine died): once seen, the server is treated as dead after FATAL_GRACE seconds.
FATAL_RE = re.compile(r"EngineCore failed to start|Engine core initialization failed|"
                      r"Worker proc \S+ died unexpectedly")
FATAL_GRACE = 20.0


def phase_of(line: str, current: str | None = None) -> str | None:
    """The phase a log line announces (never going back from `current`)."""
    cur = _PHASE_ORDER.get(current or "", -1)
    for i, (name, rx) in enumerate(PHASES):
        if i > cur and rx.search(line):
            return name
    return None


def default_log_path(name: str) -> Path:
    ts = time.strftime("%Y%m%d-%H%M%S")
    return cache_root() / "logs" / f"{name}-{ts}.log"


def server_executable() -> list[str]:
    """How to run `peftdeploy-vllm`: the console script next to this Python, else `python -m`."""
    bindir = Path(sys.executable).parent
    cand = bindir / "peftdeploy-vllm"
    if cand.is_file() and os.access(cand, os.X_OK):
        return [str(cand)]
    found = shutil.which("peftdeploy-vllm")
    if found:
        return [found]
    return [sys.executable, "-m", "peftdeploy.launch.entry"]


def check_port_free(host: str, port: int) -> None:
    """LaunchError when `host:port` cannot be bound (another server is listening there)."""
    bind_host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is fine
        s.bind((bind_host, port))
    except OSError as e:
        holder = _port_holder(port)
        who = f" (held by pid {holder})" if holder else ""
        raise LaunchError(
            f"port {port} on {bind_host} is already in use{who}: {e.strerror or e}; vLLM was not started",
            fix="stop the other server (`peftdeploy status` lists deployments, `peftdeploy down NAME` stops one), "
                "or choose another port with --port or serving.port",
        ) from None
    finally:
        s.close()


def _port_holder(port: int) -> int | None:
    try:
        import psutil

        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return c.pid
    except Exception:
        return None
    return None


def server_env(spec: LaunchSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ + spec.env + secrets read (by reference) from os.environ."""
    env = dict(os.environ if base is None else base)
    env.update(dict(spec.env))
    for target, source in spec.secret_env:
        val = os.environ.get(source)
        if val:
            env[target] = val
        else:
            env.pop(target, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies excluded when psutil can tell)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = _group_members(pgid)
    if members is None:
        return True
    return bool(members)


def _group_members(pgid: int) -> list[int] | None:
    try:
        import psutil
    except ImportError:
        return None
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.info["pid"]) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.info["pid"])
        except (ProcessLookupError, PermissionError, OSError):
            continue
    return out


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def stop_process_group(pgid: int, *, grace: float = 20.0, proc: subprocess.Popen | None = None,
                       extra_pids: Iterable[int] = ()) -> int | None:
    """SIGTERM the group, wait up to `grace` s, then SIGKILL it. Returns the leader's exit code when
    `proc` is given (reaped), else None. `extra_pids`: descendants known beforehand; any that left
    the group and survive are killed too."""
    extra = set(extra_pids) | set(_descendants(pgid))
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in extra:  # stragglers that moved to another group
        try:
            if os.getpgid(pid) != pgid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass
    rc = None
    if proc is not None:
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
    t_end = time.monotonic() + 5
    while group_alive(pgid) and time.monotonic() < t_end:
        time.sleep(0.05)
    return rc


@dataclass
class Progress:
    """What the display shows; updated while tailing the log."""

    phase: str = "starting"
    last_line: str = ""
    started: float = field(default_factory=time.monotonic)
    lines: int = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class _Tail:
    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.buf = ""

    def read_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
                self.pos = f.tell()
        except OSError:
            return []
        if not data:
            return []
        text = self.buf + data.decode("utf-8", "replace").replace("\r", "\n")
        parts = text.split("\n")
        self.buf = parts.pop()
        return parts


class Supervisor:
    """One vLLM server process for `spec`."""

    def __init__(self, spec: LaunchSpec, *, log_path: str | Path | None = None,
                 executable: list[str] | None = None, env: dict[str, str] | None = None,
                 argv: list[str] | None = None):
        self.spec = spec
        self.log_path = Path(log_path) if log_path else default_log_path(spec.recipe_name)
        self.executable = executable or server_executable()
        self.argv = argv or spec.argv(tuple(self.executable))
        self.env = env if env is not None else server_env(spec)
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.progress = Progress()
        self._tail: _Tail | None = None
        self._fatal_at: float | None = None
        self._known_descendants: set[int] = set()

    # ------------------------------------------------------------------ start
    @property
    def base_url(self) -> str:
        host = self.spec.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.spec.port}"

    @property
    def api_key(self) -> str | None:
        for target, source in self.spec.secret_env:
            if target == "VLLM_API_KEY":
                return os.environ.get(source) or None
        return None

    def preflight(self) -> None:
        check_port_free(self.spec.host, self.spec.port)

    def start(self) -> subprocess.Popen:
        self.preflight()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)
        try:
            log.write(f"# peftdeploy up: {self.spec.command_line(tuple(self.executable))}\n".encode())
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True, close_fds=True)
        finally:
            log.close()
        self.pgid = self.proc.pid  # session leader = group leader
        self.progress = Progress(phase="starting vLLM")
        self._tail = _Tail(self.log_path)
        return self.proc

    # ------------------------------------------------------------------ observe
    def poll_log(self) -> None:
        if self._tail is None:
            return
        for raw in self._tail.read_lines():
            if not raw.strip() or _NOISE_RE.search(raw):
                continue
            self.progress.lines += 1
            line = strip_prefix(raw)
            ph = phase_of(line, self.progress.phase)
            if ph:
                self.progress.phase = ph
            if line and not line.startswith(("^", "File \"", "Traceback")) and not line.startswith("# peftdeploy"):
                self.progress.last_line = line
            if self._fatal_at is None and FATAL_RE.search(raw):
                self._fatal_at = time.monotonic()

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _http_ready(self, expected: list[str]) -> bool:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            r = httpx.get(self.base_url + "/health", timeout=2.0)
            if r.status_code != 200:
                return False
            r = httpx.get(self.base_url + "/v1/models", timeout=5.0, headers=headers)
            if r.status_code != 200:
                return False
            ids = {m.get("id") for m in r.json().get("data", [])}
        except (httpx.HTTPError, ValueError):
            return False
        return all(n in ids for n in expected)

    def failure(self, rc: int | None, *, prefix: str = "vLLM failed to start") -> ServerFailure:
        d = diagnose_file(self.log_path, exit_code=rc)
        code = f" (exit code {rc})" if rc is not None and rc >= 0 else ""
        cause = d.cause.rstrip(".")
        fix = f"{d.fix.rstrip('.')}; full log: {self.log_path}" if d.fix else f"see the full log: {self.log_path}"
        return ServerFailure(f"{prefix}{code}: {cause}.", fix=fix)

    def wait_ready(self, *, timeout: float = 900.0, expected: list[str] | None = None,
                   on_tick: Callable[[Progress], None] | None = None, interval: float = 0.25) -> float:
        """Block until ready; returns seconds since start. LaunchError when the server dies, reports a
        fatal error, or is not ready within `timeout` (the server is stopped in those cases)."""
        assert self.proc is not None and self.pgid is not None
        expected = list(expected or self.spec.model_names)
        deadline = self.progress.started + timeout
        last_http = 0.0
        last_desc = 0.0
        while True:
            self.poll_log()
            if time.monotonic() - last_desc >= 2.0:
                last_desc = time.monotonic()
                self._known_descendants.update(_descendants(self.proc.pid))
            if on_tick:
                on_tick(self.progress)
            rc = self.proc.poll()
            if rc is not None:
                self.poll_log()
                stop_process_group(self.pgid, grace=5, proc=self.proc, extra_pids=self._known_descendants)
                raise self.failure(rc)
            now = time.monotonic()
            if self._fatal_at is not None and now - self._fatal_at > FATAL_GRACE:
                rc = self.stop(grace=5)
                raise self.failure(None)
            if now - last_http >= 0.5:
                last_http = now
                if self._http_ready(expected):
                    self.progress.phase = "ready"
                    if on_tick:
                        on_tick(self.progress)
                    return self.progress.elapsed
            if now > deadline:
                self.stop(grace=10)
                d = diagnose_file(self.log_path)
                raise ServerFailure(
                    f"vLLM was not ready after {timeout:.0f} s (phase: {self.progress.phase}; last log line: "
                    f"{self.progress.last_line or '-'}); it was stopped. {d.paragraph() if d.kind != 'unknown' else ''}"
                    .strip(), fix=f"raise --timeout, or look at the full log: {self.log_path}")
            time.sleep(interval)

    # ------------------------------------------------------------------ stop
    def stop(self, grace: float = 20.0) -> int | None:
        if self.proc is None or self.pgid is None:
            return None
        self._known_descendants.update(_descendants(self.proc.pid))
        return stop_process_group(self.pgid, grace=grace, proc=self.proc, extra_pids=self._known_descendants)


class ProgressDisplay:
    """A one-line live status on stderr: phase · elapsed · last log line (plain lines without a TTY)."""

    def __init__(self, title: str, *, enabled: bool = True):
        self.title = title
        self.enabled = enabled
        self._live = None
        self._last_phase: str | None = None
        self._tty = sys.stderr.isatty()

    def __enter__(self) -> "ProgressDisplay":
        if self.enabled and self._tty:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(Progress()), console=Console(stderr=True), refresh_per_second=4,
                              transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def _render(self, p: Progress):
        from rich.spinner import Spinner
        from rich.text import Text

        last = p.last_line
        if len(last) > 100:
            last = last[:97] + "..."
        t = Text.assemble((f"{self.title}: ", "bold"), (p.phase, "cyan"), f"  {p.elapsed:5.1f}s  ",
                          (last, "dim"))
        return Spinner("dots", text=t)

    def update(self, p: Progress) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            self._live.update(self._render(p))
        elif p.phase != self._last_phase:
            self._last_phase = p.phase
            print(f"{self.title}: {p.phase} ({p.elapsed:.1f}s)", file=sys.stderr, flush=True)
