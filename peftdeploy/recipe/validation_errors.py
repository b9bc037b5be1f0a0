"""Pydantic validation errors turned into recipe errors: the field path, the nearest YAML position, the allowed
keys or values and a "did you mean" fix (what `validate` prints)."""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import Location, RecipeError
from .schema import _FieldError

if TYPE_CHECKING:  # pragma: no cover
    from .loader import _Walk


def _closest(word: str, choices: list[str]) -> str | None:
    m = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return m[0] if m else None


def _allowed_keys(path: tuple[Any, ...]) -> list[str]:
    from . import schema as S

    model: Any = S.Recipe
    for p in path:
        if isinstance(p, int):
            continue
        f = getattr(model, "model_fields", {}).get(p)
        if f is None:
            return []
        ann = f.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            inner = getattr(cand, "__args__", None)
            if isinstance(cand, type) and issubclass(cand, S.BaseModel):
                model = cand
                break
            if inner:
                sub = [a for a in inner if isinstance(a, type) and issubclass(a, S.BaseModel)]
                if sub:
                    model = sub[0]
                    break
        else:
            return []
    keys = list(getattr(model, "model_fields", {}))
    if model is S.Recipe:
        keys.append("extends")
    return keys


def _errors_from_validation(e: ValidationError, walk: _Walk) -> list[RecipeError]:
    out: list[RecipeError] = []
    for err in e.errors(include_url=False):
        loc_path = tuple(err["loc"])
        etype = err["type"]
        ctx = err.get("ctx") or {}
        exc = ctx.get("error")
        msg = err["msg"]
        fix = None
        if isinstance(exc, _FieldError):
            loc_path = (*loc_path, *exc.path)
            msg = exc.message
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # Secret is a sub-model after loading; report at the field itself.
        if loc_path[:2] == ("serving", "api_key"):
            loc_path = loc_path[:2]
        if etype == "extra_forbidden":
            key = str(loc_path[-1])
            allowed = _allowed_keys(loc_path[:-1])
            near = _closest(key, allowed)
            msg = f"unknown key {key!r}"
            fix = (f"did you mean {near!r}? " if near else "") + (
                f"allowed keys here: {', '.join(allowed)}" if allowed else "remove it")
            position = walk.key_locations.get(loc_path) or walk.locations.get(loc_path)
        elif etype == "missing":
            key = str(loc_path[-1])
            msg = f"missing required key {key!r}"
            fix = {
                "apiVersion": "add 'apiVersion: peftdeploy/v1' at the top",
                "name": "add 'name: my-deployment' (lowercase letters, digits, '-')",
                "backbone": "add 'backbone:' with 'model: hf://org/repo' (or a local path)",
                "model": "add 'model: hf://org/repo' (or a local path, or s3://bucket/prefix)",
                "source": "add 'source: hf://org/repo' (or a local path, or s3://bucket/prefix)",
                "name_adapter": "add 'name: my-adapter'",
            }.get(key)
            position = _nearest_location(loc_path[:-1], walk)
        else:
            if etype == "string_pattern_mismatch":
                fix = _pattern_fix(loc_path)
            elif etype in ("literal_error", "enum"):
                fix = f"use one of: {ctx.get('expected', '')}".rstrip(": ")
            elif etype.endswith("_type") or etype.endswith("_parsing"):
                fix = f"write a value of the right type here ({_type_hint(etype)})"
            position = _nearest_location(loc_path, walk, prefer_key=False)
        out.append(RecipeError(msg, fix=fix, location=_with_path(position, _strip_union(loc_path))))
    return _merge_union_errors(out, walk)


def _merge_union_errors(errs: list[RecipeError], walk: _Walk) -> list[RecipeError]:
    """One message per field: a union (`auto` or a positive integer) fails once per member in pydantic."""
    by_path: dict[Any, list[RecipeError]] = {}
    for e in errs:
        by_path.setdefault((e.location.file, e.location.path) if e.location else id(e), []).append(e)
    out: list[RecipeError] = []
    for group in by_path.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        loc = group[0].location
        path = next((k for k in walk.locations if _fmt_path(k) == loc.path), None) if loc else None
        value = walk.value_at(path) if path is not None else None
        allowed = _union_allowed(group)
        out.append(RecipeError(f"{value!r} is not allowed here" if value is not None else group[0].message,
                               fix=f"write {allowed}", location=loc))
    return out


def _union_allowed(group: list[RecipeError]) -> str:
    words: list[str] = []
    for e in group:
        fix = e.fix or ""
        if fix.startswith("use one of: "):
            words.append(fix[len("use one of: "):])
        elif "integer" in e.message + fix or "greater than or equal to 1" in e.message:
            words.append("a positive integer")  # the int member of auto-or-int fields is ge=1
        else:
            words.append(e.message)
    return " or ".join(dict.fromkeys(words))


def _strip_union(path: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic puts union member tags (e.g. "literal['auto']", "int") into locs.
    return tuple(p for p in path if not (isinstance(p, str) and (p.startswith("literal[") or p in (
        "int", "constrained-int", "str", "float", "bool", "none", "is-instance[Secret]", "Secret"))))


def _nearest_location(path: tuple[Any, ...], walk: _Walk, prefer_key: bool = True) -> Location:
    path = _strip_union(path)
    while True:
        if path in walk.locations:
            if prefer_key and path in walk.key_locations:
                return walk.key_locations[path]
            return walk.locations[path]
        if not path:
            return Location()
        path = path[:-1]


def _pattern_fix(path: tuple[Any, ...]) -> str:
    last = [p for p in path if isinstance(p, str)][-1:] or [""]
    return {
        "name": "use lowercase letters, digits and '-' (adapter names may also use '.' and '_'), "
                "starting with a letter or digit",
        "sha256": "write the 64 lowercase hex digits of sha256sum adapter_model.safetensors",
        "adapters": "name existing adapters",
    }.get(last[0], "see `peftdeploy schema` for the allowed form")


def _type_hint(etype: str) -> str:
    return {
        "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
        "float_parsing": "a number", "float_type": "a number",
        "bool_parsing": "true or false", "bool_type": "true or false",
        "string_type": "a string", "dict_type": "a mapping of 'key: value'", "list_type": "a list",
        "model_type": "a mapping of 'key: value'", "model_attributes_type": "a mapping of 'key: value'",
    }.get(etype, etype.replace("_", " "))


def _with_path(loc: Location, path: tuple[Any, ...]) -> Location:
    return Location(loc.file, loc.line, loc.column, _fmt_path(path))


def _fmt_path(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out
