"""`peftdeploy lock RECIPE` and `up --locked` (issue 17): hub revisions -> commits, adapter sha256s (the hub's LFS
sha256 from the cache where it has one), peftdeploy / vLLM versions; anything drifted refuses to run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubcache import TINY_LLAMA, prefill_repo, write_adapter, write_model
from peftdeploy.cli import main

REPO = "acme/tiny-llama"
AD = "acme/tiny-lora"


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    cache = tmp_path / "hub"
    model = write_model(tmp_path / "m", {**TINY_LLAMA, "_name_or_path": REPO}, weights=True)
    prefill_repo(cache, REPO, model)
    ad = write_adapter(tmp_path / "a", TINY_LLAMA, r=8, base_model=REPO)
    prefill_repo(cache, AD, ad)
    local = write_adapter(tmp_path / "recipes" / "local-ad", TINY_LLAMA, r=4, base_model=REPO)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "pd"))
    recipe = tmp_path / "recipes" / "prod.yaml"
    recipe.write_text(f"apiVersion: peftdeploy/v1\nname: prod\nbackbone: {{model: {REPO}}}\n"
                      f"adapters:\n  - {{name: hub, source: {AD}}}\n  - {{name: mine, source: ./local-ad}}\n"
                      "policy: {mode: serve}\n")
    return {"cache": cache, "recipe": recipe, "model": model, "local": local, "ad": ad}


def _up_locked(recipe: Path) -> "object":
    return CliRunner().invoke(main, ["up", str(recipe), "--locked", "--dry-run", "--device", "cpu"])


def test_lock_pins_commits_and_sha256(setup: dict[str, Path]) -> None:
    r = CliRunner().invoke(main, ["lock", str(setup["recipe"])])
    assert r.exit_code == 0, r.output
    lock = json.loads((setup["recipe"].parent / "prod.lock.json").read_text())
    main_commit = hashlib.sha1(f"{REPO}@main".encode()).hexdigest()  # what hubcache.prefill_repo names it
    assert lock["backbone"] == {"spec": f"hf://{REPO}", "kind": "hf", "revision": "main", "commit": main_commit}
    want = hashlib.sha256((setup["ad"] / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert lock["adapters"]["hub"]["sha256"] == want and lock["adapters"]["hub"]["sha256_from"] == "hub-lfs"
    assert lock["adapters"]["mine"]["sha256_from"] == "computed"
    assert lock["peftdeploy"] and "vllm" in lock
    assert f"-> {main_commit}" in r.output
    r = _up_locked(setup["recipe"])
    assert r.exit_code == 0, r.output


def test_up_locked_refuses_drift(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    r = _up_locked(setup["recipe"])
    assert r.exit_code == 2 and "no lock file" in r.output and "peftdeploy lock" in r.output
    assert CliRunner().invoke(main, ["lock", str(setup["recipe"])]).exit_code == 0
    # main moved on the hub; the local adapter was retrained; another vLLM is installed
    prefill_repo(setup["cache"], REPO, setup["model"], commit="f" * 40)
    write_adapter(setup["local"], TINY_LLAMA, r=4, base_model=REPO, dtype=__import__("numpy").float32)
    import peftdeploy.plan.kernels as k

    monkeypatch.setattr(k, "installed_vllm_version", lambda: "9.9.9")
    r = _up_locked(setup["recipe"])
    assert r.exit_code == 2, r.output
    assert "3 thing(s) drifted" in r.output
    assert f"backbone: hf://{REPO}@{'f' * 40}" in r.output
    assert "adapter 'mine': adapter_model.safetensors sha256" in r.output
    assert "vLLM 9.9.9" in r.output and "Traceback" not in r.output


def test_lock_in_place_pins_the_recipe_keeping_its_layout(setup: dict[str, Path]) -> None:
    recipe = setup["recipe"]
    recipe.write_text(f"# prod recipe\napiVersion: peftdeploy/v1\nname: prod\nbackbone:\n  model: {REPO}   # the base\n"
                      f"  dtype: float32\nadapters:\n  - name: hub\n    source: 'hf://{AD}@main'\n"
                      "  - {name: mine, source: ./local-ad}\npolicy: {mode: serve}\n")
    r = CliRunner().invoke(main, ["lock", str(recipe), "--in-place"])
    assert r.exit_code == 0, r.output
    text = recipe.read_text()
    main_commit = hashlib.sha1(f"{REPO}@main".encode()).hexdigest()
    ad_commit = hashlib.sha1(f"{AD}@main".encode()).hexdigest()
    assert text.startswith("# prod recipe\n") and "# the base" in text
    assert f"  model: {REPO}   # the base\n  revision: {main_commit}\n" in text
    assert f"    source: 'hf://{AD}'\n    revision: {ad_commit}\n    sha256: " in text
    assert "  - {name: mine, source: ./local-ad, sha256: " in text
    from peftdeploy.recipe import load_recipe

    rec = load_recipe(recipe).recipe
    assert rec.backbone.revision == main_commit and rec.adapters[0].revision == ad_commit
    assert all(a.sha256 for a in rec.adapters)
    # pinned: plan no longer warns that the backbone follows a branch; a second run has nothing to pin
    r = CliRunner().invoke(main, ["plan", str(recipe), "--device", "cpu", "--json"])
    assert "revision-unpinned" not in r.output
    r = CliRunner().invoke(main, ["lock", str(recipe), "--in-place"])
    assert r.exit_code == 0 and "nothing to pin" in r.output, r.output
