"""State files of running deployments: ``<cache_root>/run/<name>.json``.

`peftdeploy up` writes one when the server has started (and rewrites it when it is ready), so that
`peftdeploy status` and `peftdeploy down` work from another shell. Written atomically; a state
whose process is gone is *stale* (reported as such and removed by `down`). No secrets are stored:
the api key is recorded as the name of the environment variable it is read from.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..util import atomic_write_text, cache_root

__all__ = ["DeploymentState", "state_dir", "state_path", "write_state", "read_state", "list_states",
           "remove_state", "pid_alive"]

STATE_VERSION = 1


def state_dir() -> Path:
    return cache_root() / "run"


def state_path(name: str) -> Path:
    return state_dir() / f"{name}.json"


def pid_alive(pid: int | None, create_time: float | None = None) -> bool:
    """True when a process with this pid exists (and, when known, started at `create_time`, so a
    recycled pid does not count)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own dead child not yet reaped) is not alive
    try:
        import psutil

        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time is not None and abs(p.create_time() - create_time) > 1.0:
            return False
    except ImportError:
        pass
    except Exception:  # psutil.NoSuchProcess and friends
        return False
    return True


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


@dataclass
class DeploymentState:
    name: str  # recipe name: the state file's name
    pid: int  # the vLLM server process (leader of its process group)
    pgid: int
    host: str
    port: int
    log_path: str
    model_names: list[str]
    served_model_name: str
    adapters: list[str] = field(default_factory=list)
    mode: str = "serve"
    merge_adapters: list[str] = field(default_factory=list)  # merged into the served model (merge, hybrid)
    recipe_path: str | None = None
    recipe_hash: str | None = None
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    supervisor_pid: int | None = None  # the `peftdeploy up` process (None when detached and exited)
    pid_create_time: float | None = None
    api_key_env: str | None = None  # name of the env var holding the api key (never the value)
    command_line: str | None = None
    # a fleet (launch/fleet.py): pid / pgid / port above are the router's; one dict per engine here
    # (name, group, kind, pid, pgid, pid_create_time, host, port, models, log, devices, command_line)
    engines: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION

    @property
    def base_url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid, self.pid_create_time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeploymentState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def write_state(st: DeploymentState) -> Path:
    if st.pid_create_time is None:
        st.pid_create_time = _create_time(st.pid)
    p = state_path(st.name)
    atomic_write_text(p, json.dumps(st.to_dict(), indent=2) + "\n")
    return p


def read_state(name: str) -> DeploymentState | None:
    p = state_path(name)
    try:
        return DeploymentState.from_dict(json.loads(p.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def list_states() -> list[DeploymentState]:
    d = state_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        st = read_state(p.stem)
        if st is not None:
            out.append(st)
    return out


def remove_state(name: str, *, pid: int | None = None) -> None:
    """Remove the state file (only if it still describes `pid`, when given)."""
    p = state_path(name)
    if pid is not None:
        st = read_state(name)
        if st is not None and st.pid != pid:
            return
    try:
        p.unlink()
    except FileNotFoundError:
        pass
