"""Streaming LoRA merge (peftdeploy.merge): exactness against PEFT, refusals, cache, atomicity.

PEFT reference for several weighted adapters: PEFT has no direct equivalent (add_weighted_adapter
with combination_type="linear" concatenates/averages factors and is only the same math for equal
ranks), so the reference loads each adapter in turn onto the (already merged) model, multiplies its
lora_B (and lora_B bias / lora_embedding_B) by the adapter's weight, and calls merge_and_unload —
i.e. W + Σ w_i·s_i·B_i@A_i merged sequentially in float32.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from peftdeploy.errors import MergeError  # noqa: E402
from peftdeploy.merge import (AdapterInput, HashCache, merge_cached, merge_key, merge_model,  # noqa: E402
                              open_adapter)
from peftdeploy.merge.cache import COMPLETE_MARKER  # noqa: E402
from tests.tiny import (build_tiny_gpt2, build_tiny_llama, build_tiny_lora, build_tiny_phi3,  # noqa: E402
                        read_adapter_config, write_adapter_config)

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def load_dir(d: Path) -> dict[str, "torch.Tensor"]:
    """All tensors of a model dir, read with the safetensors library itself."""
    out = {}
    files = sorted(d.glob("*.safetensors"))
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        assert set(wm.values()) == {f.name for f in files}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for k in fh.keys():
                assert k not in out
                out[k] = fh.get_tensor(k)
    return out


def peft_reference(model_dir: Path, adapters: list[tuple[Path, float]], dtype=None) -> dict[str, "torch.Tensor"]:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32)
    for path, w in adapters:
        pm = PeftModel.from_pretrained(model, str(path))
        if w != 1.0:
            with torch.no_grad():
                for mod in pm.modules():
                    if isinstance(mod, LoraLayer):
                        for lin in mod.lora_B.values():
                            lin.weight.mul_(w)
                            if lin.bias is not None:
                                lin.bias.mul_(w)
                        for p in mod.lora_embedding_B.values():
                            p.mul_(w)
        model = pm.merge_and_unload()
    return model.state_dict()


def assert_close_rel(ours: dict, ref: dict, backbone: dict, tol: float = 1e-6) -> None:
    assert set(ours) == set(backbone)
    for k, x in ours.items():
        r = ref[k]
        assert x.dtype == backbone[k].dtype and x.shape == r.shape, k
        denom = r.abs().max().item() or 1.0
        rel = (x.float() - r.float()).abs().max().item() / denom
        assert rel <= tol, f"{k}: relative diff {rel:.3g} > {tol}"


def bf16_ulp(x: "torch.Tensor") -> "torch.Tensor":
    a = x.float().abs()
    tiny = torch.finfo(torch.bfloat16).tiny
    e = torch.floor(torch.log2(torch.clamp(a, min=tiny)))
    return torch.pow(2.0, e - 7)


def changed(ours: dict, backbone: dict) -> set[str]:
    return {k for k in ours if not torch.equal(ours[k], backbone[k])}


_STATS: list[dict] = []  # provenance stats of the merges of the current test (see kernel_mode)


def merge(tmp: Path, model: Path, adapters, **kw):
    out = tmp / f"out-{len(list(tmp.glob('out-*')))}"
    res = merge_model(model, adapters, out, progress=False, **kw)
    _STATS.append(res.provenance["stats"])
    return res, load_dir(out)


@pytest.fixture(params=["fused", "numpy"])
def kernel_mode(request, monkeypatch):
    """Run the test with the compiled fused kernel and with the numpy fallback; check that the
    merges really took that path (the fused kernel handles every LoRA weight of the float dtypes)."""
    from peftdeploy.merge import kernels

    if request.param == "numpy":
        monkeypatch.setenv(kernels.KERNEL_ENV, "numpy")
    else:
        monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
        assert kernels.load() is not None, "merge kernel extension not built (pip install -e .)"
    _STATS.clear()
    yield request.param
    fused = [st["fused_kernel"] for st in _STATS]
    assert fused, "no merge ran"
    if request.param == "numpy":
        assert not any(fused)
    else:
        assert all(fused), _STATS


# ---------------------------------------------------------------------------------------------
# fixtures (built once per session)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "llama": build_tiny_llama(d / "llama"),
        "llama3": build_tiny_llama(d / "llama3", shards=3, seed=1),
        "llama_bf16": build_tiny_llama(d / "llama_bf16", dtype=torch.bfloat16, seed=2),
        "llama_tied": build_tiny_llama(d / "llama_tied", tie=True, seed=3),
        "gpt2": build_tiny_gpt2(d / "gpt2"),
        "phi3": build_tiny_phi3(d / "phi3"),
    }


@pytest.fixture(scope="session")
def base_tensors(models):
    return {k: load_dir(v) for k, v in models.items()}


# ---------------------------------------------------------------------------------------------
# exactness vs PEFT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                                     "modules_to_save", "embed_lm_head"])
@pytest.mark.usefixtures("kernel_mode")
def test_llama_variants_match_peft(variant, models, base_tensors, tmp_path):
    kw = {
        "plain": {},
        "rslora": dict(use_rslora=True, r=4, alpha=8),
        "rank_pattern": dict(rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2}),
        "alpha_pattern": dict(alpha_pattern={"o_proj": 5, "^model.layers.0.self_attn.v_proj": 3,
                                             "layers.1.mlp.up_proj": 64}),
        "layers_to_transform": dict(layers_to_transform=[1]),
        "modules_to_save": dict(targets=("q_proj", "v_proj"), modules_to_save=["lm_head"]),
        "embed_lm_head": dict(targets=("q_proj", "embed_tokens", "lm_head")),
    }[variant]
    ad = build_tiny_lora(models["llama"], tmp_path / "ad", **kw)
    res, ours = merge(tmp_path, models["llama"], [AdapterInput("a", ad)])
    ref = peft_reference(models["llama"], [(ad, 1.0)])
    base = base_tensors["llama"]
    assert_close_rel(ours, ref, base)
    ch = changed(ours, base)
    if variant == "layers_to_transform":
        assert ch and all(".layers.1." in k for k in ch)
    if variant == "modules_to_save":
        assert "lm_head.weight" in ch and res.provenance["stats"]["replaced"] == 1
    if variant == "embed_lm_head":
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= ch
    if variant == "rank_pattern":
        ranks = {m.module: m.rank for m in open_adapter(ad).modules.values()}
        assert ranks["model.layers.0.self_attn.q_proj"] == 4 and ranks["model.layers.1.mlp.down_proj"] == 2
        assert ranks["model.layers.0.mlp.down_proj"] == 8
    if variant == "alpha_pattern":
        sc = open_adapter(ad).scales()
        assert sc["model.layers.0.self_attn.v_proj"] == 3 / 8 and sc["model.layers.1.self_attn.v_proj"] == 2.0
        assert sc["model.layers.1.self_attn.o_proj"] == 5 / 8 and sc["model.layers.1.mlp.up_proj"] == 8.0
    assert ch  # the merge did something


@pytest.mark.usefixtures("kernel_mode")
def test_gpt2_fan_in_fan_out_and_lora_bias(models, base_tensors, tmp_path):
    ad = build_tiny_lora(models["gpt2"], tmp_path / "ad", lora_bias=True)
    assert read_adapter_config(ad)["fan_in_fan_out"] is True
    res, ours = merge(tmp_path, models["gpt2"], [AdapterInput("a", ad)])
    ref = peft_reference(models["gpt2"], [(ad, 1.0)])
    assert_close_rel(ours, ref, base_tensors["gpt2"])
    ch = changed(ours, base_tensors["gpt2"])
    assert "transformer.h.0.attn.c_attn.weight" in ch and "transformer.h.0.attn.c_attn.bias" in ch
    assert "lm_head.weight" not in ours  # tied, as in the backbone


@pytest.mark.usefixtures("kernel_mode")
def test_weighted_adapters_match_sequential_peft(models, base_tensors, tmp_path):
    a1 = build_tiny_lora(models["llama"], tmp_path / "a1", r=8, alpha=16, seed=1)
    a2 = build_tiny_lora(models["llama"], tmp_path / "a2", r=4, alpha=4, use_rslora=True, seed=2,
                         targets=("q_proj", "v_proj", "down_proj"))
    a3 = build_tiny_lora(models["llama"], tmp_path / "a3", r=2, alpha=8, seed=3, targets=("embed_tokens", "q_proj"))
    ws = [0.7, -0.3, 1.5]
    res, ours = merge(tmp_path, models["llama"], [AdapterInput(f"a{i}", p, w) for i, (p, w) in
                                                   enumerate(zip([a1, a2, a3], ws))])
    ref = peft_reference(models["llama"], list(zip([a1, a2, a3], ws)))
    assert_close_rel(ours, ref, base_tensors["llama"])
    assert [a["weight"] for a in res.provenance["adapters"]] == ws
    assert res.provenance["adapters"][1]["scales"] == [2.0]


@pytest.mark.usefixtures("kernel_mode")
def test_multishard_backbone_and_output_load_in_transformers(models, base_tensors, tmp_path):
    from transformers import AutoModelForCausalLM

    src = models["llama3"]
    assert len(list(src.glob("model-*.safetensors"))) >= 2
    ad = build_tiny_lora(src, tmp_path / "ad", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj", "lm_head"))
    res, ours = merge(tmp_path, src, [AdapterInput("a", ad)], shard_size_bytes=120_000)
    assert len(res.provenance["output"]["shards"]) >= 3
    assert (res.path / "model.safetensors.index.json").exists()
    ref_model_sd = peft_reference(src, [(ad, 1.0)])
    assert_close_rel(ours, ref_model_sd, base_tensors["llama3"])
    # transformers loads the merged directory and gives PEFT's merged model's logits
    from peft import PeftModel

    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(res.path), dtype=torch.float32).eval()
        peft_m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32),
                                           str(ad)).merge_and_unload().eval()
        a, b = merged(ids).logits, peft_m(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # non-weight files came along
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (res.path / f).read_bytes() == (src / f).read_bytes()
    assert any(p.name.startswith("chat_template") for p in res.path.iterdir())


@pytest.mark.usefixtures("kernel_mode")
def test_bf16_within_one_ulp_of_peft(models, base_tensors, tmp_path):
    src = models["llama_bf16"]
    ad = build_tiny_lora(src, tmp_path / "ad", targets=("q_proj", "v_proj", "down_proj", "lm_head"))
    res, ours = merge(tmp_path, src, [AdapterInput("a", ad)])
    assert res.dtype == "bfloat16"
    ref = peft_reference(src, [(ad, 1.0)], dtype=torch.bfloat16)
    base = base_tensors["llama_bf16"]
    assert set(ours) == set(base)
    for k, x in ours.items():
        assert x.dtype == torch.bfloat16
        r = ref[k]
        diff = (x.float() - r.float()).abs()
        ulp = torch.maximum(bf16_ulp(x), bf16_ulp(r))
        assert bool((diff <= ulp).all()), f"{k}: more than one bf16 ulp from PEFT"
    assert changed(ours, base)


@pytest.mark.usefixtures("kernel_mode")
def test_dtype_conversion_and_config(models, base_tensors, tmp_path):
    src = models["llama"]
    ad = build_tiny_lora(src, tmp_path / "ad", targets=("q_proj",))
    res, ours = merge(tmp_path, src, [AdapterInput("a", ad)], dtype="bf16")
    assert res.dtype == "bfloat16" and all(t.dtype == torch.bfloat16 for t in ours.values())
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    ref = peft_reference(src, [(ad, 1.0)])
    for k, x in ours.items():  # computed in fp32, cast once: equals the fp32 merge cast to bf16
        diff = (x.float() - ref[k].to(torch.bfloat16).float()).abs()
        assert bool((diff <= bf16_ulp(ref[k])).all()), k
    st = res.provenance["stats"]
    assert st["merged"] == 2 and st["converted"] == len(ours) - 2 and st["copied"] == 0


@pytest.mark.usefixtures("kernel_mode")
def test_tied_embeddings_embedding_lora(models, base_tensors, tmp_path):
    src = models["llama_tied"]
    ad = build_tiny_lora(src, tmp_path / "ad", targets=("embed_tokens", "q_proj"))
    res, ours = merge(tmp_path, src, [AdapterInput("a", ad)])
    assert "lm_head.weight" not in ours
    ref = peft_reference(src, [(ad, 1.0)])
    assert_close_rel(ours, ref, base_tensors["llama_tied"])


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_dora_matches_peft(model, models, base_tensors, tmp_path):
    src = models[model]
    ad = build_tiny_lora(src, tmp_path / "ad", use_dora=True,
                         targets=("q_proj", "down_proj") if model == "llama" else ("c_attn", "c_fc"))
    res, ours = merge(tmp_path, src, [AdapterInput("a", ad)])
    ref = peft_reference(src, [(ad, 1.0)])
    assert_close_rel(ours, ref, base_tensors[model], tol=2e-6)
    assert res.provenance["adapters"][0]["use_dora"] is True


@pytest.mark.usefixtures("kernel_mode")
def test_packed_projections_phi3(models, base_tensors, tmp_path):
    ad = build_tiny_lora(models["phi3"], tmp_path / "ad")  # qkv_proj, o_proj, gate_up_proj, down_proj
    res, ours = merge(tmp_path, models["phi3"], [AdapterInput("a", ad)])
    assert_close_rel(ours, peft_reference(models["phi3"], [(ad, 1.0)]), base_tensors["phi3"])
    assert "model.layers.0.self_attn.qkv_proj.weight" in changed(ours, base_tensors["phi3"])
    # an adapter on unpacked q/k/v cannot go into the packed backbone: one clear error
    ll = build_tiny_lora(models["llama"], tmp_path / "ll", targets=("q_proj", "gate_proj"))
    e = _refused(models["phi3"], [AdapterInput("ll", ll)], tmp_path, "no weight in the backbone")
    assert "packed" in e.fix and "q_proj" in e.message


def test_chunking_threads_and_progress_do_not_change_bytes(models, tmp_path, monkeypatch, capsys):
    """The fused kernel writes the same bytes however a weight is cut (threads, pieces, staging
    buffers that end mid-tensor or mid-row); the numpy path too whatever the threads, and its row
    chunking changes the GEMM's rounding only just."""
    from peftdeploy.merge import compute, engine, kernels

    src = models["gpt2"]  # transposed (Conv1D) deltas
    ad = build_tiny_lora(src, tmp_path / "ad", targets=("c_attn", "c_fc", "wte"))

    def run(threads=1, progress=False, **patch):
        out = tmp_path / f"o{len(list(tmp_path.glob('o*')))}"
        with monkeypatch.context() as m:
            for k, v in patch.items():
                m.setattr(compute if hasattr(compute, k) else engine, k, v)
            res = merge_model(src, [AdapterInput("a", ad)], out, threads=threads, progress=progress)
        return {p.name: p.read_bytes() for p in out.glob("*.safetensors")}, res.provenance["stats"]

    fused = [run(1), run(0, True), run(3), run(2, PIECE_ELEMENTS=7), run(1, WRITE_BUFFER_BYTES=4096),
             run(3, PIECE_ELEMENTS=1000, WRITE_BUFFER_BYTES=8192)]
    assert all(st["fused_kernel"] == st["merged"] > 0 for _, st in fused)  # every adapted weight
    assert all(raw == fused[0][0] for raw, _ in fused)
    monkeypatch.setenv(kernels.KERNEL_ENV, "numpy")
    outs = [run(1), run(0), run(3), run(1, CHUNK_BYTES=1000), run(2, CHUNK_BYTES=4096)]
    monkeypatch.delenv(kernels.KERNEL_ENV)
    assert all(st["fused_kernel"] == 0 for _, st in outs)
    assert outs[0][0] == outs[1][0] == outs[2][0]  # deterministic whatever the threads
    from safetensors.torch import load as st_load

    base = load_dir(src)
    for raw, _ in outs[3:] + [fused[0]]:  # other row-chunkings / the fused kernel: only just different
        a = {k: v for f in raw.values() for k, v in st_load(f).items()}
        b = {k: v for f in outs[0][0].values() for k, v in st_load(f).items()}
        assert_close_rel(a, b, base)
    assert "merge" in capsys.readouterr().err


