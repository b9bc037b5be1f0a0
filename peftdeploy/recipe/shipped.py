"""The recipes shipped with peftdeploy (`recipes/` in a checkout, `peftdeploy/data/recipes/` in a wheel),
so `peftdeploy up demo` works from any directory after `pip install peftdeploy`."""
from __future__ import annotations

import re
from pathlib import Path

_PKG = Path(__file__).resolve().parent.parent
# the wheel carries them as package data (setup.py copies recipes/ there); a checkout has them at the top
_DIRS = (_PKG / "data" / "recipes", _PKG.parent / "recipes")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def shipped_recipes_dir() -> Path | None:
    for d in _DIRS:
        if (d / "demo.yaml").is_file():
            return d
    return None


def shipped_recipes() -> dict[str, Path]:
    """name (file stem) -> path of every shipped recipe."""
    d = shipped_recipes_dir()
    return {} if d is None else {p.stem: p for p in sorted(d.glob("*.yaml"))}


def find_shipped(arg: str) -> Path | None:
    """The shipped recipe a bare name (`demo`, `demo-merged.yaml`) means when no such file exists here."""
    if Path(arg).exists() or not _NAME.match(arg):
        return None
    return shipped_recipes().get(arg.removesuffix(".yaml").removesuffix(".yml"))
