"""Small shared helpers: atomic writes, hashing, cache directories."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


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


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