def test_numpy_casts_match_torch():
    """The numpy kernels (no torch at merge time) load and round exactly as torch's casts do."""
    import numpy as np

    from peftdeploy.merge import compute, shard_read

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * s for s in (1e-3, 1.0, 1e3)])
    bits = x.view(torch.int32)
    ties = (bits & ~0xFFFF) | 0x8000  # exactly halfway between two bf16 values: round to even
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.3895e38, -3.3895e38, 1e-40, -1e-40,
                            65504.0, 65520.0, 6e-8, 1e-45])
    x = torch.cat([x, ties.view(torch.float32), special]).reshape(4, -1).contiguous()
    for code, tdt in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        src = x.numpy().copy()
        dst = np.empty(src.shape, np.dtype(shard_read.NP_STORAGE[code]))
        compute._store_f32(code, src, dst, np.empty(src.shape, np.uint32))
        want = x.to(tdt)
        got = torch.from_numpy(dst.view(np.int16) if code != "F32" else dst).view(tdt)
        assert torch.equal(got.view(torch.int16 if code != "F32" else torch.int32),
                           want.view(torch.int16 if code != "F32" else torch.int32)), code
        back = np.empty(src.shape, np.float32)
        compute._load_f32(code, dst, back)
        assert torch.equal(torch.from_numpy(back), want.float()), code
    # NaN stays NaN whatever its payload (a naive round-to-nearest-even turns some into inf)
    nan = np.array([[0x7F800001, 0xFF800001, 0x7FC00000, 0x7FFFFFFF]], np.uint32).view(np.float32)
    dst = np.empty(nan.shape, np.uint16)
    compute._store_f32("BF16", nan.copy(), dst, np.empty(nan.shape, np.uint32))
    assert torch.isnan(torch.from_numpy(dst.view(np.int16)).view(torch.bfloat16)).all()


