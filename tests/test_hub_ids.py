"""Hub model ids as vLLM and huggingface_hub users write them (issue 17): `org/repo`, `hf://org/repo@rev`,
short commit shas, huggingface_hub's own cache API, `hf download` in fixes, the resolved commit in
plan's "follows branch" finding."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubcache import LLAMA3_8B, prefill_repo, write_adapter, write_model
from peftdeploy.cli import main
from peftdeploy.errors import RecipeError, SourceError
from peftdeploy.recipe import load_recipe
from peftdeploy.sources import cached_snapshot, resolve

REPO = "meta-llama/Llama-3.1-8B-Instruct"
ADAPTER = "acme-ai/llama3-8b-billing-lora"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    model = write_model(tmp_path / "src" / "model", {**LLAMA3_8B, "_name_or_path": REPO})
    prefill_repo(cache, REPO, model)  # main -> sha1(repo@main)
    prefill_repo(cache, REPO, model, revision="v1", commit=SHA)
    ad = write_adapter(tmp_path / "src" / "adapter", LLAMA3_8B, r=8, layers=[0], base_model=REPO)
    prefill_repo(cache, ADAPTER, ad)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _recipe(tmp: Path, body: str) -> Path:
    p = tmp / "recipes" / "r.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("apiVersion: peftdeploy/v1\nname: t\n" + body)
    return p


def test_bare_org_repo_is_a_hub_id_when_no_such_path(tmp_path: Path, hub: Path) -> None:
    p = _recipe(tmp_path, f"backbone: {{model: {REPO}}}\nadapters: [{{name: a, source: {ADAPTER}}}]\n")
    loaded = load_recipe(p)
    assert loaded.recipe.backbone.model == f"hf://{REPO}"
    assert loaded.recipe.adapters[0].source == f"hf://{ADAPTER}"
    assert any(f"read as the hub id hf://{REPO}" in n and "r.yaml:3" in n for n in loaded.notes)
    rr = resolve(loaded, offline=True)
    assert rr.backbone.kind == "hf" and rr.backbone.path is not None and rr.adapters[0].source.path is not None
    # validate says which was chosen; plan plans it (no "missing local path")
    r = CliRunner().invoke(main, ["validate", str(p)])
    assert r.exit_code == 0 and f"read as the hub id hf://{REPO}" in r.output
    r = CliRunner().invoke(main, ["plan", str(p), "--device", "cuda", "--gpu-memory", "80GiB"])
    assert r.exit_code == 0, r.output
    assert "does not exist" not in r.output


def test_bare_org_repo_prefers_an_existing_local_dir(tmp_path: Path, hub: Path) -> None:
    p = _recipe(tmp_path, "backbone: {model: models/llama}\n")
    write_model(p.parent / "models" / "llama", LLAMA3_8B)
    loaded = load_recipe(p)
    assert loaded.recipe.backbone.model == str(p.parent / "models" / "llama")
    assert any("read as the local path" in n and "hf://models/llama" in n for n in loaded.notes)


def test_at_revision_and_conflict(tmp_path: Path, hub: Path) -> None:
    p = _recipe(tmp_path, f"backbone: {{model: 'hf://{REPO}@v1'}}\n")
    loaded = load_recipe(p)
    assert loaded.recipe.backbone.model == f"hf://{REPO}" and loaded.recipe.backbone.revision == "v1"
    assert resolve(loaded, offline=True).backbone.commit == SHA
    p = _recipe(tmp_path, f"backbone: {{model: '{REPO}@{SHA[:7]}'}}\n")  # bare id with @short-sha
    loaded = load_recipe(p)
    assert loaded.recipe.backbone.revision == SHA[:7]
    rr = resolve(loaded, offline=True)
    assert rr.backbone.commit == SHA and rr.backbone.path is not None and rr.backbone.path.name == SHA
    p = _recipe(tmp_path, f"backbone: {{model: 'hf://{REPO}@v1', revision: main}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "two revisions" in e.value.message and "r.yaml:3" in str(e.value.location)


def test_short_sha_resolves_from_the_cache(hub: Path) -> None:
    snap, commit = cached_snapshot(REPO, SHA[:8])
    assert commit == SHA and snap.name == SHA
    assert cached_snapshot(REPO, "v1")[1] == SHA
    assert cached_snapshot(REPO, "deadbeef") is None
    assert cached_snapshot("nobody/nothing", None) is None


def test_cache_api_honours_an_incomplete_tree_listing(hub: Path) -> None:
    """huggingface_hub's cache check (not a hand-written refs/ reader): a snapshot its cached tree
    listing says is incomplete is not used."""
    from huggingface_hub import _tree_cache

    root = hub / f"models--{REPO.replace('/', '--')}"
    if not hasattr(_tree_cache, "write_tree_cache"):
        pytest.skip("this huggingface_hub has no tree cache")
    folder = str(root)  # the repo's storage folder (huggingface_hub/_snapshot_download.py: tree_cache_folder)
    entry = _tree_cache.TreeCacheEntry(size=10, blob_id="x" * 40, lfs_sha256=None, lfs_size=None, xet_hash=None)
    _tree_cache.write_tree_cache(folder, SHA, {"config.json": entry, "model-00001.safetensors": entry})
    assert cached_snapshot(REPO, "v1") is None
    assert cached_snapshot(REPO, "v1", patterns=["config.json"]) is not None


def test_fixes_say_hf_download(tmp_path: Path, hub: Path) -> None:
    p = _recipe(tmp_path, "backbone: {model: nobody/not-cached}\nadapters: [{name: a, source: hf://nobody/ad}]\n")
    with pytest.raises(SourceError) as e:
        resolve(load_recipe(p), offline=True)
    assert "`hf download nobody/ad`" in e.value.fix and "huggingface-cli" not in e.value.fix
    p = _recipe(tmp_path, "backbone: {model: nobody/not-cached, revision: v2}\n")
    r = CliRunner().invoke(main, ["plan", str(p), "--json", "--device", "cpu"])
    f = json.loads(r.output)["findings"][0]
    assert f["code"] == "backbone-unavailable" and "hf download nobody/not-cached config.json --revision v2" in f["fix"]


def test_follows_branch_prints_the_commit(tmp_path: Path, hub: Path) -> None:
    p = _recipe(tmp_path, f"backbone: {{model: {REPO}, revision: v1}}\n")
    r = CliRunner().invoke(main, ["plan", str(p), "--json", "--device", "cuda", "--gpu-memory", "80GiB"])
    f = [x for x in json.loads(r.output)["findings"] if x["code"] == "revision-unpinned"][0]
    assert f"follows branch 'v1' (now commit {SHA})" in f["message"] and f"revision: {SHA}" in f["fix"]
