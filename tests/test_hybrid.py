"""Hybrid policy (issue 11) and what `up` materializes for merge plans (issues 6, 7).

Fast (tiny random Llama, no vLLM):
  * delta adapters are exact: with W' = W + s_H·B_H·A_H (the merge engine's output), for random x in
    float32, W'x + delta_i(x) == (W + s_i·B_i·A_i)x for every other adapter i and W'x + delta_base(x)
    == Wx, per module, with rank patterns, alpha patterns, rsLoRA, layers_to_transform and modules
    adapted by only one of the two adapters; and PEFT itself, loading a delta adapter on the merged
    model, gives the logits of the original adapter on the original model;
  * the delta build is cached (marker + atomic rename + lock): a second build is a hit, changed
    inputs rebuild, a killed build never looks complete;
  * plans: demo-hybrid serves pirate merged and json/shout/base as deltas with ranks 16/20/8 and
    max_lora_rank 32; offline-quantized merge plans serve the quantized directory they name;
  * `materialize` (what `up` runs before vLLM) builds exactly the planned paths, the second time
    from the caches; a hybrid recipe with a DoRA adapter is refused with exit 2 and no traceback.

Slow (CPU vLLM with the demo assets, float32): `up --detach recipes/demo-hybrid.yaml` gives, for every
model name, the greedy tokens of the plain unmerged deployment (the session's e2e serve deployment
from conftest, shared with test_up_e2e.py). (`up --detach` of demo-int8 and demo-w4a16:
tests/test_up_quantized_e2e.py, the same xdist group.)
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from peftdeploy.merge import AdapterInput, merge_cached  # noqa: E402
from peftdeploy.merge.delta import COMPLETE_MARKER, build_delta_adapters, build_delta_cached  # noqa: E402
from peftdeploy.plan import make_plan  # noqa: E402
from peftdeploy.recipe import load_recipe  # noqa: E402
from tests.conftest import ROOT, cli_env, free_e2e_port, peftdeploy_cmd  # noqa: E402
from tests.tiny import build_tiny_llama, build_tiny_lora  # noqa: E402

PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------- tiny assets
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama and adapters whose module sets overlap only partly (rank/alpha patterns, rsLoRA)."""
    d = tmp_path_factory.mktemp("hybrid-tiny")
    model = build_tiny_llama(d / "model")
    return {
        "model": model,
        # hot: q/v only, v with a smaller rank (rank_pattern) and its own alpha
        "hot": build_tiny_lora(model, d / "hot", r=8, alpha=16, targets=["q_proj", "v_proj"],
                               rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 4}, seed=1, b_scale=0.05),
        # rsLoRA on o/down (not in hot) and q (shared with hot)
        "rs": build_tiny_lora(model, d / "rs", r=6, alpha=12, targets=["q_proj", "o_proj", "down_proj"],
                              use_rslora=True, seed=2, b_scale=0.05),
        # all linear layers of layer 1 only, with a rank pattern: layer 0's q/v are hot-only modules
        "l1": build_tiny_lora(model, d / "l1", r=4, alpha=8, layers_to_transform=[1],
                              rank_pattern={"gate_proj": 2}, seed=3, b_scale=0.05),
        # larger rank than hot
        "big": build_tiny_lora(model, d / "big", r=16, alpha=8, targets=["v_proj", "up_proj"], seed=4, b_scale=0.05),
    }