def test_untouched_tensors_are_copied_bit_for_bit_without_torch(models, tmp_path):
    """Untouched tensors are byte ranges copied from the backbone shard (copy_file_range), and the
    merge itself (numpy kernels) never imports torch."""
    from peftdeploy.merge.shard_read import read_header

    src = models["llama_bf16"]
    ad = build_tiny_lora(src, tmp_path / "ad", targets=("q_proj", "down_proj"))
    out = tmp_path / "o"
    code = ("import sys, json; from peftdeploy.merge import AdapterInput, merge_model; "
            f"r = merge_model({str(src)!r}, [AdapterInput('a', {str(ad)!r})], {str(out)!r}, progress=False); "
            "print(json.dumps([r.provenance['stats'], 'torch' in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr
    stats, torch_imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert torch_imported is False
    raw_in = {}
    for f in sorted(src.glob("*.safetensors")):
        data = f.read_bytes()
        raw_in.update({n: data[t.offset:t.offset + t.nbytes] for n, t in read_header(f).tensors.items()})
    raw_out = {}
    for f in sorted(out.glob("*.safetensors")):
        data = f.read_bytes()
        raw_out.update({n: data[t.offset:t.offset + t.nbytes] for n, t in read_header(f).tensors.items()})
    assert set(raw_in) == set(raw_out)
    same = {n for n in raw_in if raw_in[n] == raw_out[n]}
    adapted = {n for n in raw_in if ".q_proj." in n or ".down_proj." in n}
    assert same == set(raw_in) - adapted
    assert stats["copied"] == len(same) and stats["merged"] == len(adapted)


def test_numpy_and_torch_paths_agree(models, base_tensors, tmp_path, monkeypatch):
    """The torch fallback (DoRA, float64/float8 tensors) and the numpy kernels compute the same merge."""
    from peftdeploy.merge import compute

    for name in ("llama", "llama_bf16", "gpt2"):
        src = models[name]
        ad = build_tiny_lora(src, tmp_path / f"ad-{name}", lora_bias=name == "gpt2")
        _, fast = merge(tmp_path, src, [AdapterInput("a", ad, 0.7)])
        monkeypatch.setattr(compute, "FAST", set())
        _, slow = merge(tmp_path, src, [AdapterInput("a", ad, 0.7)])
        monkeypatch.undo()
        base = base_tensors[name]
        assert set(fast) == set(slow) == set(base)
        for k in fast:
            assert fast[k].dtype == slow[k].dtype == base[k].dtype
            diff = (fast[k].float() - slow[k].float()).abs()
            if fast[k].dtype == torch.bfloat16:
                assert bool((diff <= torch.maximum(bf16_ulp(fast[k]), bf16_ulp(slow[k]))).all()), k
            else:
                assert diff.max().item() <= 1e-6 * (slow[k].abs().max().item() or 1.0), k


@pytest.mark.parametrize("direct", [True, False])
def test_shard_writer_direct_and_buffered_write_the_same_file(tmp_path, direct):
    """O_DIRECT writes (aligned staging buffer, padded last block truncated) give the very bytes of a
    buffered write, whatever the tensor sizes relative to the buffer and block size."""
    import numpy as np
    from safetensors.numpy import load_file

    from peftdeploy.merge import shard_write

    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in
              enumerate([1, 1023, 1024, 5000, 3, 20000, 0, 7])}
    src = tmp_path / "src.bin"
    blob = b"".join(a.tobytes() for a in arrays.values())
    src.write_bytes(b"xyz" + blob)  # odd offset: copy_from must not need alignment
    outs = [shard_write.OutTensor(k, "F32", a.shape) for k, a in arrays.items()]
    files = []
    for mode in (direct, False):
        p = tmp_path / f"{mode}-{len(files)}.safetensors"
        w = shard_write.ShardWriter(p, outs, direct=mode, buffer_bytes=8192)
        off = 3
        fd = os.open(src, os.O_RDONLY)
        try:
            for i, (k, a) in enumerate(arrays.items()):
                if i % 2:
                    w.copy_from(k, fd, off, a.nbytes)
                else:
                    w.write_bytes(k, a.tobytes())
                off += a.nbytes
            w.close()
        finally:
            os.close(fd)
        assert p.stat().st_size == w.size
        files.append(p)
    assert files[0].read_bytes() == files[1].read_bytes()
    back = load_file(str(files[0]))
    assert all(np.array_equal(back[k], a) for k, a in arrays.items())


