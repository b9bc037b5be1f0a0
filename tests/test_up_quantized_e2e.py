"""Slow (CPU vLLM with the demo assets): `up --detach` of the offline-quantized merge recipes (issue 6),
demo-int8 and demo-w4a16, answers through the OpenAI API.

Moved from tests/test_hybrid.py (same assertions); in the e2e-serve xdist group (conftest) like it, because
its `up`s share the merged pirate cache entry with test_up_e2e's merged deployments. Each recipe is served as the repo ships it, with
``serving.extra_args: {enforce_eager: true}`` added: what is checked is that the quantized checkpoint
`up` materializes serves and answers (and carries LoRA adapters for w4a16), not vLLM's compile of the
model, which costs 45-90 s per start here (compiled serving: test_lora_kernels_cpu, e2e-serve, test_hybrid).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, peftdeploy_cmd


def _client(dep):
    from openai import OpenAI

    return OpenAI(base_url=dep.base_url, api_key="EMPTY", max_retries=0, timeout=300)


def _eager(recipe: Path, tmp: Path) -> Path:
    """`recipe` (its name, model, adapters and serving) with vLLM's --enforce-eager."""
    p = tmp / recipe.name
    p.write_text(f"apiVersion: peftdeploy/v1\nextends: {recipe}\nserving: {{extra_args: {{enforce_eager: true}}}}\n")
    return p


@pytest.mark.slow
def test_up_quantized_merges_answer_openai(e2e_up, demo_model_dir, tmp_path):
    """Issue 6: the int8 (W8A8) and w4a16 merged checkpoints serve in CPU vLLM through `up` and answer
    through the OpenAI API (one server at a time; tests/test_quantize.py measures their perplexity).

    demo-int8.yaml keeps only the merged `pirate`: vLLM 0.32's CPU int8 kernel
    (CPUInt8ScaledMMLinearKernel) drops the layer's `weight`, and vLLM's LoRA wrapper then fails at
    start-up in _get_lora_device ('NoneType' object has no attribute 'device'); plan reports that as
    the quantization-lora error. w4a16 keeps `weight_packed`, so demo-w4a16.yaml serves its LoRA
    adapters on top of the quantized merged model.
    """
    from tests.fixtures_demo import is_json, is_pirate

    from peftdeploy.quantize.cpu_isa import host_cpu_isa

    isa = host_cpu_isa()
    no_w4 = isa.missing_kernel("w4a16") if isa is not None else None
    if no_w4:  # an AVX2 host: vLLM's CPU build there has no 4-bit kernel; up refuses before starting anything
        p = subprocess.run(peftdeploy_cmd("up", str(ROOT / "recipes" / "demo-w4a16.yaml"), "--detach"),
                           env=cli_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 2 and "cannot run on this machine" in p.stderr and "Traceback" not in p.stderr, \
            p.stderr[-3000:]
    for recipe, scheme in ((ROOT / "recipes" / "demo-int8.yaml", "int8"), (ROOT / "recipes" / "demo-w4a16.yaml", "w4a16")):
        if scheme == "w4a16" and no_w4:
            continue
        dep = e2e_up(_eager(recipe, tmp_path))
        try:
            q = dep.info["merge"]["quantize"]
            assert q["scheme"] == scheme
            cfg = json.loads((Path(q["path"]) / "config.json").read_text())
            assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
            c = _client(dep)
            assert dep.info["base_model"] in {m.id for m in c.models.list().data}
            r = c.chat.completions.create(model=dep.info["base_model"], temperature=0, max_tokens=40,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
            text = r.choices[0].message.content or ""
            print(f"\n{dep.name}: {text!r}")
            assert text.strip()
            assert is_pirate(text), text  # the merged pirate adapter survives quantization
            if scheme == "int8":
                assert "paris" in text.lower(), text  # and int8 keeps the answer right
            if "json" in dep.models:  # a LoRA adapter served on top of the quantized merged model
                r = c.chat.completions.create(model="json", temperature=0, max_tokens=40, messages=[
                    {"role": "user", "content": "What is the capital of France?"}])
                assert is_json(r.choices[0].message.content or ""), r.choices[0].message.content
        finally:
            dep.down()