def _peft_deltas(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """module -> ΔW of the adapter as PEFT computes it (get_delta_weight: scales, patterns, rsLoRA)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, str(adapter_dir))
    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            out[name[len(PREFIX):]] = mod.get_delta_weight("default").detach().to(torch.float32)
    return out


def _apply_delta(delta_dir: Path, module: str, x: torch.Tensor) -> torch.Tensor | None:
    cfg = json.loads((delta_dir / "adapter_config.json").read_text())
    assert not cfg["use_rslora"] and not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    t = load_file(str(delta_dir / "adapter_model.safetensors"))
    a, b = t.get(f"{PREFIX}{module}.lora_A.weight"), t.get(f"{PREFIX}{module}.lora_B.weight")
    if a is None:
        return None
    assert a.dtype == torch.float32 and a.shape[0] == b.shape[1] == cfg["r"]
    return (x @ a.T @ b.T) * (cfg["lora_alpha"] / cfg["r"])


@pytest.fixture(scope="module")
def merged_hot(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merged-cache")
    return merge_cached(tiny["model"], [AdapterInput("hot", tiny["hot"])], dtype="float32", cache_root=root,
                        progress=False).path


@pytest.fixture(scope="module")
def deltas(tiny, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("deltas") / "d"
    others = [(n, tiny[n], 1.0) for n in ("rs", "l1", "big")]
    return build_delta_adapters(("hot", tiny["hot"], 1.0), others, out, base_name="base")


# ------------------------------------------------------------------------------------ exactness
def test_delta_adapters_exact_per_module(tiny, merged_hot, deltas):
    w = load_file(str(tiny["model"] / "model.safetensors"))
    w_merged = load_file(str(merged_hot / "model.safetensors"))
    d_hot = _peft_deltas(tiny["model"], tiny["hot"])
    assert len(d_hot) == 2 * 2  # q, v in 2 layers
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for name in ("rs", "l1", "big", "base"):
        d_i = {} if name == "base" else _peft_deltas(tiny["model"], tiny[name])
        union = set(d_i) | set(d_hot)
        if name == "l1":
            assert set(d_hot) - set(d_i) and set(d_i) - set(d_hot)  # modules of only one of the two
        for mod in sorted(union):
            W = w[f"{mod}.weight"]
            Wp = w_merged[f"{mod}.weight"]
            x = torch.randn(7, W.shape[1], generator=g)
            got = x @ Wp.T + _apply_delta(deltas[name], mod, x)
            want = x @ (W + d_i[mod]).T if mod in d_i else x @ W.T
            err = (got - want).abs().max().item()
            worst = max(worst, err / (1.0 + want.abs().max().item()))
            assert err <= 1e-5 * (1.0 + want.abs().max().item()), (name, mod, err)
        # no LoRA on modules neither adapter touches
        t = load_file(str(deltas[name] / "adapter_model.safetensors"))
        assert {k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in t} == union
    print(f"\nworst relative error {worst:.2e}")


def test_delta_ranks(tiny, deltas):
    ranks = {n: json.loads((d / "adapter_config.json").read_text())["r"] for n, d in deltas.items()}
    assert ranks == {"base": 8, "rs": 6 + 8, "l1": 4 + 8, "big": 16 + 8}
    for d in deltas.values():
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["lora_alpha"] == cfg["r"]
        assert json.loads((d / "peftdeploy-delta.json").read_text())["hot"] == "hot"


def test_peft_logits_of_delta_on_merged_equal_original(tiny, merged_hot, deltas):
    """PEFT loads each written delta adapter (config as written) on the merged model and gives the
    logits of the original adapter (or of the bare model, for the base delta) on the original one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    for name in ("rs", "l1", "big", "base"):
        ref_model = AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32)
        if name != "base":
            ref_model = PeftModel.from_pretrained(ref_model, str(tiny[name]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(merged_hot), dtype=torch.float32),
                                          str(deltas[name]))
        # the config names exactly the adapted modules, and nothing PEFT does not know
        assert not [w for w in caught if "missing adapter keys" in str(w.message)
                    or "Unexpected keyword" in str(w.message)], [str(w.message)[:200] for w in caught]
        with torch.no_grad():
            want = ref_model.eval()(ids).logits
            got = m.eval()(ids).logits
        assert (got - want).abs().max().item() <= 1e-4, name
        assert (got.argmax(-1) == want.argmax(-1)).all(), name