@pytest.mark.parametrize("direct", [True, False])
def test_shard_writer_spans_and_shared_queue(tmp_path, direct):
    """spans(): the caller fills the staging buffer in place, elements that straddle two staging
    buffers included (after an odd-sized tensor); shards sharing one WriteQueue are all complete
    once the queue is closed; files the safetensors library reads back."""
    import numpy as np
    from safetensors.numpy import load_file

    from peftdeploy.merge import shard_write

    rng = np.random.default_rng(1)
    shards = [{"odd": rng.integers(0, 255, 4099, dtype=np.uint8), "w": rng.standard_normal((37, 129), np.float32),
               "h": rng.standard_normal(5001).astype(np.float16)},
              {"v": rng.standard_normal(20000).astype(np.float32)}]
    code = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    q = shard_write.WriteQueue(buffer_bytes=8192, buffers=2)
    paths = []
    for i, arrays in enumerate(shards):
        p = tmp_path / f"s{i}.safetensors"
        w = shard_write.ShardWriter(p, [shard_write.OutTensor(k, code[a.dtype], a.shape) for k, a in arrays.items()],
                             direct=direct, queue=q)
        for k, a in arrays.items():
            flat = a.reshape(-1).view(np.uint8)
            done, sizes = 0, []
            for span in w.spans(k, a.nbytes, unit=a.itemsize, max_bytes=3000):
                assert len(span) % a.itemsize == 0 or len(span) < a.itemsize
                span[:] = flat[done:done + len(span)]
                done += len(span)
                sizes.append(len(span))
            assert done == a.nbytes
        w.close()
        paths.append(p)
    q.close()
    for p, arrays in zip(paths, shards):
        ref = tmp_path / f"ref-{p.name}"  # the same layout written from bytes at hand, unbuffered
        w = shard_write.ShardWriter(ref, [shard_write.OutTensor(k, code[a.dtype], a.shape) for k, a in arrays.items()])
        for k, a in arrays.items():
            w.write_bytes(k, a.tobytes())
        w.close()
        assert p.read_bytes() == ref.read_bytes()
        back = load_file(str(p))
        assert all(np.array_equal(back[k], a) for k, a in arrays.items())


