"""Load a recipe file: YAML with positions, `extends` chains, ${VAR} interpolation, strict validation.

Every problem becomes a `RecipeError` naming the file, line, column and field path, and what would
be right. Values remember the file and position that wrote them, through `extends` deep merges, so
an error in a parent recipe points into the parent, and relative paths resolve against the file
that wrote them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from ..errors import Location, RecipeError
from .schema import PATH_FIELDS, SECRET_FIELDS, Recipe
from .validation_errors import _errors_from_validation, _fmt_path, _with_path

_ENV_RE = re.compile(r"\$\{([^}]*)\}")
_VAR_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.S)
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*://")


# --------------------------------------------------------------------------------------------
# A YAML tree whose every value knows where it came from.
# --------------------------------------------------------------------------------------------
@dataclass
class _Val:
    value: Any  # dict[str, _Val] | list[_Val] | scalar
    loc: Location
    key_loc: Location | None = None  # for mapping values: where the key was written
    base_dir: Path | None = None  # directory of the file that wrote it


def field_location(loaded: Any, *path: Any) -> Location | None:
    """Where `path` stands in a loaded recipe (anything with ``location(*path)``), with the field written
    out (``adapters[1].source``)."""
    loc = loaded.location(*path)
    if loc is None:
        return None
    fmt = ""
    for p in path:
        fmt += f"[{p}]" if isinstance(p, int) else (("." if fmt else "") + str(p))
    return Location(loc.file, loc.line, loc.column, fmt)


def _loc(file: str, mark: Any) -> Location:
    return Location(file=file, line=mark.line + 1, column=mark.column + 1)


class _Constructor(yaml.constructor.SafeConstructor):
    pass


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; this bounds memory and time on anything else
MAX_NODES = 100_000  # values after YAML aliases are expanded (an alias "bomb" multiplies them)
MAX_DEPTH = 64  # nesting of mappings / lists


def _parse_file(path: Path, display: str) -> _Val:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe file {display} is larger than {MAX_RECIPE_BYTES >> 20} MiB",
                              location=Location(file=display), fix="a recipe is a short YAML file; check the path")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {display}", fix="check the path")
    except IsADirectoryError:
        raise RecipeError(f"{display} is a directory, not a recipe file", fix="name the recipe's .yaml file")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe file {display}: {e}")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise RecipeError(f"the YAML in {display} is nested too deeply", location=Location(file=display),
                          fix=f"a recipe nests a few levels; at most {MAX_DEPTH}")
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if e.context_mark is not None and e.problem and "<stream end>" in e.problem:
            mark = e.context_mark  # an unclosed bracket/quote: point where it was opened
        loc = _loc(display, mark) if mark else Location(file=display)
        problem = (e.problem or "invalid YAML").strip()
        ctx = f" ({e.context.strip()})" if e.context else ""
        raise RecipeError(f"invalid YAML: {problem}{ctx}", location=loc,
                          fix="fix the YAML syntax (indentation, quoting, ':' after keys)")
    except yaml.YAMLError as e:  # pragma: no cover - non-marked errors are rare
        raise RecipeError(f"invalid YAML: {e}", location=Location(file=display))
    if node is None:
        raise RecipeError("the recipe is empty", location=Location(file=display, line=1),
                          fix="start with 'apiVersion: peftdeploy/v1' and 'name: ...'")
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(
            f"the top level of a recipe must be a mapping of keys (apiVersion, name, backbone, ...), "
            f"not a {_kind(node)}", location=_loc(display, node.start_mark),
            fix="write 'key: value' lines at the top level")
    _check_expanded_size(node, display)
    return _convert(node, display, path.parent.resolve(), _Constructor(), [0])


def _check_expanded_size(root: yaml.Node, file: str) -> None:
    """Refuse a document whose aliases expand to more than MAX_NODES values, counted on the composed graph
    (an alias is the same node object as its anchor: memoized, so an alias bomb costs its few distinct nodes,
    not the billions it would expand to)."""
    memo: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        hit = memo.get(id(node))
        if hit is not None:
            return hit
        n = 1
        if depth <= MAX_DEPTH + 1:  # deeper nesting is refused by _convert, with its own message
            if isinstance(node, yaml.MappingNode):
                n += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                n += sum(size(v, depth + 1) for v in node.value)
        memo[id(node)] = n
        if n > MAX_NODES:
            raise RecipeError(f"the recipe expands to more than {MAX_NODES:,} values (YAML aliases '*' repeat "
                              "what their anchor '&' holds)", location=_loc(file, node.start_mark),
                              fix="write the values out instead of nesting aliases")
        return n

    size(root, 0)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "list"
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    return "scalar"


def _convert(node: yaml.Node, file: str, base_dir: Path, ctor: _Constructor, count: list[int],
             depth: int = 0) -> _Val:
    loc = _loc(file, node.start_mark)
    count[0] += 1
    if count[0] > MAX_NODES:
        raise RecipeError(f"the recipe expands to more than {MAX_NODES:,} values (YAML aliases '*' repeat what "
                          "their anchor '&' holds)", location=loc, fix="write the values out instead of nesting aliases")
    if depth > MAX_DEPTH:
        raise RecipeError(f"the recipe nests deeper than {MAX_DEPTH} levels", location=loc,
                          fix="a recipe nests a few levels of mappings and lists")
    if isinstance(node, yaml.MappingNode):
        out: dict[str, _Val] = {}
        for knode, vnode in node.value:
            kloc = _loc(file, knode.start_mark)
            if knode.tag == "tag:yaml.org,2002:merge":
                raise RecipeError("YAML merge keys ('<<') are not supported in recipes", location=kloc,
                                  fix="use 'extends: ./parent.yaml' to share settings")
            if not isinstance(knode, yaml.ScalarNode):
                raise RecipeError("mapping keys must be plain names", location=kloc)
            try:
                key = ctor.construct_object(knode)
            except (ValueError, OverflowError, yaml.constructor.ConstructorError):
                raise RecipeError("mapping keys must be plain names", location=kloc) from None
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                first = out[key].key_loc
                raise RecipeError(
                    f"duplicate key {key!r} (first written at line {first.line if first else '?'})",
                    location=kloc, fix="remove one of the two; YAML would silently keep only the last")
            child = _convert(vnode, file, base_dir, ctor, count, depth + 1)
            child.key_loc = kloc
            out[key] = child
        return _Val(out, loc, base_dir=base_dir)
    if isinstance(node, yaml.SequenceNode):
        return _Val([_convert(n, file, base_dir, ctor, count, depth + 1) for n in node.value], loc, base_dir=base_dir)
    try:
        value = ctor.construct_object(node)
    except yaml.constructor.ConstructorError as e:
        raise RecipeError(f"unsupported YAML value: {e.problem}", location=loc)
    except (ValueError, OverflowError) as e:  # e.g. an integer of thousands of digits
        raise RecipeError(f"value out of range: {str(e)[:120]}", location=loc, fix="write a number of normal size")
    return _Val(value, loc, base_dir=base_dir)


# --------------------------------------------------------------------------------------------
# extends + deep merge
# --------------------------------------------------------------------------------------------
def _display(path: Path) -> str:
    """The path as the user would write it: relative to the working directory when under it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # pragma: no cover - other drive on Windows
        return str(path)
    return str(path.resolve()) if rel.startswith("..") else rel


