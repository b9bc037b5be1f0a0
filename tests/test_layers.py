"""The house rule (docs/architecture.md "Layers"): a module imports its own layer and the layers below it,
never one above. An AST walk over every import in peftdeploy/ (module level, inside functions and under
TYPE_CHECKING alike), so a lazy import cannot hide an upward dependency."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "peftdeploy"

# top to bottom; each name is a top-level module or package of peftdeploy
LAYERS: list[tuple[str, set[str]]] = [
    ("commands", {"cli", "cli_common", "commands"}),
    ("run / render / measure / in-engine", {"launch", "render", "bench", "vllm_plugin", "lock"}),
    ("plan", {"plan"}),
    ("quantize, inspect", {"quantize", "inventory"}),
    ("merge, sources", {"merge", "sources"}),
    ("recipe, demo, formats", {"recipe", "demo", "safetensors_format", "adapter_format"}),
    ("base", {"util", "errors", "vllm_compat", "__init__"}),
]
RANK = {m: len(LAYERS) - i for i, (_, ms) in enumerate(LAYERS) for m in ms}


def _top(dotted: str) -> str | None:
    if dotted == "peftdeploy":
        return "__init__"
    if dotted.startswith("peftdeploy."):
        return dotted.split(".")[1]
    return None


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) for every peftdeploy import in `path` (a file under root/peftdeploy)."""
    pkg = list(path.relative_to(root).parts[:-1])  # the package the module is in
    out = []
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg[:len(pkg) - n.level + 1]
                if n.module:
                    out.append((n.lineno, ".".join([*base, n.module])))
                else:  # from . import x / from .. import x
                    out += [(n.lineno, ".".join([*base, a.name])) for a in n.names]
            elif n.module:
                out.append((n.lineno, n.module))
                if n.module == "peftdeploy":
                    out += [(n.lineno, f"peftdeploy.{a.name}") for a in n.names]
    return out


def _module_top(path: Path) -> str:
    rel = path.relative_to(PKG)
    return "__init__" if rel.parts == ("__init__.py",) else rel.with_suffix("").parts[0]


def test_every_module_has_a_layer():
    unknown = sorted({_module_top(p) for p in PKG.rglob("*.py")} - set(RANK))
    assert not unknown, f"add these to LAYERS here and in docs/architecture.md: {unknown}"


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for p in sorted(PKG.rglob("*.py")):
        mine = RANK[_module_top(p)]
        for line, mod in _imports(p):
            t = _top(mod)
            if t is not None and t in RANK and RANK[t] > mine:
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {mod} (layer {RANK[t]} > {mine})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: a function-level relative import two packages up is resolved and counted."""
    probe = tmp_path / "peftdeploy" / "plan" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from ..commands import plan_cmd\n    from . import memory\n"
                     "    import peftdeploy.launch.local\n    from .. import cli\n")
    got = _imports(probe, root=tmp_path)
    assert got == [(2, "peftdeploy.commands"), (3, "peftdeploy.plan.memory"), (4, "peftdeploy.launch.local"),
                   (5, "peftdeploy.cli")], got


def test_architecture_doc_lists_the_same_layers():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for _, mods in LAYERS:
        for m in mods - {"__init__"}:
            assert f"`{m}" in doc, f"docs/architecture.md does not name {m}"