def test_write_errors_reach_the_caller_and_remove_the_output(models, tmp_path, monkeypatch):
    """A failing write on the writer thread fails the merge; a full disk says so with a fix; nothing is left."""
    import errno

    from peftdeploy.merge import shard_write

    src = models["llama3"]
    ad = build_tiny_lora(src, tmp_path / "ad", targets=("q_proj",))
    calls = []

    def full(self, fd, mv):
        calls.append(len(mv))
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, fd, mv)

    orig = shard_write.ShardWriter._write_block
    monkeypatch.setattr(shard_write.ShardWriter, "_write_block", full)
    monkeypatch.setattr("peftdeploy.merge.engine.WRITE_BUFFER_BYTES", 4096)
    out = tmp_path / "o"
    with pytest.raises(MergeError, match="filled up while writing") as ei:
        merge_model(src, [AdapterInput("a", ad)], out, progress=False, shard_size_bytes=150_000)
    assert "PEFTDEPLOY_CACHE" in ei.value.fix
    assert len(calls) > 2 and not out.exists()
    # other write errors stay what they are
    monkeypatch.setattr(shard_write.ShardWriter, "_write_block",
                        lambda self, fd, mv: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output"):
        merge_model(src, [AdapterInput("a", ad)], out, progress=False)
    assert not out.exists()


def test_not_enough_space_is_refused_before_writing(models, tmp_path, monkeypatch):
    import collections
    import shutil as sh

    src = models["llama"]
    ad = build_tiny_lora(src, tmp_path / "ad", targets=("q_proj",))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    out = tmp_path / "o"
    with pytest.raises(MergeError, match=r"not enough space .* needs \d+\.\d KiB, 1\.0 MiB are free"):
        merge_model(src, [AdapterInput("a", ad)], out, progress=False)
    assert not out.exists()


def test_merge_direct_io_and_page_cache_outputs_are_identical(models, tmp_path, monkeypatch):
    from peftdeploy.merge import engine

    src = models["llama3"]
    ad = build_tiny_lora(src, tmp_path / "ad", targets=("q_proj", "down_proj"))
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv(engine.DIRECT_IO_ENV, flag)
        out = tmp_path / f"o{flag}"
        merge_model(src, [AdapterInput("a", ad)], out, progress=False, shard_size_bytes=150_000)
        outs.append({p.name: p.read_bytes() for p in out.glob("*.safetensors")})
    assert len(outs[0]) >= 2 and outs[0] == outs[1]


def test_pickle_adapter_only_with_allow_pickle(models, base_tensors, tmp_path):
    from safetensors.torch import load_file

    ad = build_tiny_lora(models["llama"], tmp_path / "ad", targets=("q_proj",))
    sd = load_file(str(ad / "adapter_model.safetensors"))
    torch.save(sd, ad / "adapter_model.bin")
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(MergeError) as ei:
        merge_model(models["llama"], [AdapterInput("a", ad)], tmp_path / "o1", progress=False)
    assert "pickle" in ei.value.message and "safetensors" in ei.value.fix
    assert not (tmp_path / "o1").exists()
    res, ours = merge(tmp_path, models["llama"], [AdapterInput("a", ad)], allow_pickle=True)
    assert_close_rel(ours, peft_reference(models["llama"], [(ad, 1.0)]), base_tensors["llama"])


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def _refused(model, adapters, tmp_path, match, **kw) -> MergeError:
    out = tmp_path / "refused"
    with pytest.raises(MergeError) as ei:
        merge_model(model, adapters, out, progress=False, **kw)
    e = ei.value
    assert match in e.message, e.message
    assert e.fix, "a MergeError must say how to fix it"
    assert not out.exists() or not any(out.iterdir())
    return e


def test_refuse_shape_mismatch(models, tmp_path):
    other = build_tiny_llama(tmp_path / "wide", intermediate_size=96)
    ad = build_tiny_lora(models["llama"], tmp_path / "ad")
    e = _refused(other, [AdapterInput("a", ad)], tmp_path, "shape mismatch")
    assert "mlp.gate_proj" in e.message


def test_refuse_unmatched_modules(models, tmp_path):
    ad = build_tiny_lora(models["llama"], tmp_path / "ad", targets=("q_proj", "v_proj"))
    e = _refused(models["gpt2"], [AdapterInput("a", ad)], tmp_path, "no weight in the backbone")
    assert "a:model.layers.0.self_attn.q_proj" in e.message


def test_refuse_lm_head_lora_on_tied_backbone(models, tmp_path):
    ad = build_tiny_lora(models["llama"], tmp_path / "ad", targets=("lm_head",))
    e = _refused(models["llama_tied"], [AdapterInput("a", ad)], tmp_path, "tied")
    assert "lm_head" in e.message


def test_refuse_dora_with_weight_and_mixed(models, tmp_path):
    d = build_tiny_lora(models["llama"], tmp_path / "d", use_dora=True, targets=("q_proj",))
    p = build_tiny_lora(models["llama"], tmp_path / "p", targets=("q_proj",))
    _refused(models["llama"], [AdapterInput("d", d, 0.5)], tmp_path, "DoRA")
    _refused(models["llama"], [AdapterInput("d", d), AdapterInput("p", p)], tmp_path, "DoRA")


def test_refuse_config_problems(models, tmp_path):
    ad = build_tiny_lora(models["llama"], tmp_path / "ad", targets=("q_proj",))
    cfg = read_adapter_config(ad)
    for change, match in [({"init_lora_weights": "pissa"}, "modifies the base"),
                          ({"r": 4}, "r=4"),
                          ({"peft_type": "IA3"}, "not LoRA"),
                          ({"layers_to_transform": [0]}, "layers_to_transform"),
                          ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
                          ({"trainable_token_indices": [1, 2]}, "trainable_token_indices")]:
        write_adapter_config(ad, {**cfg, **change})
        _refused(models["llama"], [AdapterInput("a", ad)], tmp_path, match)
    write_adapter_config(ad, cfg)


def test_refuse_conflicting_modules_to_save(models, tmp_path):
    a1 = build_tiny_lora(models["llama"], tmp_path / "a1", targets=("q_proj",), modules_to_save=["lm_head"], seed=1)
    a2 = build_tiny_lora(models["llama"], tmp_path / "a2", targets=("q_proj",), modules_to_save=["lm_head"], seed=2)
    _refused(models["llama"], [AdapterInput("a1", a1), AdapterInput("a2", a2)], tmp_path, "different values")
    # a replaced tensor cannot be scaled
    _refused(models["llama"], [AdapterInput("a1", a1, 0.5)], tmp_path, "cannot be scaled")
    # the same adapter twice agrees with itself
    res, _ = merge(tmp_path, models["llama"], [AdapterInput("x", a1), AdapterInput("y", a1)])
    assert res.provenance["stats"]["replaced"] == 1


def test_refuse_misc(models, tmp_path):
    ad = build_tiny_lora(models["llama"], tmp_path / "ad", targets=("q_proj",))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge_model(models["llama"], [AdapterInput("a", ad)], busy, progress=False)
    assert (busy / "x").exists()
    with pytest.raises(MergeError, match="dtype"):
        merge_model(models["llama"], [AdapterInput("a", ad)], tmp_path / "o", dtype="int8", progress=False)
    q = build_tiny_llama(tmp_path / "q")
    cfg = json.loads((q / "config.json").read_text())
    (q / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq"}}))
    _refused(q, [AdapterInput("a", ad)], tmp_path, "quantized")
    # unknown adapter keys
    from safetensors.torch import load_file, save_file
    sd = load_file(str(ad / "adapter_model.safetensors"))
    sd = {k.replace("lora_A", "lora_X"): v for k, v in sd.items()}
    save_file(sd, str(ad / "adapter_model.safetensors"))
    _refused(models["llama"], [AdapterInput("a", ad)], tmp_path, "does not understand")


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
def test_cache_hit_is_fast_and_keyed_on_content(models, tmp_path):
    root = tmp_path / "cache"
    ad = build_tiny_lora(models["llama3"], tmp_path / "ad", targets=("q_proj",))
    r1 = merge_cached(models["llama3"], [AdapterInput("a", ad)], cache_root=root, progress=False)
    assert not r1.cache_hit and r1.path == root / r1.key and (r1.path / COMPLETE_MARKER).exists()
    t = time.perf_counter()
    r2 = merge_cached(models["llama3"], [AdapterInput("renamed", ad)], cache_root=root, progress=False,
                      provenance={"recipe": "x"})
    assert time.perf_counter() - t < 1.0
    assert r2.cache_hit and r2.path == r1.path and r2.key == r1.key
    # the memo avoided re-reading any file
    hc = HashCache(root / ".file-hashes.json")
    merge_key(models["llama3"], [AdapterInput("a", ad)], hash_cache=hc)
    assert hc.hashed_bytes == 0
    # a different weight or dtype is another key
    r3 = merge_cached(models["llama3"], [AdapterInput("a", ad, 0.5)], cache_root=root, progress=False)
    r4 = merge_cached(models["llama3"], [AdapterInput("a", ad)], cache_root=root, progress=False, dtype="bfloat16")
    assert len({r1.key, r3.key, r4.key}) == 3 and not r3.cache_hit and not r4.cache_hit
    # XDG / PEFTDEPLOY_CACHE roots
    from peftdeploy.merge import default_cache_root
    env = dict(os.environ)
    try:
        os.environ.pop("PEFTDEPLOY_CACHE", None)
        os.environ["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
        assert default_cache_root() == tmp_path / "xdg" / "peftdeploy" / "merged"
        os.environ["PEFTDEPLOY_CACHE"] = str(tmp_path / "pd")
        assert default_cache_root() == tmp_path / "pd" / "merged"
    finally:
        os.environ.clear()
        os.environ.update(env)


def test_cache_hit_does_not_import_torch(models, tmp_path):
    root = tmp_path / "cache"
    ad = build_tiny_lora(models["llama"], tmp_path / "ad", targets=("q_proj",))
    merge_cached(models["llama"], [AdapterInput("a", ad)], cache_root=root, progress=False)
    code = ("import sys, json; from peftdeploy.merge import AdapterInput, merge_cached; "
            f"r = merge_cached({str(models['llama'])!r}, [AdapterInput('a', {str(ad)!r})], cache_root={str(root)!r}); "
            "print(json.dumps([r.cache_hit, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, False]


def test_explicit_output(models, tmp_path):
    root = tmp_path / "cache"
    a1 = build_tiny_lora(models["llama"], tmp_path / "a1", targets=("q_proj",), seed=1)
    a2 = build_tiny_lora(models["llama"], tmp_path / "a2", targets=("q_proj",), seed=2)
    out = tmp_path / "deploy" / "merged"
    r1 = merge_cached(models["llama"], [AdapterInput("a", a1)], output=out, cache_root=root, progress=False)
    assert r1.path == out and not r1.cache_hit and (out / "model.safetensors").exists()
    r2 = merge_cached(models["llama"], [AdapterInput("a", a1)], output=out, cache_root=root, progress=False)
    assert r2.cache_hit
    with pytest.raises(MergeError, match="different merge"):
        merge_cached(models["llama"], [AdapterInput("a", a2)], output=out, cache_root=root, progress=False)
    r3 = merge_cached(models["llama"], [AdapterInput("a", a2)], output=out, cache_root=root, progress=False,
                      overwrite=True)
    assert not r3.cache_hit and r3.key != r1.key
    assert json.loads((out / COMPLETE_MARKER).read_text())["key"] == r3.key
    assert [p.name for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))] == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README").write_text("mine")
    with pytest.raises(MergeError, match="not a peftdeploy"):
        merge_cached(models["llama"], [AdapterInput("a", a1)], output=foreign, cache_root=root, progress=False,
                     overwrite=True)
    assert (foreign / "README").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not merge_cached(models["llama"], [AdapterInput("a", a1)], output=empty, cache_root=root,
                            progress=False).cache_hit


_CHILD = r"""
import json, os, sys
from peftdeploy.merge import AdapterInput, merge_cached
r = merge_cached(sys.argv[1], [AdapterInput("a", sys.argv[2])], cache_root=sys.argv[3], progress=False)
print(json.dumps({"path": str(r.path), "hit": r.cache_hit, "pid": os.getpid()}), flush=True)
"""


def _child(model, ad, root, delay):
    env = dict(os.environ, PEFTDEPLOY_MERGE_TEST_DELAY=str(delay), PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(model), str(ad), str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_merge_is_never_a_hit(models, tmp_path):
    root = tmp_path / "cache"
    ad = build_tiny_lora(models["llama"], tmp_path / "ad", targets=("q_proj",))
    key, _ = merge_key(models["llama"], [AdapterInput("a", ad)])
    p = _child(models["llama"], ad, root, delay=0.5)
    deadline = time.time() + 60
    tmp = None
    while time.time() < deadline and tmp is None:
        for d in root.glob(f".tmp-{key}-*") if root.exists() else []:
            if (d / "model.safetensors").exists():
                tmp = d
        time.sleep(0.05)
    assert tmp is not None, p.communicate()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (root / key).exists()
    assert tmp.exists()  # the remains are there, but do not look complete
    r = merge_cached(models["llama"], [AdapterInput("a", ad)], cache_root=root, progress=False)
    assert not r.cache_hit and r.path == root / key and (r.path / COMPLETE_MARKER).exists()
    assert not tmp.exists()  # cleaned up
    load_dir(r.path)


def test_concurrent_merges_produce_one_result(models, tmp_path):
    root = tmp_path / "cache"
    ad = build_tiny_lora(models["llama"], tmp_path / "ad", targets=("q_proj",))
    procs = [_child(models["llama"], ad, root, delay=0.05) for _ in range(2)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, e
        outs.append(json.loads(o.strip().splitlines()[-1]))
    assert outs[0]["path"] == outs[1]["path"]
    assert sorted(o["hit"] for o in outs) == [False, True]
    merger = next(o for o in outs if not o["hit"])
    prov = json.loads((Path(merger["path"]) / "peftdeploy-provenance.json").read_text())
    assert prov["pid"] == merger["pid"]  # written once, by the process that did not hit
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock") and not p.name.startswith(".file-")] \
        == [Path(merger["path"]).name]
