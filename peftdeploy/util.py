"""Small shared helpers: atomic writes, hashing, cache directories."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def cache_root() -> Path:
    """$PEFTDEPLOY_CACHE, else $XDG_CACHE_HOME/peftdeploy, else ~/.cache/peftdeploy."""
    if os.environ.get("PEFTDEPLOY_CACHE"):
        return Path(os.environ["PEFTDEPLOY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "peftdeploy"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def replace_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move the finished directory `tmp` to `final` (same file system), replacing what is there.

    Readers see the old directory or the new one, never a mix: the old one is renamed aside
    (``.old-<name>-<pid>``, a name cache sweepers recognise), the new one renamed in, then the old
    one removed.
    """
    import shutil

    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists() or final.is_symlink():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def dir_build(final: str | os.PathLike[str], *, lock_timeout: float,
              on_timeout: Callable[[Path], Exception]) -> Iterator[Path]:
    """Build the directory `final` exclusively and atomically.

    Takes the file lock ``<parent>/.<name>.lock`` (``on_timeout(lock_path)`` is raised when it cannot),
    removes leftovers of killed builds (``.tmp-<name>-*`` / ``.old-<name>-*``), and yields the path of a
    temporary directory next to `final` (not yet created). If the block fills it, it replaces `final`
    on normal exit (:func:`replace_dir`); on an exception it is removed. A block that finds `final`
    already complete just returns without creating it.
    """
    import shutil

    from filelock import FileLock, Timeout

    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    lock_path = parent / f".{final.name}.lock"
    lock = FileLock(str(lock_path), timeout=lock_timeout)
    try:
        lock.acquire()
    except Timeout:
        raise on_timeout(lock_path) from None
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        for p in parent.iterdir():  # leftovers of killed builds of this directory (we hold its lock)
            if p.name.startswith((f".tmp-{final.name}-", f".old-{final.name}-")):
                shutil.rmtree(p, ignore_errors=True)
        yield tmp
        if tmp.exists():
            replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (this process: yes; another user's: yes)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


MERGE_KERNEL_ENV = "PEFTDEPLOY_MERGE_KERNEL"  # "numpy": do not use the compiled merge kernel


def merge_kernel_note() -> str | None:
    """Why merges here would take the numpy path (about 2x slower), or None when the compiled kernel
    is installed. Pure (looks for the extension file; imports neither numpy nor the extension), so
    `plan` can say it; `merge` checks the loaded kernel itself (peftdeploy.merge.kernels.load)."""
    import importlib.machinery

    if os.environ.get(MERGE_KERNEL_ENV, "").strip().lower() == "numpy":
        return f"{MERGE_KERNEL_ENV}=numpy is set (unset it for the compiled kernel)"
    d = Path(__file__).resolve().parent / "merge"
    if any((d / f"_kernels{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        return None
    return ("the C extension peftdeploy.merge._kernels is not built (no C compiler or Python headers at "
            "install); install gcc and python3-dev and reinstall peftdeploy")


def gib(n: int | float | None) -> str:
    """A byte count for people: GiB, MiB or KiB ("-" for None)."""
    if n is None:
        return "-"
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if abs(n) >= 1 << 20 or n == 0:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB"


COMPLETE_MARKER = ".peftdeploy-complete"  # written last into a finished cache entry: its key and manifest


def read_marker(d: Path) -> dict[str, Any]:
    """The completion marker of cache entry `d` ({} when absent or unreadable: an incomplete entry)."""
    try:
        m = json.loads((Path(d) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def marker_key(d: Path) -> str | None:
    """The cache key a finished entry `d` was written for, else None."""
    k = read_marker(d).get("key")
    return k if isinstance(k, str) else None