def _load_chain(path: Path, chain: list[Path]) -> tuple[_Val, list[Path]]:
    real = path.resolve()
    display = _display(path)
    tree = _parse_file(path, display)
    files = [real]
    ext = tree.value.pop("extends", None)
    if ext is None:
        return tree, files
    if not isinstance(ext.value, str) or not ext.value.strip():
        raise RecipeError("'extends' must be a path to a parent recipe file", location=ext.loc,
                          fix="write e.g. 'extends: ./team-base.yaml' (relative to this file)")
    target = _interpolate_str(ext.value, ext.loc, ("extends",))
    if _SCHEME_RE.match(target):
        raise RecipeError(f"'extends' takes a local recipe file, not a URL ({target!r})", location=ext.loc,
                          fix="download the parent recipe next to this one and write 'extends: ./parent.yaml'")
    parent = Path(os.path.expanduser(target))
    if not parent.is_absolute():
        parent = (real.parent / parent)
    parent_real = parent.resolve()
    if parent_real in chain or parent_real == real:
        cycle = " -> ".join(_display(p) for p in [*chain, real, parent_real])
        raise RecipeError(f"'extends' forms a cycle: {cycle}", location=ext.loc,
                          fix="remove the 'extends' that points back to a recipe already in the chain")
    if parent.is_dir():
        raise RecipeError(f"'extends' names {ext.value!r}, which is a directory, not a recipe file",
                          location=ext.loc, fix="name the parent recipe's .yaml file")
    if not parent.is_file():
        raise RecipeError(f"'extends' names {ext.value!r}, but {_display(parent)} does not exist",
                          location=ext.loc, fix="fix the path; it is relative to the file that writes it")
    if parent.suffix.lower() not in (".yaml", ".yml"):  # never parse (and quote in errors) any other file
        raise RecipeError(f"'extends' names {ext.value!r}, which is not a .yaml recipe", location=ext.loc,
                          fix="extend a recipe file (.yaml or .yml)")
    base, base_files = _load_chain(parent, [*chain, real])
    return _deep_merge(base, tree), [*base_files, *files]


def _deep_merge(base: _Val, child: _Val) -> _Val:
    """Mappings merge key by key; lists and scalars replace; child wins."""
    if isinstance(base.value, dict) and isinstance(child.value, dict):
        out = dict(base.value)
        for k, v in child.value.items():
            out[k] = _deep_merge(out[k], v) if k in out else v
        return _Val(out, child.loc, child.key_loc, child.base_dir)
    return child


# --------------------------------------------------------------------------------------------
# ${VAR} interpolation, path resolution, secrets
# --------------------------------------------------------------------------------------------
def _interpolate_str(s: str, loc: Location, path: tuple[Any, ...], env: Mapping[str, str] | None = None,
                     refs: list[str] | None = None) -> str:
    """``${NAME}`` / ``${NAME:-default}`` (the default may itself hold ``${...}``, read only when NAME is unset)."""
    env = os.environ if env is None else env
    out: list[str] = []
    i = 0
    while True:
        j = s.find("${", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        depth, k = 1, j + 2
        while k < len(s) and depth:  # the matching '}'
            if s.startswith("${", k):
                depth, k = depth + 1, k + 2
                continue
            depth -= s[k] == "}"
            k += 1
        whole = s[j:k]
        vm = _VAR_RE.match(whole[2:-1]) if depth == 0 else None
        if not vm:
            raise RecipeError(f"bad variable reference {whole!r}",
                              location=_with_path(loc, path),
                              fix="write ${NAME} or ${NAME:-default} (NAME: letters, digits, '_')")
        name, default = vm.group(1), vm.group(2)
        if refs is not None:
            refs.append(name)
        if name in env:
            out.append(env[name])
        elif default is not None:
            out.append(_interpolate_str(default, loc, path, env, refs))
        else:
            raise RecipeError(f"environment variable {name} is not set (referenced as {whole})",
                              location=_with_path(loc, path),
                              fix=f"export {name}=... before running, or write ${{{name}:-default}}")
        i = k


def _match(path: tuple[Any, ...], patterns: tuple[tuple[Any, ...], ...]) -> bool:
    for pat in patterns:
        if len(pat) == len(path) and all(p == "*" or p == q for p, q in zip(pat, path)):
            return True
    return False


def is_local_path(s: str) -> bool:
    return not _SCHEME_RE.match(s)


# Fields that name a model or adapter (a hub id, a path, ...) and the field that holds their revision.
HUB_FIELDS: dict[tuple[Any, ...], str] = {
    ("backbone", "model"): "revision",
    ("backbone", "merge_base"): "merge_base_revision",
    ("adapters", "*", "source"): "revision",
}
# `org/repo` as vLLM and transformers take it (optionally `@revision`): one slash, hub-legal names
_BARE_HUB_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@([^\s/@]+))?$")
_HF_AT_REV = re.compile(r"^(hf://[^/@\s]+/[^/@\s]+)@([^/@\s]+)(/.*)?$")


