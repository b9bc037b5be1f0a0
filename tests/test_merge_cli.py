"""`peftdeploy merge RECIPE`: the command a user (or a cluster's init container) runs to build the
merged — and, for offline schemes, quantized — checkpoint that `up` / the rendered manifests serve."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from tests.conftest import cli_env, peftdeploy_cmd  # noqa: E402
from tests.tiny import build_tiny_llama, build_tiny_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("merge-cli")
    model = build_tiny_llama(d / "model")
    return {"model": model, "a": build_tiny_lora(model, d / "a", r=8, seed=1), "b": build_tiny_lora(model, d / "b", r=4, seed=2)}


def _recipe(tmp: Path, tiny: dict[str, Path], body: str) -> Path:
    p = tmp / "r.yaml"
    p.write_text(textwrap.dedent(f"""\
        apiVersion: peftdeploy/v1
        name: tiny-merge
        backbone: {{model: {tiny['model']}, dtype: float32, max_model_len: 128}}
        adapters:
          - {{name: a, source: {tiny['a']}}}
          - {{name: b, source: {tiny['b']}}}
        """) + textwrap.dedent(body))
    return p


def _merge(recipe: Path, cache: Path, *extra: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**cli_env(), "PEFTDEPLOY_CACHE": str(cache), **env_extra}
    return subprocess.run(peftdeploy_cmd("merge", str(recipe), "--device", "cpu", *extra), env=env,
                          capture_output=True, text=True, timeout=600)


def test_merge_writes_the_planned_dir_then_hits_cache(tiny, tmp_path):
    rec = _recipe(tmp_path, tiny, "policy: {mode: merge, merge: {adapters: [a]}}\n")
    cache = tmp_path / "cache"
    p = _merge(rec, cache)
    assert p.returncode == 0, p.stderr
    out = Path(p.stdout.strip())
    assert out.is_dir() and str(out).startswith(str(cache))
    assert "merge: a into" in p.stderr and "merge: done" in p.stderr
    # the merged weights are W + s·B·A of adapter a (and not b)
    w0 = load_file(str(tiny["model"] / "model.safetensors"))
    w1 = {}
    for f in out.glob("*.safetensors"):
        w1.update(load_file(str(f)))
    ad = load_file(str(tiny["a"] / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    A = ad[f"base_model.model.{key[:-len('.weight')]}.lora_A.weight"]
    B = ad[f"base_model.model.{key[:-len('.weight')]}.lora_B.weight"]
    torch.testing.assert_close(w1[key], w0[key] + (16 / 8) * B @ A, rtol=1e-6, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    # same command again: a cache hit, same directory, --json for scripts
    p2 = _merge(rec, cache, "--json")
    assert p2.returncode == 0, p2.stderr
    info = json.loads(p2.stdout)
    assert info["ok"] and info["cache_hit"] and info["served_dir"] == str(out) and info["adapters"] == ["a"]
    # and `up --dry-run` serves exactly that directory
    d = subprocess.run(peftdeploy_cmd("up", str(rec), "--dry-run", "--device", "cpu"),
                       env={**cli_env(), "PEFTDEPLOY_CACHE": str(cache)}, capture_output=True, text=True)
    assert d.returncode == 0, d.stderr
    assert f"serve {out} " in d.stdout


def test_merge_quantized_scheme_serves_the_quantized_dir(tiny, tmp_path):
    pytest.importorskip("compressed_tensors")
    out_dir = tmp_path / "out" / "merged"
    # rtn: the layout is the subject; GPTQ (auto's choice when .venv-quantize exists) is test_quantize_llmc's
    rec = _recipe(tmp_path, tiny, f"quantization: {{scheme: int8, method: rtn}}\n"
                                  f"policy: {{mode: merge, merge: {{adapters: [a, b], output: {out_dir}}}}}\n")
    # planned for an AMX CPU, where `up` would refuse float32 int8 (vLLM's kernel there takes bf16/fp16):
    # merge still builds the float32-merged checkpoint (it may be served elsewhere) and says so
    amx = ("fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 "
           "amx_bf16 amx_tile amx_int8")
    p = _merge(rec, tmp_path / "cache", "--json", PEFTDEPLOY_CPU_FLAGS=amx)
    assert p.returncode == 0, p.stderr
    assert "`peftdeploy up` on this host would refuse" in p.stderr and "quantization-cpu-dtype" in p.stderr
    info = json.loads(p.stdout)
    # the full-precision merge at the recipe's output, the int8 checkpoint next to it (what vLLM serves)
    assert info["merged_dir"] == str(out_dir) and info["served_dir"] == f"{out_dir}-int8"
    qcfg = json.loads((Path(info["served_dir"]) / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert "quantization_config" not in json.loads((out_dir / "config.json").read_text())


def test_merge_of_a_serve_recipe_is_a_user_error(tiny, tmp_path):
    rec = _recipe(tmp_path, tiny, "policy: {mode: serve}\n")
    p = _merge(rec, tmp_path / "cache")
    assert p.returncode == 2
    assert "nothing to merge" in p.stderr and "fix:" in p.stderr and "Traceback" not in p.stderr


def test_merge_command_is_registered():
    p = subprocess.run([sys.executable, "-m", "peftdeploy.cli", "merge", "--help"], capture_output=True, text=True,
                       env=cli_env())
    assert p.returncode == 0 and "full precision" in p.stdout
