"""The plugin against vLLM 0.26.0's own Python code (the release the GPU benchmarks run on), in CI.

vLLM 0.26 only installs on the GPU machine (CPython 3.12, CUDA 13), but the plugin's registration path
touches pure-Python modules only (``vllm.lora.resolver``, ``vllm.lora.request``, ``vllm.exceptions``,
``vllm.platforms``). The release's site directory ships in ``../shared/gpu`` (two xz parts); its ``.py``
files are extracted once into the peftdeploy cache and put first on ``PYTHONPATH`` of a child process, which
then registers the plugin with a dynamic-loading recipe and resolves a known and an unknown adapter name
through the resolver vLLM 0.26 would call. Skipped where ``../shared/gpu`` is absent.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import vllm026 as V
from tests.hubcache import TINY_LLAMA, write_adapter, write_model

ROOT = V.ROOT


@pytest.fixture(scope="module")
def vllm026() -> Path:
    root = V.tree()
    if root is None:
        pytest.skip(f"no vLLM 0.26 site in {V.GPU}")
    return root


CHILD = r'''
import asyncio, json, os, sys
import vllm
assert vllm.__version__ == "0.26.0" and vllm.__file__.startswith(os.environ["V026"]), (vllm.__version__, vllm.__file__)
from peftdeploy import vllm_plugin as plugin
plugin.register()
from vllm.lora.resolver import LoRAResolverRegistry as R
out = {"resolvers": sorted(R.get_supported_resolvers())}
r = R.get_resolver("peftdeploy")
req = asyncio.run(r.resolve_lora(sys.argv[1], "good"))
out["good"] = [type(req).__module__, req.lora_name, os.path.basename(req.lora_path)]
for name in ("nope", "BAD NAME"):
    try:
        asyncio.run(r.resolve_lora(sys.argv[1], name))
        out[name] = None
    except Exception as e:
        out[name] = [type(e).__module__, type(e).__name__, str(e)[:200]]
print("RESULT " + json.dumps(out))
'''


def test_plugin_registers_and_resolves_on_vllm_026(vllm026: Path, tmp_path: Path) -> None:
    import yaml

    base = {**TINY_LLAMA, "_name_or_path": "acme/tiny-llama"}
    write_model(tmp_path / "base", base, weights=True)
    write_adapter(tmp_path / "ads" / "good", base, r=8, base_model="acme/tiny-llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "apiVersion": "peftdeploy/v1", "name": "plugin-026", "backbone": {"model": "./base"},
        "adapters": [{"name": "good", "source": "./ads/good"}],
        "policy": {"mode": "serve", "dynamic_loading": True}, "serving": {"max_lora_rank": 16}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFTDEPLOY_")}
    env.update(V026=str(vllm026), PYTHONPATH=f"{vllm026}{os.pathsep}{ROOT}", PEFTDEPLOY_RECIPE=str(recipe),
               PEFTDEPLOY_CACHE=str(tmp_path / "pdcache"), PEFTDEPLOY_ADAPTER_CACHE_DIR=str(tmp_path / "adcache"),
               VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "base")], env=env, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    res = next((json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert res is not None, f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert "peftdeploy" in res["resolvers"]
    assert res["good"] == ["vllm.lora.request", "good", "good"]
    # an unknown name and an invalid one are client errors of vLLM 0.26's own kinds, not an ImportError
    for name in ("nope", "BAD NAME"):
        mod, cls, msg = res[name]
        assert mod == "vllm.exceptions" and cls.startswith("VLLM"), res[name]


def test_gemm_fusion_hooks_exist_in_vllm_026(vllm026: Path) -> None:
    """gemm_fused.py converts vLLM's linear LoRA layers by name and routes them through `_apply_sync`, hooked
    at `set_mapping`; read from vLLM 0.26's source (the release the GPU runs use) that those are the names and
    that the plain layers' apply() reaches `_apply_sync` (a subclass with its own forward does not: it is not
    in gemm_fused.BASE_LAYERS)."""
    from peftdeploy.vllm_plugin.lora_kernels import gemm_fused as G

    layers = vllm026 / "vllm" / "lora" / "layers"
    src = {p.name: p.read_text() for p in layers.glob("*.py")}
    every = "\n".join(src.values())
    for cls in G.LORA_LAYERS:
        assert f"class {cls}(" in every, cls
    base_linear = src["base_linear.py"]
    assert "def _apply_sync(" in base_linear and "return self._apply_sync(x, bias)" in base_linear
    assert "def set_mapping(" in src["base.py"] and "def create_lora_weights(" in base_linear
    col = src["column_parallel_linear.py"]
    merged_apply = col[col.index("class MergedColumnParallelLinearWithLoRA("):]
    merged_apply = merged_apply[merged_apply.index("    def apply("):][:1200]
    assert "return super().apply(x, bias)" in merged_apply and "_apply_base_forward" in merged_apply
    linear = (vllm026 / "vllm" / "model_executor" / "layers" / "linear.py").read_text()
    for cls in G.BASE_LAYERS:
        assert f"class {cls}(" in linear, cls


def test_act_and_norm_fusion_shapes_hold_in_vllm_026(vllm026: Path) -> None:
    """act_fused.py and norm_fused.py replace modules by name and rely on the forward of vLLM's Llama / Qwen2
    decoders: gate_up → act_fn → down_proj in the MLP, o_proj's output straight into the post-attention norm,
    a layer's output (down_proj's) straight into the next layer's input norm or the model's final norm, and
    the hook after LoRAModelManager._create_lora_modules; read from vLLM 0.26's source that this is so."""
    from peftdeploy.vllm_plugin.lora_kernels import act_fused as A
    from peftdeploy.vllm_plugin.lora_kernels import norm_fused as N

    models = vllm026 / "vllm" / "model_executor" / "models"
    for file, prefix in (("llama.py", "Llama"), ("qwen2.py", "Qwen2")):
        src = (models / file).read_text()
        assert f"{prefix}MLP" in A.MLP_CLASSES and f"{prefix}DecoderLayer" in N.DECODER_CLASSES
        mlp = src[src.index(f"class {prefix}MLP("):]
        mlp = mlp[mlp.index("    def forward("):][:400]
        assert re.search(r"(\w+), _ = self\.gate_up_proj\(x\)\n\s+x = self\.act_fn\(\1\)\n\s+x, _ = self\.down_proj\(x\)",
                         mlp), (file, mlp)
        dec = src[src.index(f"class {prefix}DecoderLayer("):]
        dec = dec[dec.index("    def forward("):][:1200]
        for line in ("hidden_states, residual = self.input_layernorm(hidden_states, residual)",
                     "hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)",
                     "hidden_states = self.mlp(hidden_states)\n        return hidden_states, residual"):
            assert line in dec, (file, line)
        assert "output, _ = self.o_proj(attn_output)\n        return output" in src, file
        model = src[src.index(f"class {prefix}Model("):]
        model = model[model.index("    def forward("):][:2500]
        assert "hidden_states, _ = self.norm(hidden_states, residual)" in model, file
        assert "islice(self.layers, self.start_layer, self.end_layer)" in model, file
    norm = (vllm026 / "vllm" / "model_executor" / "layers" / "layernorm.py").read_text()
    rms = norm[norm.index("class RMSNorm("):norm.index("class GemmaRMSNorm(")]
    for attr in ("self.variance_epsilon = eps", "self.variance_size_override", "self.has_weight = has_weight"):
        assert attr in rms, attr
    assert "def _create_lora_modules(self)" in (vllm026 / "vllm" / "lora" / "model_manager.py").read_text()
