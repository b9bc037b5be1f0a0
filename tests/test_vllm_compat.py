"""The names peftdeploy imports from vLLM exist in every supported vLLM (issue 16, item 5).

The plugin failed to register on vLLM 0.26 (`cannot import name 'GracefulHTTPError'`), so every catalog
adapter was a 404. This reads peftdeploy's vLLM-facing modules (vllm_plugin/, launch/) and checks each
``from vllm.X import name`` / ``import vllm.X`` against a vLLM source tree, statically: the installed
vLLM (0.32 CPU in CI), and the 0.26 sources (tests/vllm026.py: extracted from ../shared/gpu, or
``PEFTDEPLOY_VLLM026_SRC``). Imports inside ``try:`` blocks are feature-detected and not required.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted([*(ROOT / "peftdeploy" / "vllm_plugin").rglob("*.py"), *(ROOT / "peftdeploy" / "launch").glob("*.py")])


def vllm_imports() -> list[tuple[str, int, str, str | None]]:
    """(file, line, module, name or None) for every vLLM import outside a try block."""
    out = []
    for f in MODULES:
        tree = ast.parse(f.read_text())
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try):
                for sub in node.body:
                    guarded |= {id(n) for n in ast.walk(sub)}
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            rel = str(f.relative_to(ROOT))
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    (node.module == "vllm" or node.module.startswith("vllm.")):
                out += [(rel, node.lineno, node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                out += [(rel, node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "vllm"]
    return out


def _module_file(root: Path, module: str) -> Path | None:
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _defines(path: Path, name: str) -> bool:
    text = path.read_text()
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
    return f'"{name}":' in text  # vllm/__init__.py's lazy import table (e.g. "LLM": ".entrypoints.llm:LLM")


def missing(root: Path) -> list[str]:
    bad = []
    for rel, line, module, name in vllm_imports():
        f = _module_file(root, module)
        if f is None:
            bad.append(f"{rel}:{line}: module {module} does not exist")
        elif name is not None and _module_file(root, f"{module}.{name}") is None and not _defines(f, name):
            bad.append(f"{rel}:{line}: {module} has no {name}")
    return bad


def test_the_checker_sees_the_plugin_imports() -> None:
    found = {(m, n) for _, _, m, n in vllm_imports()}
    assert ("vllm.lora.resolver", "LoRAResolverRegistry") in found and ("vllm.lora.request", "LoRARequest") in found
    assert not any(n == "GracefulHTTPError" for _, n in found)  # moved between releases: feature-detected


def test_installed_vllm_has_every_imported_name() -> None:
    vllm = pytest.importorskip("vllm")
    assert missing(Path(vllm.__file__).parent) == []


def test_vllm_026_sources_have_every_imported_name() -> None:
    from tests import vllm026

    tree = vllm026.tree()
    if tree is None:
        pytest.skip(f"no vLLM 0.26 site in {vllm026.GPU} (or PEFTDEPLOY_VLLM026_SRC)")
    assert missing(tree / "vllm") == []


def test_http_error_without_graceful_http_error(monkeypatch) -> None:
    """On a vLLM without GracefulHTTPError (0.26) a 503 is Starlette's HTTPException, which vLLM answers with
    its status; with it (0.32) it is GracefulHTTPError."""
    vx = pytest.importorskip("vllm.exceptions")
    from starlette.exceptions import HTTPException

    from peftdeploy.vllm_plugin.resolver import FetchFailed, to_vllm_exception

    if hasattr(vx, "GracefulHTTPError"):
        assert isinstance(to_vllm_exception(FetchFailed("x")), vx.GracefulHTTPError)
        monkeypatch.delattr(vx, "GracefulHTTPError")
    e = to_vllm_exception(FetchFailed("hub down"))
    assert isinstance(e, HTTPException) and e.status_code == 503 and "hub down" in e.detail
