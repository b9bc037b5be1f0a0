"""resolve + inspect: metadata only (config.json, adapter_config.json, safetensors headers); offline hub cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hubcache import LLAMA3_8B, QWEN25_7B, TINY_LLAMA, prefill_repo, write_adapter, write_model
from peftdeploy.errors import SourceError
from peftdeploy.inventory import inspect, inspect_adapter, model_info_from_config, read_safetensors_header
from peftdeploy.recipe import load_recipe
from peftdeploy.sources import ResolvedSource, resolve, resolve_adapter_source
from peftdeploy.util import sha256_file


def _recipe(tmp: Path, body: str) -> Path:
    p = tmp / "recipe.yaml"
    p.write_text("apiVersion: peftdeploy/v1\nname: t\n" + body)
    return p


def test_safetensors_header_and_model_info(tmp_path: Path) -> None:
    d = write_model(tmp_path / "m", TINY_LLAMA, weights=True)
    hdr = read_safetensors_header(d / "model.safetensors")
    assert hdr["model.layers.0.self_attn.q_proj.weight"]["shape"] == [64, 64]
    from peftdeploy.inventory import inspect_model

    info = inspect_model(ResolvedSource(str(d), "local", d))
    assert not info.weights_estimated and info.weights_from == "safetensors"
    data_bytes = (d / "model.safetensors").stat().st_size - 8 - int.from_bytes(
        (d / "model.safetensors").read_bytes()[:8], "little")
    assert info.weight_bytes == data_bytes
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (2, 4, 2, 16)
    assert info.tie_word_embeddings and info.lm_head_params == 0
    # the estimate from config.json agrees with the real count for a Llama layout
    est = model_info_from_config(TINY_LLAMA, path=None, source="x")
    assert est.weights_estimated and est.total_params == info.total_params


def test_estimate_llama3_8b_params() -> None:
    info = model_info_from_config(LLAMA3_8B, path=None, source="hf://meta-llama/Meta-Llama-3-8B-Instruct")
    assert abs(info.total_params - 8_030_261_248) / 8_030_261_248 < 0.001
    q = model_info_from_config(QWEN25_7B, path=None, source="q")
    assert abs(q.total_params - 7_615_616_512) / 7_615_616_512 < 0.001


def test_inspect_adapter_ranks_targets(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", TINY_LLAMA, r=8, targets=("q_proj", "v_proj", "down_proj"),
                      rank_pattern={"down_proj": 12}, dtype=np.float32, embedding=True)
    info = inspect_adapter("a", a, source=str(a))
    assert info.r == 8 and info.max_rank == 12
    assert info.module_ranks["down_proj"] == 12
    assert set(info.target_modules) == {"q_proj", "v_proj", "down_proj", "embed_tokens"}
    assert info.embedding_lora and info.format == "safetensors" and info.dtype == "F32"
    assert info.layers == (0, 1)


def test_local_missing_source_points_at_recipe_line(tmp_path: Path) -> None:
    write_model(tmp_path / "m", TINY_LLAMA, weights=True)
    p = _recipe(tmp_path, "backbone: {model: ./m}\nadapters:\n  - name: a\n    source: ./nope\n")
    with pytest.raises(SourceError) as ei:
        resolve(load_recipe(p))
    e = ei.value
    assert "does not exist" in e.message and e.fix
    assert e.location.line == 6 and e.location.file.endswith("recipe.yaml")
    assert e.location.path == "adapters[0].source"


def test_sha256_mismatch_names_both(tmp_path: Path) -> None:
    write_model(tmp_path / "m", TINY_LLAMA, weights=True)
    a = write_adapter(tmp_path / "a", TINY_LLAMA)
    real = sha256_file(a / "adapter_model.safetensors")
    bad = "0" * 64
    p = _recipe(tmp_path, f"backbone: {{model: ./m}}\nadapters:\n  - {{name: a, source: ./a, sha256: '{bad}'}}\n")
    with pytest.raises(SourceError) as ei:
        resolve(load_recipe(p))
    assert real in ei.value.message and bad in ei.value.message
    p.write_text(p.read_text().replace(bad, real))
    rr = resolve(load_recipe(p))
    assert rr.adapters[0].sha256 == real


def test_resolve_adapter_source_refuses_pickle(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", TINY_LLAMA, pickle=True)
    with pytest.raises(SourceError, match="pickle"):
        resolve_adapter_source(str(a))
    assert resolve_adapter_source(str(a), allow_pickle=True) == a.resolve()


def test_hub_offline_prefilled_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    m = write_model(tmp_path / "src_m", TINY_LLAMA, weights=True)
    a = write_adapter(tmp_path / "src_a", {**TINY_LLAMA, "_name_or_path": "org/tiny"}, r=8)
    prefill_repo(cache, "org/tiny", m)
    prefill_repo(cache, "org/tiny-lora", a, revision="main")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = _recipe(tmp_path, "backbone: {model: hf://org/tiny, revision: main}\n"
                          "adapters:\n  - {name: a, source: hf://org/tiny-lora}\n")
    rr = resolve(load_recipe(p))
    assert rr.offline and rr.backbone.path is not None and rr.backbone.commit
    inv = inspect(rr)
    assert inv.model is not None and inv.model.hidden_size == 64 and not inv.model.weights_estimated
    assert inv.adapters[0].r == 8
    from peftdeploy.plan import make_plan

    plan = make_plan(load_recipe(p), device="cpu")
    assert plan.ok, [f.to_dict() for f in plan.errors]
    assert plan.launch.model == str(rr.backbone.path)
    # a repo that is not cached: backbone unavailable (a finding), not an exception
    p2 = _recipe(tmp_path, "backbone: {model: hf://org/absent}\n")
    plan2 = make_plan(load_recipe(p2), device="cpu")
    assert [f.code for f in plan2.errors] == ["backbone-unavailable"]
    assert "offline" in plan2.errors[0].message and "pre-download" in plan2.errors[0].fix
    # an adapter that is not cached is a SourceError with the recipe location
    p3 = _recipe(tmp_path, "backbone: {model: hf://org/tiny}\nadapters:\n  - {name: b, source: hf://org/absent-lora}\n")
    with pytest.raises(SourceError) as ei:
        resolve(load_recipe(p3))
    assert ei.value.location and ei.value.location.line == 5


def test_s3_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "pd"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_model(tmp_path / "m", TINY_LLAMA, weights=True)
    write_adapter(tmp_path / "pd" / "s3" / "bucket" / "x" / "a", TINY_LLAMA)
    p = _recipe(tmp_path, "backbone: {model: ./m}\nadapters:\n  - {name: a, source: s3://bucket/x/a}\n")
    rr = resolve(load_recipe(p))
    assert rr.adapters[0].path == tmp_path / "pd" / "s3" / "bucket" / "x" / "a"


def test_no_torch_imported_by_inspect_modules() -> None:
    import subprocess
    import sys

    code = ("import sys, peftdeploy.sources, peftdeploy.inventory, peftdeploy.plan, peftdeploy.commands.plan_cmd; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','vllm','transformers')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr



