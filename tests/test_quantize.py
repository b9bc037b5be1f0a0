"""peftdeploy.quantize: streaming RTN -> compressed-tensors, cache, scheme facts, QLoRA detection,
eval windows; slow: quantized demo merges load and serve in CPU vLLM, perplexity delta bounded.

Bounds of the slow test (perplexity of the pirate-merged SmolLM2-135M on the 2,545-token eval text,
window 512 / stride 256, every model run by CPU vLLM in bfloat16 so only the quantization differs;
RTN and greedy scoring are deterministic, measured once at 14:10 on 2025-11-28):

    full precision 32.659 | int8 (W8A8) 33.585 (+2.84 %) | w4a16 (g64) 38.342 (+17.40 %)

* int8 <= 4 %: per-channel int8 RTN has ~0.85 % relative weight error (quantizer provenance); most of
  the +2.8 % is the dynamic per-token int8 *activation* quantization, which costs more on a 135M
  model (narrow hidden size 576, every channel matters) than the <1 % typical of 7B+ models. The
  margin over the measurement covers kernel/oneDNN version changes, not run-to-run noise (none).
* w4a16 <= 25 %: int4 RTN has ~11 % relative weight error; published RTN baselines on ~125M models
  are +12 % (OPT-125M, g128, GPTQ paper) and far worse per-channel; here the demo weights are already
  dequantized Q4_1 (a different 4-bit grid), and re-rounding onto a second 4-bit grid compounds, so
  +17 % is expected; 25 % leaves the same kind of margin. (Calibrated GPTQ/AWQ would do better.)
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

from safetensors import safe_open  # noqa: E402

from peftdeploy.errors import MergeError  # noqa: E402
from peftdeploy.quantize import qlora_base_quant, qlora_match, scheme_info  # noqa: E402
from peftdeploy.quantize.cache import COMPLETE_MARKER, quant_key, quantize_cached_result  # noqa: E402
from peftdeploy.quantize.ppl import EVAL_TEXT_SHA256, eval_text_sha256, windows  # noqa: E402
from peftdeploy.quantize.rtn import (choose_group_size, dequantize_weight, is_quantizable,  # noqa: E402
                                     offline_spec, quantize_model)
from peftdeploy.quantize.support import SCHEMES, backbone_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INT8_PPL_BOUND_PCT = 4.0
# A CPU without VNNI runs vLLM's oneDNN int8 GEMM on another code path: the same checkpoint measured +7.09%
# there (AVX2 host simulated on the AVX-512 dev machine; +7.1% on the AVX2 CI host) against +2.84% with VNNI.
# plan warns about it (quantization-cpu-isa-accuracy); this is that host's bound, not a looser one for all.
INT8_NO_VNNI_PPL_BOUND_PCT = 8.0
W4A16_PPL_BOUND_PCT = 25.0


def _tiny(out: Path, **kw) -> Path:
    from tests.tiny import build_tiny_llama

    return build_tiny_llama(out, **kw)


def _load(d: Path) -> dict[str, "torch.Tensor"]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q")
    out = {}
    for s in ("int8", "w8a16", "w4a16"):
        r = quantize_model(tiny, root / s, s, group_size=32)
        out[s] = r.path
    return out


# ------------------------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("scheme,rel_bound", [("int8", 0.012), ("w8a16", 0.012), ("w4a16", 0.16)])
def test_rtn_roundtrip_error_bounds(tiny, quantized, scheme, rel_bound):
    src, q = _load(tiny), _load(quantized[scheme])
    spec = offline_spec(scheme, 32)
    n = 0
    for name, w in src.items():
        if not is_quantizable(name, tuple(w.shape)):
            assert torch.equal(q[name], w), f"{name} must be copied byte-identical"
            continue
        mod = name[: -len(".weight")]
        local = {k[len(mod) + 1:]: v for k, v in q.items() if k.startswith(mod + ".")}
        deq = dequantize_weight(local, spec)
        scale = local["weight_scale"].float()
        err = (deq - w.float()).abs()
        # RTN: every element within half a quantization step of its group's/row's scale
        if spec.strategy == "channel":
            assert (err <= scale * 0.5 + 1e-6).all(), name
        else:
            g = spec.group_size
            step = scale.repeat_interleave(g, dim=1)
            assert (err <= step * 0.5 + 1e-6).all(), name
        rel = float((deq - w.float()).norm() / w.float().norm())
        assert rel < rel_bound, (name, rel)
        n += 1
    assert n == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)


def test_format_matches_compressed_tensors(quantized):
    from compressed_tensors.quantization import QuantizationConfig

    expect = {
        "int8": ("int-quantized", {"weight": torch.int8, "weight_scale": torch.float32}),
        "w8a16": ("pack-quantized", {"weight_packed": torch.int32, "weight_scale": torch.float32,
                                     "weight_shape": torch.int64}),
        "w4a16": ("pack-quantized", {"weight_packed": torch.int32, "weight_scale": torch.float32,
                                     "weight_shape": torch.int64}),
    }
    for s, d in quantized.items():
        cfg = json.loads((d / "config.json").read_text())
        qc = cfg["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == expect[s][0]
        assert qc["quantization_status"] == "compressed" and "lm_head" in qc["ignore"]
        parsed = QuantizationConfig.model_validate(qc)  # the library accepts what we wrote
        sch = parsed.config_groups["group_0"]
        assert sch.targets == ["Linear"] and sch.weights.symmetric
        if s == "int8":
            a = sch.input_activations
            assert a.num_bits == 8 and a.dynamic is True and a.strategy == "token"
            assert sch.weights.strategy == "channel"
        else:
            assert sch.input_activations is None
        if s == "w4a16":
            assert sch.weights.num_bits == 4 and sch.weights.strategy == "group" and sch.weights.group_size == 32
        t = _load(d)
        q = "model.layers.0.self_attn.q_proj."
        for local, dt in expect[s][1].items():
            assert t[q + local].dtype == dt, (s, local, t[q + local].dtype)
        assert q + "weight" in t or q + "weight_packed" in t
        if s == "w4a16":
            assert tuple(t[q + "weight_packed"].shape) == (64, 64 // 8)
            assert tuple(t[q + "weight_scale"].shape) == (64, 64 // 32)
            assert t[q + "weight_shape"].tolist() == [64, 64]
        if s == "int8":
            assert tuple(t[q + "weight_scale"].shape) == (64, 1)
        prov = json.loads((d / "peftdeploy-quantization.json").read_text())
        assert prov["scheme"] == s and prov["quantized_tensors"] == 14


def test_w4a16_packing_independent_unpack(tiny, quantized):
    """Unpack int4 nibbles by hand (not via compressed-tensors) and compare with the source."""
    t = _load(quantized["w4a16"])
    w = _load(tiny)["model.layers.1.mlp.down_proj.weight"].float()  # [64, 128]
    p = t["model.layers.1.mlp.down_proj.weight_packed"]
    s = t["model.layers.1.mlp.down_proj.weight_scale"].float()
    codes = torch.stack([(p >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(p.shape[0], -1)  # uint4
    vals = (codes - 8).float()  # offset-binary, as vLLM's uint4b8
    deq = vals * s.repeat_interleave(32, dim=1)
    assert deq.shape == w.shape
    assert ((deq - w).abs() <= s.repeat_interleave(32, dim=1) * 0.5 + 1e-6).all()


def test_group_size_fallback_and_tied(tmp_path):
    assert choose_group_size([576, 1536, 192]) == 64
    assert choose_group_size([4096, 11008]) == 128
    with pytest.raises(MergeError):
        choose_group_size([100])
    m = _tiny(tmp_path / "m", hidden_size=96, intermediate_size=160, tie=True)
    r = quantize_model(m, tmp_path / "q", "w4a16")
    assert r.spec.group_size == 32
    t = _load(r.path)
    assert "lm_head.weight" not in t and "model.embed_tokens.weight" in t


def test_refuses_quantized_source_and_nonempty_output(quantized, tiny, tmp_path):
    with pytest.raises(MergeError, match="quantized"):
        quantize_model(quantized["int8"], tmp_path / "x", "int8")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        quantize_model(tiny, tmp_path / "busy", "int8")
    with pytest.raises(MergeError):
        offline_spec("fp8")


def test_sharded_source(tmp_path):
    m = _tiny(tmp_path / "m", shards=3)
    r = quantize_model(m, tmp_path / "q", "int8", shard_size_bytes=60_000)
    idx = json.loads((r.path / "model.safetensors.index.json").read_text())
    files = set(idx["weight_map"].values())
    assert len(files) > 1
    t = _load(r.path)
    assert set(idx["weight_map"]) == set(t)


def test_cache_hit_and_keys(tiny, tmp_path):
    root = tmp_path / "cache"
    a = quantize_cached_result(tiny, "int8", cache_root=root)
    assert not a.cache_hit and (a.path / COMPLETE_MARKER).is_file() and a.path.parent == root
    b = quantize_cached_result(tiny, "w8a8", cache_root=root)  # alias
    assert b.cache_hit and b.path == a.path
    c = quantize_cached_result(tiny, "w4a16", cache_root=root, group_size=32)
    assert c.key != a.key
    # a merge output is keyed by its merge key (no re-hash of the weights)
    (tiny / ".peftdeploy-complete").write_text(json.dumps({"key": "ab" * 32}))
    try:
        k, ident = quant_key(tiny, "int8")
        assert ident["source"] == {"merged_key": "ab" * 32}
    finally:
        (tiny / ".peftdeploy-complete").unlink()
    assert not list(root.glob(".tmp-*"))


# ------------------------------------------------------------------------------------ scheme facts
def test_scheme_info_facts():
    assert set(SCHEMES) >= {"none", "fp8", "int8", "w8a16", "w4a16", "bitsandbytes", "awq", "gptq"}
    assert scheme_info("int8").kind == "offline" and scheme_info("int8").supported_on("cpu")[0]
    assert scheme_info("w4a16").supported_on("cpu")[0]
    ok, why = scheme_info("w8a16").supported_on("cpu")
    assert not ok and "4-bit" in why
    assert scheme_info("fp8").kind == "runtime" and scheme_info("fp8").vllm_quantization == "fp8"
    ok, why = scheme_info("bitsandbytes").lora_ok("cpu")  # no bitsandbytes in vLLM 0.32 (CPU); GPU builds only
    assert not ok and "bitsandbytes" in why
    assert scheme_info("bitsandbytes").supported_on("cuda")[0] and scheme_info("bitsandbytes").kind == "runtime"
    ok, why = scheme_info("fp8").supported_on("cpu")  # online fp8 needs _C::static_scaled_fp8_quant (stub on CPU)
    assert not ok and "static_scaled_fp8_quant" in why
    for s in ("awq", "gptq"):
        i = scheme_info(s)
        assert i.kind == "prequantized" and i.merge_action == "needs-merge-base" and i.merge_offline_scheme == "w4a16"
        assert i.lora_ok("cuda")[0]
    assert scheme_info(None).name == "none" and scheme_info("W8A8").name == "int8"
    with pytest.raises(KeyError):
        scheme_info("int3")
    # memory model: a 7B-like backbone (6.5e9 linear params, 0.5e9 embeddings), bf16
    full = backbone_bytes("none", linear_params=6_500_000_000, other_params=500_000_000)
    i8 = backbone_bytes("int8", linear_params=6_500_000_000, other_params=500_000_000, in_features=4096)
    w4 = backbone_bytes("w4a16", linear_params=6_500_000_000, other_params=500_000_000)
    assert full == 14_000_000_000
    assert 7.5e9 < i8 < 7.6e9 and 4.2e9 < w4 < 4.4e9


def test_backbone_bytes_matches_written_checkpoint(tiny, quantized):
    src = _load(tiny)
    lin = sum(v.numel() for k, v in src.items() if is_quantizable(k, tuple(v.shape)))
    other = sum(v.numel() for k, v in src.items() if not is_quantizable(k, tuple(v.shape)))
    for s in ("int8", "w4a16"):
        on_disk = sum(v.numel() * v.element_size() for v in _load(quantized[s]).values())
        est = backbone_bytes(s, linear_params=lin, other_params=other, dtype_bytes=4, in_features=64,
                             group_size=32)
        # scales are float32 here (scale_bytes 2 in the model assumes bf16): allow that slack
        assert abs(est - on_disk) / on_disk < 0.05, (s, est, on_disk)


# ------------------------------------------------------------------------------------------ QLoRA
def test_qlora_detection(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-3-8B",
                                                       "peft_type": "LORA"}))
    assert qlora_base_quant(a) is None
    (a / "README.md").write_text(
        "---\nlibrary_name: peft\n---\n## Training procedure\n\n\nThe following `bitsandbytes` quantization config "
        "was used during training:\n- quant_method: bitsandbytes\n- load_in_8bit: False\n- load_in_4bit: True\n"
        "- bnb_4bit_quant_type: nf4\n- bnb_4bit_use_double_quant: True\n")
    assert qlora_base_quant(a) == "bnb-nf4"
    st, why = qlora_match("bnb-nf4", "awq")
    assert st == "mismatch" and "bitsandbytes" in why
    assert qlora_match("bnb-nf4", "none")[0] == "full-precision"
    assert qlora_match("gptq", "gptq")[0] == "match"
    assert qlora_match(None, "awq")[0] == "n/a"
    b = tmp_path / "b"
    b.mkdir()
    (b / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "unsloth/llama-3-8b-bnb-4bit"}))
    assert qlora_base_quant(b) == "bnb-nf4"
    (b / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "TheBloke/Mistral-7B-AWQ"}))
    assert qlora_base_quant(b) == "awq"
    (b / "adapter_config.json").write_text(json.dumps({"use_qalora": True, "base_model_name_or_path": "x/y"}))
    assert qlora_base_quant(b) == "qalora"
    for name in ("pirate", "json"):
        assert qlora_base_quant(ROOT / "peftdeploy" / "data" / "adapters" / name) is None


# ---------------------------------------------------------------------------------------- eval text
def test_eval_text_pinned_and_windows():
    assert eval_text_sha256() == EVAL_TEXT_SHA256
    for n, w, s in [(2545, 512, 256), (10, 512, 256), (1000, 100, 99), (513, 512, 256)]:
        scored = []
        for b, e, f in windows(n, w, s):
            assert e - b <= w and f >= b + 1
            scored += list(range(f, e))
        assert scored == list(range(1, n)), (n, w, s)
    with pytest.raises(ValueError):
        windows(100, 50, 50)


# --------------------------------------------------------------------- merge into quantized: refused
def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_merge_into_prequantized_refused_and_merge_base_used(tmp_path):
    from tests.tiny import build_tiny_lora

    from peftdeploy.quantize.evaluate import _merged_model

    full = _tiny(tmp_path / "full")
    lora = build_tiny_lora(full, tmp_path / "lora")
    awq = tmp_path / "awq"
    awq.mkdir()
    cfg = json.loads((full / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
    (awq / "config.json").write_text(json.dumps(cfg))
    body = ("apiVersion: peftdeploy/v1\nname: t\nbackbone:\n  model: ./awq\n{mb}quantization:\n  scheme: awq\n"
            "adapters:\n  - name: a\n    source: ./lora\npolicy:\n  mode: merge\n")
    bad = _write(tmp_path / "bad.yaml", body.format(mb=""))
    p = subprocess.run([sys.executable, "-m", "peftdeploy.cli", "validate", str(bad)], capture_output=True,
                       text=True, cwd=str(ROOT))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "merge_base" in p.stderr and "quantized weights" in p.stderr
    good = _write(tmp_path / "good.yaml", body.format(mb="  merge_base: ./full\n"))
    os.environ["PEFTDEPLOY_CACHE"] = str(tmp_path / "cache")
    try:
        r, merged, info = _merged_model(str(good), quiet=True)
    finally:
        del os.environ["PEFTDEPLOY_CACHE"]
    assert info["merged"] and info["backbone"].endswith("full")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    # and the merged result quantizes with the scheme the prequantized backbone maps to (w4a16)
    assert scheme_info("awq").merge_offline_scheme == "w4a16"
    q = quantize_model(merged, tmp_path / "q", "w4a16", group_size=32)
    assert q.quantized_tensors == 14


# ------------------------------------------------------------------------------- slow: CPU vLLM
def _demo_merged() -> Path:
    from peftdeploy.demo import build_demo_model, demo_adapter_dir
    from peftdeploy.merge import AdapterInput, merge_cached

    base = build_demo_model(progress=False)
    return merge_cached(base, [AdapterInput("pirate", demo_adapter_dir("pirate"))], progress=False).path


@pytest.mark.slow
def test_cpu_vllm_quantized_ppl_delta(tmp_path):
    from peftdeploy.quantize.ppl import measure

    from peftdeploy.quantize.cpu_isa import host_cpu_isa

    isa = host_cpu_isa()
    no_w4 = isa.missing_kernel("w4a16") if isa is not None else None  # AVX2 host: vLLM has no w4a16 kernel
    merged = _demo_merged()
    qi = quantize_cached_result(merged, "int8")
    qw = quantize_cached_result(merged, "w4a16")
    assert qw.provenance["spec"]["group_size"] == 64  # 576 % 128 != 0
    paths = [merged, qi.path] + ([] if no_w4 else [qw.path])
    # the engine core in measure's child process itself (no engine-core and worker processes to spawn, each
    # importing vLLM again, per model): 55 s instead of 133 s here for the three models; the same perplexities
    res = measure(paths, dtype="bfloat16", log_path=tmp_path / "ppl.log", timeout=2400,
                  env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    fp, i8 = res[:2]
    assert fp.quantization is None and i8.quantization == "compressed-tensors"
    assert fp.ids_sha256 == i8.ids_sha256 and fp.tokens_scored > 2000
    d8 = 100 * (i8.ppl - fp.ppl) / fp.ppl
    print(f"\nppl full {fp.ppl:.3f}  int8 {i8.ppl:.3f} ({d8:+.2f}%)  [{isa.library if isa else '?'}]")
    assert math.isfinite(fp.ppl) and fp.ppl < 100
    assert abs(d8) <= (INT8_PPL_BOUND_PCT if isa is None or isa.vnni else INT8_NO_VNNI_PPL_BOUND_PCT)
    if no_w4:  # not measured here: eval and plan say why instead of a dead engine
        ok, why = scheme_info("w4a16").runs_on_this_host("cpu")
        assert not ok and why == no_w4
        return
    w4 = res[2]
    assert w4.quantization == "compressed-tensors" and w4.ids_sha256 == fp.ids_sha256
    d4 = 100 * (w4.ppl - fp.ppl) / fp.ppl
    print(f"w4a16 {w4.ppl:.3f} ({d4:+.2f}%)")
    assert abs(d4) <= W4A16_PPL_BOUND_PCT