def test_weights_fold_into_b(tiny, tmp_path):
    """A non-unit weight of an adapter scales its half of the delta (and of the hot half for H)."""
    d1 = build_delta_adapters(("hot", tiny["hot"], 1.0), [("rs", tiny["rs"], 1.0)], tmp_path / "a", base_name="b")
    d2 = build_delta_adapters(("hot", tiny["hot"], 1.0), [("rs", tiny["rs"], 0.5)], tmp_path / "c", base_name="b")
    t1 = load_file(str(d1["rs"] / "adapter_model.safetensors"))
    t2 = load_file(str(d2["rs"] / "adapter_model.safetensors"))
    k = f"{PREFIX}model.layers.0.self_attn.o_proj.lora_B.weight"
    assert torch.allclose(t2[k], 0.5 * t1[k])


def test_refuses_dora_and_name_clash(tiny, tmp_path):
    from peftdeploy.errors import MergeError

    dora = build_tiny_lora(tiny["model"], tmp_path / "dora", r=4, use_dora=True, targets=["q_proj"])
    with pytest.raises(MergeError, match="DoRA"):
        build_delta_adapters(("hot", tiny["hot"], 1.0), [("d", dora, 1.0)], tmp_path / "x", base_name="b")
    with pytest.raises(MergeError, match="distinct"):
        build_delta_adapters(("hot", tiny["hot"], 1.0), [("rs", tiny["rs"], 1.0)], tmp_path / "y", base_name="rs")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").glob("d/*"))


# ------------------------------------------------------------------------------------------ cache
def test_delta_cache_hit_rebuild_and_killed_build(tiny, tmp_path):
    out = tmp_path / "hy" / "k1"
    hot = ("hot", tiny["hot"], 1.0)
    others = [("rs", tiny["rs"], 1.0), ("big", tiny["big"], 1.0)]
    lines: list[str] = []
    r1 = build_delta_cached(hot, others, out, base_name="base", progress=lines.append)
    assert not r1.cache_hit and r1.ranks == {"base": 8, "rs": 14, "big": 24}
    assert len(lines) == 3 and any("rs (rank 6 + 8 = 14)" in x for x in lines)
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["key"] == r1.key
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r2 = build_delta_cached(hot, others, out, base_name="base", progress=lines.append)
    assert r2.cache_hit and r2.key == r1.key and len(lines) == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    # other inputs -> other key -> rebuilt in place
    r3 = build_delta_cached(hot, [("rs", tiny["rs"], 0.5)], out, base_name="base")
    assert not r3.cache_hit and r3.key != r1.key and set(r3.ranks) == {"base", "rs"} and not (out / "big").exists()
    # a directory without the marker (a killed build would never be renamed, but a foreign one) is no hit
    (out / COMPLETE_MARKER).unlink()
    (out.parent / f".tmp-{out.name}-999999").mkdir()  # leftover of a killed build
    r4 = build_delta_cached(hot, [("rs", tiny["rs"], 0.5)], out, base_name="base")
    assert not r4.cache_hit and (out / COMPLETE_MARKER).is_file()
    assert not (out.parent / f".tmp-{out.name}-999999").exists()


def test_delta_cache_hit_does_not_import_torch(tiny, tmp_path):
    out = tmp_path / "k"
    hot, others = ("hot", str(tiny["hot"]), 1.0), [("rs", str(tiny["rs"]), 1.0)]
    build_delta_cached(hot, others, out, base_name="base")
    code = (f"import sys, json; from peftdeploy.merge.delta import build_delta_cached; "
            f"r = build_delta_cached({hot!r}, {others!r}, {str(out)!r}, base_name='base'); "
            f"print(json.dumps([r.cache_hit, 'torch' in sys.modules]))")
    p = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [True, False]


# ------------------------------------------------------------------------------------------ plans
def test_plan_demo_hybrid(demo_model_dir):
    plan = make_plan(load_recipe(ROOT / "recipes" / "demo-hybrid.yaml"), device="cpu", host_memory="16GiB")
    assert plan.ok and plan.mode == "hybrid" and plan.merge_adapters == ("pirate",)
    spec = plan.launch
    step = spec.merge
    assert step.hot == "pirate" and step.weights == (1.0,) and step.quantize_scheme is None
    assert spec.served_model_name == "pirate" and spec.model == step.output_dir
    assert {a.name: a.rank for a in spec.adapters} == {"json": 8 + 8, "shout": 12 + 8, "demo-hybrid": 8}
    assert plan.derived["max_lora_rank"].value == 32  # 20 rounded up to a rank vLLM accepts
    argv = spec.argv()
    assert argv[argv.index("--max-lora-rank") + 1] == "32" and "--enable-lora" in argv
    i = argv.index("--lora-modules")
    mods = [json.loads(x) for x in argv[i + 1:i + 4]]
    assert [m["name"] for m in mods] == ["json", "shout", "demo-hybrid"]
    assert all(m["path"] == str(Path(step.delta_dir) / m["name"]) and m["base_model_name"] == "pirate"
               for m in mods)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in dict(spec.env)  # no on-demand originals on merged weights
    # the served port is the recipe's own
    assert spec.port == 8004 and spec.port not in (8000, 8001, 8002, 8003)


@pytest.mark.parametrize("recipe,scheme", [("demo-int8", "int8"), ("demo-w4a16", "w4a16")])
def test_plan_offline_quantized_serves_quantized_dir(demo_model_dir, monkeypatch, recipe, scheme):
    # the plan's layout, not this host's ISA: plan for an AVX-512 host, which runs both (AVX2: test_cpu_isa)
    monkeypatch.setenv("PEFTDEPLOY_CPU_FLAGS", "avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni")
    plan = make_plan(load_recipe(ROOT / "recipes" / f"{recipe}.yaml"), device="cpu", host_memory="16GiB")
    step = plan.launch.merge
    assert step.quantize_scheme == scheme and step.quantized_dir and step.quantized_dir != step.output_dir
    assert plan.launch.model == step.quantized_dir == step.served_dir
    assert plan.launch.argv()[2] == step.quantized_dir
    merged = make_plan(load_recipe(ROOT / "recipes" / "demo-merged.yaml"), device="cpu", host_memory="16GiB")
    if scheme == "int8":  # same dtype: one full-precision merge for both recipes
        assert merged.launch.merge.output_dir == step.output_dir
    assert merged.launch.model == merged.launch.merge.output_dir and merged.launch.merge.quantized_dir is None
    # --dry-run prints exactly the planned command
    p = subprocess.run(peftdeploy_cmd("up", str(ROOT / "recipes" / f"{recipe}.yaml"), "--dry-run"), env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == make_plan(load_recipe(ROOT / "recipes" / f"{recipe}.yaml")).launch.command_line()


# ------------------------------------------------------------------------------- up: materialize
def _tiny_recipe(tmp: Path, tiny: dict[str, Path], body: str, name: str) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""\
        apiVersion: peftdeploy/v1
        name: {name}
        backbone: {{model: {tiny['model']}, dtype: float32, max_model_len: 128}}
        adapters:
          - {{name: hot, source: {tiny['hot']}}}
          - {{name: rs, source: {tiny['rs']}}}
          - {{name: l1, source: {tiny['l1']}}}
        serving: {{port: {free_e2e_port()}}}
        """) + textwrap.dedent(body))
    return p


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(root))
    return root


def test_materialize_hybrid_builds_planned_paths(tiny, tmp_path, isolated_cache):
    from peftdeploy.launch.materialize import materialize

    rec = _tiny_recipe(tmp_path, tiny, "policy: {mode: hybrid, traffic: {hot: 0.8, rs: 0.1, l1: 0.1}}\n", "th")
    plan = make_plan(load_recipe(rec), device="cpu", host_memory="16GiB")
    assert plan.ok, plan.errors
    spec = plan.launch
    assert str(isolated_cache) in spec.model and spec.merge.delta_dir.startswith(str(isolated_cache))
    logs: list[str] = []
    spec2, info = materialize(plan, spec, log=logs.append)
    assert spec2 is spec  # nothing rewritten: the dry-run command is what runs
    assert not info["cache_hit"] and not info["delta"]["cache_hit"]
    assert info["delta"]["ranks"] == {"th": 8, "rs": 14, "l1": 12}
    for a in spec.adapters:
        cfg = json.loads((Path(a.path) / "adapter_config.json").read_text())
        assert cfg["r"] == a.rank
    assert (Path(spec.model) / "model.safetensors").is_file()
    assert any(x.startswith("delta: rs (rank 6 + 8 = 14)") for x in logs)
    logs.clear()
    _, info2 = materialize(make_plan(load_recipe(rec), device="cpu", host_memory="16GiB"), spec, log=logs.append)
    assert info2["cache_hit"] and info2["delta"]["cache_hit"]
    assert "merge: cache hit" in "\n".join(logs) and "delta: cache hit" in "\n".join(logs)


def test_materialize_merge_int8_serves_quantized(tiny, tmp_path, isolated_cache):
    pytest.importorskip("compressed_tensors")
    from peftdeploy.launch.materialize import materialize

    # rtn: this test is about the planned paths and the caches; GPTQ through the tool venv is test_quantize_llmc's
    # (auto picks it when .venv-quantize exists: ~75 s of calibration here for nothing this test asserts)
    rec = _tiny_recipe(tmp_path, tiny, "quantization: {scheme: int8, method: rtn}\n"
                       "policy: {mode: merge, merge: {adapters: [hot]}}\n", "tq")
    plan = make_plan(load_recipe(rec), device="cpu", host_memory="16GiB")
    spec = plan.launch
    assert spec.model == spec.merge.quantized_dir
    _, info = materialize(plan, spec, log=lambda m: None)
    q = Path(spec.model)
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert json.loads((q / COMPLETE_MARKER).read_text())["key"] == info["quantize"]["key"]
    assert not info["quantize"]["cache_hit"]
    # the served directory shares the quantize cache's files (hard links), it is not a second copy
    src = Path(info["quantize"]["cache_path"]) / "model.safetensors"
    assert os.path.samefile(src, q / "model.safetensors") or (q / "model.safetensors").read_bytes() == src.read_bytes()
    _, info2 = materialize(plan, spec, log=lambda m: None)
    assert info2["cache_hit"] and info2["quantize"]["cache_hit"]


def test_up_hybrid_refuses_dora_without_traceback(tiny, tmp_path, isolated_cache):
    dora = build_tiny_lora(tiny["model"], tmp_path / "dora", r=4, use_dora=True, targets=["q_proj"])
    rec = tmp_path / "td.yaml"
    rec.write_text(textwrap.dedent(f"""\
        apiVersion: peftdeploy/v1
        name: td
        backbone: {{model: {tiny['model']}, dtype: float32, max_model_len: 128}}
        adapters:
          - {{name: hot, source: {tiny['hot']}}}
          - {{name: d, source: {dora}}}
        policy: {{mode: hybrid, hybrid: {{hot: hot}}}}
        serving: {{port: {free_e2e_port()}}}
        """))
    env = dict(cli_env(), PEFTDEPLOY_CACHE=str(isolated_cache))
    p = subprocess.run(peftdeploy_cmd("up", str(rec)), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "DoRA" in p.stderr and "Traceback" not in p.stderr and "vLLM: starting" not in p.stderr


# ------------------------------------------------------------------------------ slow: CPU vLLM
MAX_TOKENS = 24


def _client(dep):
    from openai import OpenAI

    return OpenAI(base_url=dep.base_url, api_key="EMPTY", max_retries=0, timeout=300)


def _greedy(client, model: str, prompt: str) -> tuple[list[int], list[float]]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=1,
                                  extra_body={"return_token_ids": True})
    ch = r.choices[0]
    assert ch.token_ids is not None, "vLLM did not return token ids"
    return list(ch.token_ids), list(ch.logprobs.token_logprobs or [])


def _chat_prompt(model_dir: Path, q: str) -> str:
    from tests.fixtures_demo import tokenizer

    return tokenizer(str(model_dir)).apply_chat_template([{"role": "user", "content": q}],
                                                        add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def hybrid(e2e_up, demo_model_dir):
    d = e2e_up(ROOT / "recipes" / "demo-hybrid.yaml")
    yield d
    d.down()  # a vLLM server holds ~4 GiB: the ones a module starts stop with it, not at session end


@pytest.mark.slow
def test_hybrid_tokens_equal_plain_deployment(hybrid, e2e_serve, demo_model_dir):
    """Every model name of the hybrid deployment returns the plain unmerged deployment's greedy tokens.

    Exact equality is required (no tolerance): the hybrid computes the same function in float32 with
    a different summation order (W'x + B_d·A_d·x instead of Wx + s·B·A·x), a difference of ~1e-6
    relative in the logits, which could only flip a token at an exact near-tie; the logprobs of the
    chosen tokens are printed side by side for the record.
    """
    from tests.fixtures_demo import EVAL_PROMPTS

    assert hybrid.info["mode"] == "hybrid" and hybrid.info["base_model"] == "pirate"
    assert hybrid.info["merge"]["delta"]["ranks"] == {"demo-hybrid": 8, "json": 16, "shout": 20}
    plain_base = e2e_serve.info["base_model"]
    pairs = {"pirate": "pirate", "json": "json", "shout": "shout", "demo-hybrid": plain_base}
    listed = {m.id for m in _client(hybrid).models.list().data}
    assert listed == set(pairs)
    prompts = [_chat_prompt(demo_model_dir, q) for q in EVAL_PROMPTS] + ["The capital of France is"]
    ch, cp = _client(hybrid), _client(e2e_serve)
    total = same = 0
    worst_lp = 0.0
    mismatches = []
    plain: dict[tuple[str, str], list[int]] = {}
    for hname, pname in pairs.items():
        for p in prompts:
            got, lp_h = _greedy(ch, hname, p)
            want, lp_p = _greedy(cp, pname, p)
            plain[(hname, p)] = want
            total += 1
            if got == want:
                same += 1
                worst_lp = max([worst_lp, *(abs(a - b) for a, b in zip(lp_h, lp_p))])
            else:
                mismatches.append((hname, p[-40:], got, want))
    print(f"\nhybrid vs plain: {same}/{total} sequences token-identical ({MAX_TOKENS} tokens); "
          f"max |Δ logprob| of the chosen tokens {worst_lp:.2e}")
    assert not mismatches, mismatches
    # same function, other float32 summation order: the logprobs agree to ~1e-5 (measured 1.9e-5)
    assert worst_lp < 1e-3

    # batched: the hot model (no LoRA) and the deltas in flight together, more deltas than max_loras
    jobs = [(m, p) for m in pairs for p in prompts] * 2
    random.Random(0).shuffle(jobs)
    with cf.ThreadPoolExecutor(max_workers=len(jobs)) as ex:
        got = list(ex.map(lambda j: _greedy(ch, j[0], j[1])[0], jobs))
    bad = [(m, p[-40:]) for (m, p), g in zip(jobs, got) if g != plain[(m, p)]]
    print(f"hybrid, {len(jobs)} concurrent requests: {len(jobs) - len(bad)}/{len(jobs)} equal the plain tokens")
    assert not bad, bad