@dataclass
class _Walk:
    env: Mapping[str, str]
    locations: dict[tuple[Any, ...], Location] = field(default_factory=dict)
    key_locations: dict[tuple[Any, ...], Location] = field(default_factory=dict)
    env_refs: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    # revisions written inside a source (`hf://org/repo@rev`): revision field path -> (rev, where)
    at_revisions: dict[tuple[Any, ...], tuple[str, Location]] = field(default_factory=dict)

    values: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def value_at(self, path: tuple[Any, ...]) -> Any:
        return self.values.get(path)

    def _hub_id(self, value: str, v: _Val, path: tuple[Any, ...]) -> str:
        """`org/repo[@rev]` with no such local path -> `hf://org/repo`; `hf://org/repo@rev` -> revision."""
        where = _with_path(v.loc, path)
        rev_field = next(f for pat, f in HUB_FIELDS.items() if _match(path, (pat,)))
        m = _BARE_HUB_ID.match(value)
        if m and not value.startswith("."):
            local = Path(value) if v.base_dir is None else v.base_dir / value
            if local.exists():
                self.notes.append(f"{where}: {value!r} is read as the local path {local} (it exists); "
                                  f"write hf://{m.group(1)} for the hub repo")
                return value
            self.notes.append(f"{where}: {value!r} is read as the hub id hf://{m.group(1)} "
                              f"(no local path {local})")
            value = "hf://" + value
        m = _HF_AT_REV.match(value)
        if m:
            self.at_revisions[(*path[:-1], rev_field)] = (m.group(2), where)
            value = m.group(1) + (m.group(3) or "")
        return value

    def apply_at_revisions(self, data: dict[str, Any]) -> None:
        for rpath, (rev, where) in self.at_revisions.items():
            parent: Any = data
            for k in rpath[:-1]:
                parent = parent[k]
            written = parent.get(rpath[-1])
            if written not in (None, rev):
                raise RecipeError(f"two revisions: {rev!r} after '@' and {_fmt_path(rpath)}: {written!r}",
                                  location=where, fix=f"keep one: drop '@{rev}' or {_fmt_path(rpath)}")
            parent[rpath[-1]] = rev
            self.locations.setdefault(rpath, where)

    def plain(self, v: _Val, path: tuple[Any, ...]) -> Any:
        self.locations[path] = v.loc
        if v.key_loc:
            self.key_locations[path] = v.key_loc
        if isinstance(v.value, dict):
            return {k: self.plain(c, (*path, k)) for k, c in v.value.items()}
        if isinstance(v.value, list):
            return [self.plain(c, (*path, i)) for i, c in enumerate(v.value)]
        value = v.value
        self.values[path] = value
        if _match(path, SECRET_FIELDS):
            return self._secret(value, v.loc, path)
        if isinstance(value, str):
            refs: list[str] = []
            value = _interpolate_str(value, v.loc, path, self.env, refs)
            self.env_refs.update(refs)
            if value and _match(path, tuple(HUB_FIELDS)):
                value = self._hub_id(value, v, path)
            if _match(path, PATH_FIELDS) and value and is_local_path(value):
                p = Path(os.path.expanduser(value))
                if not p.is_absolute() and v.base_dir is not None:
                    p = v.base_dir / p
                value = str(p)
        return value

    def _secret(self, value: Any, loc: Location, path: tuple[Any, ...]) -> Any:
        if value is None:
            return {"env": None, "value": None}
        if not isinstance(value, str) or not _ENV_RE.fullmatch(value.strip()):
            raise RecipeError(
                "secrets must come from the environment, not be written in the recipe",
                location=_with_path(loc, path),
                fix="write e.g. '${PEFTDEPLOY_API_KEY}' and export that variable")
        vm = _VAR_RE.match(value.strip()[2:-1])
        if vm and vm.group(2):
            raise RecipeError(
                f"a secret must not have a default written in the recipe ({value.strip()}): anyone who reads "
                "the recipe knows the key", location=_with_path(loc, path),
                fix=f"write ${{{vm.group(1)}}} and export {vm.group(1)} (or ${{{vm.group(1)}:-}}: no key when unset)")
        refs: list[str] = []
        resolved = _interpolate_str(value.strip(), loc, path, self.env, refs)
        return {"env": refs[0], "value": resolved or None}


# --------------------------------------------------------------------------------------------
# public API (pydantic errors -> positions: validation_errors.py)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe plus where each of its values was written."""

    recipe: Recipe
    path: Path  # the file the user named
    files: tuple[Path, ...]  # the extends chain, root parent first
    locations: dict[tuple[Any, ...], Location]
    env_refs: frozenset[str]
    # how ambiguous values were read (e.g. `org/repo` as a hub id), for `validate` and `plan` to print
    notes: tuple[str, ...] = ()

    def location(self, *path: Any) -> Location | None:
        return self.locations.get(tuple(path))

    def field_location(self, *path: Any) -> Location | None:
        return field_location(self, *path)


class RecipeErrors(RecipeError):
    """Several problems in one recipe; `errors` holds each (all are reported at once)."""

    def __init__(self, errors: list[RecipeError]):
        super().__init__(errors[0].message, fix=errors[0].fix, location=errors[0].location)
        self.errors = errors

    def render(self) -> str:
        return "\n".join(e.render() for e in self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {"errors": [e.to_dict() for e in self.errors]}


def load_recipe(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> LoadedRecipe:
    """Load, merge (`extends`), interpolate and validate a recipe. Raises RecipeError."""
    p = Path(path)
    shipped_note: list[str] = []
    if not p.exists():
        from .shipped import find_shipped

        found = find_shipped(str(path))
        if found is not None:
            shipped_note.append(f"{path!r} is the shipped recipe {found} (no file {path!r} here)")
            p = found
    if p.is_dir():
        raise RecipeError(f"{_display(p)} is a directory, not a recipe file",
                          fix="name the recipe's .yaml file")
    tree, files = _load_chain(p, [])
    walk = _Walk(env=os.environ if env is None else env)
    data = walk.plain(tree, ())
    if isinstance(data, dict):
        walk.apply_at_revisions(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errs = _errors_from_validation(e, walk)
        raise RecipeErrors(errs) if len(errs) > 1 else errs[0]
    return LoadedRecipe(recipe, p.resolve(), tuple(files), walk.locations, frozenset(walk.env_refs),
                        tuple(shipped_note + walk.notes))
