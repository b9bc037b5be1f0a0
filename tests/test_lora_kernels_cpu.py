"""peftdeploy's CPU LoRA kernels (peftdeploy/vllm_plugin/lora_kernels/cpu.py), issue 15.

Unit: `PunicaWrapperPeftdeployCPU.add_lora_linear` (and the embedding / logits entry points) against a
float64 reference, ``y[t] += x[t] @ Aᵀ @ Bᵀ · scale`` per token by its adapter slot, with the wrapper
and its `LoRAMapping` built the way vLLM builds them (vllm/lora/model_manager.py, punica_wrapper/utils.py
convert_mapping: LoRA id 0 = base model, ids mapped to slots by ``lora_index_to_id``; is_prefill=True as
the V1 runner always sets it). Odd shapes, ranks 8/16/32/64, max_loras 1/4/8, 1-3 slices of unequal
widths, prefill-like contiguous segments, decode-like interleaved tokens, base tokens (their rows must
stay bit-identical), no-LoRA batches, adapters loaded into slots between steps, inference tensors.

End to end (slow): CPU vLLM fp32, offline ``vllm.LLM`` in one subprocess, first with the plugin's default
(peftdeploy kernels), then with ``PEFTDEPLOY_LORA_KERNELS=vllm``: greedy tokens for base + every demo
adapter, sequential and one concurrent mixed batch with 3 adapters + base at max_loras 2, must be equal,
equal the PEFT reference, and each engine logs which kernels it runs. The same answers show the demo model
in CPU vLLM (base answers "Paris", each demo adapter's style; formerly test_demo.py's own engine start).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_demo as fx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def W():
    from peftdeploy.vllm_plugin import cpu_fix

    cpu_fix.apply()  # the plugin applies it in every process; vLLM's fallback ops need it for index -1
    from peftdeploy.vllm_plugin.lora_kernels import cpu

    return cpu


def _wrapper(W, max_loras: int):
    return W.PunicaWrapperPeftdeployCPU(max_num_batched_tokens=4096, max_batches=4096, device="cpu")


def _mapping(layout: str, ntok: int, ids: list[int], rng: random.Random) -> list[int]:
    """LoRA id per token (0 = base) in vLLM's batch order: requests' tokens are contiguous."""
    if layout == "none":
        return [0] * ntok
    if layout == "prefill":  # a few requests, each a contiguous run of one adapter (or base)
        out: list[int] = []
        choices = ids + [0]
        while len(out) < ntok:
            out += [rng.choice(choices)] * rng.randint(1, max(1, ntok // 3))
        return out[:ntok]
    if layout == "decode":  # one token per request, adapters interleaved, some base
        return [rng.choice(ids + [0]) for _ in range(ntok)]
    if layout == "decode-lora":  # interleaved, no base token
        return [rng.choice(ids) for _ in range(ntok)]
    if layout == "one":
        return [ids[0]] * ntok
    raise ValueError(layout)


def _setup(max_loras: int, rank: int, d_in: int, widths: tuple[int, ...], seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(max_loras, 1, rank, d_in, generator=g).to(dtype) * 0.2 for _ in widths)
    b = tuple(torch.randn(max_loras, 1, w, rank, generator=g).to(dtype) * 0.2 for w in widths)
    return a, b


def _reference(y0, x, a, b, widths, token_slots, scale):
    ref = y0.double().clone()
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        off = 0
        for ai, bi, w in zip(a, b, widths):
            ref[t, off:off + w] += (x[t].double() @ ai[slot, 0].double().T) @ bi[slot, 0].double().T * scale
            off += w
    return ref


def _run_case(W, *, max_loras, rank, d_in, widths, ntok, layout, seed, scale=1.0, dtype=torch.float32,
              extra_cols=0, wrapper=None, stacks=None):
    from vllm.lora.layers import LoRAMapping

    rng = random.Random(seed)
    ids = rng.sample(range(1, 50), max_loras)  # lora int ids, arbitrary
    slots = list(range(max_loras))
    rng.shuffle(slots)
    lora_index_to_id: list[int | None] = [None] * max_loras
    for lid, s in zip(ids, slots):
        lora_index_to_id[s] = lid
    if max_loras > 2 and rng.random() < 0.5:  # an empty slot
        ids = ids[:-1]
        lora_index_to_id[slots[len(ids)]] = None
    mapping = _mapping(layout, ntok, ids, rng)
    w = wrapper or _wrapper(W, max_loras)
    w.update_metadata(LoRAMapping(tuple(mapping), tuple(mapping), is_prefill=True), lora_index_to_id, max_loras,
                      32000)
    a, b = stacks or _setup(max_loras, rank, d_in, widths, seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(ntok, d_in, generator=g).to(dtype)
    y0 = torch.randn(ntok, sum(widths) + extra_cols, generator=g).to(dtype)
    y = y0.clone()
    out = w.add_lora_linear(y, x, a, b, scale, widths)
    assert out is None
    id_to_slot = {lid: s for s, lid in enumerate(lora_index_to_id) if lid is not None}
    token_slots = [id_to_slot[m] if m > 0 else -1 for m in mapping]
    ref = _reference(y0, x, a, b, widths, token_slots, scale)
    base = [t for t, s in enumerate(token_slots) if s < 0]
    if base:
        assert torch.equal(y[base], y0[base]), "rows of base-model tokens changed"
    if extra_cols:
        assert torch.equal(y[:, sum(widths):], y0[:, sum(widths):])
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    err = (y.double() - ref).abs().max().item() if ntok else 0.0
    scale_ref = ref.abs().max().item() if ntok else 1.0
    assert err <= tol * max(1.0, scale_ref), (err, scale_ref, layout, max_loras, rank, widths)
    return w


SHAPES = [  # (d_in, widths): qkv-like unequal slices, gate_up-like, single
    (72, (40,)),
    (100, (64, 24)),
    (96, (96, 32, 32)),
    (33, (17, 5, 11)),
]


@pytest.mark.parametrize("rank", [8, 16, 32, 64])
@pytest.mark.parametrize("max_loras", [1, 4, 8])
@pytest.mark.parametrize("layout", ["prefill", "decode", "decode-lora", "one", "none"])
def test_add_lora_linear_matches_reference(W, rank, max_loras, layout):
    for i, (d_in, widths) in enumerate(SHAPES):
        for ntok in (1, 7, 37):
            _run_case(W, max_loras=max_loras, rank=rank, d_in=d_in, widths=widths, ntok=ntok, layout=layout,
                      seed=1000 * rank + 10 * max_loras + i + ntok)


def test_paths_are_all_exercised(W):
    """views (contiguous), dense (several interleaved adapters) and gather (few of many slots)."""
    from peftdeploy.vllm_plugin.lora_kernels.cpu import _Grouping

    g = _Grouping((3, 3, 3, 0, 5, 5), [5, 3, None, None], "cpu")
    assert g.views == ((0, 4, 6), (1, 0, 3)) and not g.dense and not g.gathered
    g = _Grouping((3, 5, 3, 0, 5), [5, 3], "cpu")
    assert g.dense and g.dense_rows == 4 and g.index.tolist() == [0, 1, 2, 4]
    g = _Grouping((3, 5, 3, 5), [5, 3], "cpu")
    assert g.dense and g.all_rows and g.index is None
    g = _Grouping((3, 0, 3, 0, 3), [5, 3, 7, 8, 9, 10, 11, 12], "cpu")
    assert not g.dense and g.gathered == ((1, 0, 3),) and g.index.tolist() == [0, 2, 4]
    g = _Grouping((0, 0), [5, 3], "cpu")
    assert g.empty
    g = _Grouping(tuple([3] * 40 + [5] * 40 + [3] * 40), [5, 3], "cpu")  # long runs: views
    assert g.views == ((0, 40, 80), (1, 0, 40), (1, 80, 120))
    # dense over a 2048-token mapping (numpy run-length path)
    rng = random.Random(0)
    m = tuple(rng.choice([0, 3, 5]) for _ in range(2048))
    g = _Grouping(m, [5, 3], "cpu")
    assert g.dense and g.dense_rows == sum(1 for v in m if v)
    for layout in ("prefill", "decode", "decode-lora"):
        _run_case(W, max_loras=4, rank=16, d_in=64, widths=(48, 16, 16), ntok=2048, layout=layout, seed=7)


def test_long_runs_are_views_short_runs_dense(W):
    """A prefill chunk (long run) stays a view even when the same slot also has decode tokens elsewhere;
    only the short runs go to the dense path."""
    from peftdeploy.vllm_plugin.lora_kernels.cpu import _Grouping

    m = (3, 5, 0, 3, 5, 3) + (3,) * 40
    g = _Grouping(m, [5, 3], "cpu")
    assert g.views == ((1, 5, 46),)
    assert g.dense and g.dense_rows == 4 and g.index.tolist() == [0, 1, 3, 4]


def _zero_slot(stacks, slot, slices=None):
    a, b = stacks
    for i, (ai, bi) in enumerate(zip(a, b)):
        if slices is None or i in slices:
            ai[slot].zero_()
            bi[slot].zero_()


def test_dead_slots_and_padded_ranks_cost_nothing_and_stay_exact(W, monkeypatch):
    """vLLM zero-fills the stacks of a module an adapter does not target, and pads a rank below
    max_lora_rank with zeros: those slots / slices / rank columns are skipped, exactly."""
    from vllm.lora.layers import LoRAMapping

    widths = (32, 8, 8)
    stacks = _setup(3, 16, 40, widths, 31)
    _zero_slot(stacks, 0)  # slot 0: adapter without this module
    _zero_slot(stacks, 1, slices={1})  # slot 1: q/v only (k zero)
    for t in stacks[0]:
        t[2, 0, 8:] = 0  # slot 2: rank 8 in a rank-16 stack
    w = _wrapper(W, 3)
    m = (5, 5, 0, 7, 9, 5, 7, 9) + (5,) * 40 + (7,) * 40
    w.update_metadata(LoRAMapping(m, m, is_prefill=True), [5, 7, 9], 3, 32000)
    x = torch.randn(len(m), 40)
    y0 = torch.randn(len(m), sum(widths))
    y = y0.clone()
    w.add_lora_linear(y, x, *stacks, 1.0, widths)
    slots = [{5: 0, 7: 1, 9: 2}.get(v, -1) for v in m]
    ref = _reference(y0, x, *stacks, widths, slots, 1.0)
    assert (y.double() - ref).abs().max().item() < 1e-4
    dead = [t for t, s in enumerate(slots) if s <= 0]
    assert torch.equal(y[dead], y0[dead])  # bit-for-bit untouched, not "+ 0"
    ent = next(iter(w._layers.values()))
    assert ent.live == frozenset({1, 2})
    assert ent.b_bd[1].shape == (32, 48) and [b[0] for b in ent.blocks[1]] == [slice(0, 16), slice(16, 32)]
    assert ent.b_bd[2].shape == (24, 48)  # 3 slices x rank 8
    # every LoRA token of the step is of the dead slot: no torch op at all
    m2 = (5,) * 6 + (0,) * 3
    w.update_metadata(LoRAMapping(m2, m2, is_prefill=True), [5, 7, 9], 3, 32000)
    calls = []
    monkeypatch.setattr(torch, "mm", lambda *x, **k: calls.append(1))
    y = torch.randn(9, sum(widths))
    y1 = y.clone()
    w.add_lora_linear(y, torch.randn(9, 40), *stacks, 1.0, widths)
    assert not calls and torch.equal(y, y1)


def test_dead_slot_loaded_later_becomes_live(W):
    for layout in ("decode-lora", "prefill", "one"):
        w = _wrapper(W, 4)
        stacks = _setup(4, 16, 48, (32, 16, 16), 13)
        for s in range(4):
            _zero_slot(stacks, s)
        _run_case(W, max_loras=4, rank=16, d_in=48, widths=(32, 16, 16), ntok=19, layout=layout, seed=5,
                  wrapper=w, stacks=stacks)
        fresh = _setup(4, 16, 48, (32, 16, 16), 14)
        for t, f in zip((*stacks[0], *stacks[1]), (*fresh[0], *fresh[1])):
            t.copy_(f)  # like set_lora into every slot
        _run_case(W, max_loras=4, rank=16, d_in=48, widths=(32, 16, 16), ntok=19, layout=layout, seed=5,
                  wrapper=w, stacks=stacks)


def test_no_lora_batch_returns_at_once(W, monkeypatch):
    from vllm.lora.layers import LoRAMapping

    w = _wrapper(W, 4)
    w.update_metadata(LoRAMapping((0,) * 9, (0,) * 9, is_prefill=True), [4, None, 2, None], 4, 32000)
    a, b = _setup(4, 16, 32, (8, 8), 0)
    calls = []
    monkeypatch.setattr(torch, "mm", lambda *x, **k: calls.append(1))
    y = torch.randn(9, 16)
    y0 = y.clone()
    w.add_lora_linear(y, torch.randn(9, 32), a, b, 1.0, (8, 8))
    assert not calls and torch.equal(y, y0)


def test_scale_bf16_fp16(W):
    for dt in (torch.bfloat16, torch.float16):
        for layout in ("prefill", "decode"):
            _run_case(W, max_loras=4, rank=16, d_in=64, widths=(32, 16, 16), ntok=23, layout=layout, seed=3,
                      scale=0.5, dtype=dt)
    _run_case(W, max_loras=4, rank=8, d_in=64, widths=(32, 16), ntok=23, layout="decode", seed=4, scale=2.0)
    _run_case(W, max_loras=4, rank=8, d_in=64, widths=(32,), ntok=23, layout="prefill", seed=4, scale=0.25,
              extra_cols=5)


def test_adapter_loaded_into_a_slot_between_steps(W):
    """vLLM writes a newly activated adapter into the stacks in place (set_lora / reset_lora): the
    cached concatenations must follow."""
    for layout in ("decode-lora", "prefill", "one"):
        w = _wrapper(W, 4)
        stacks = _setup(4, 16, 48, (32, 16, 16), 11)
        _run_case(W, max_loras=4, rank=16, d_in=48, widths=(32, 16, 16), ntok=19, layout=layout, seed=5,
                  wrapper=w, stacks=stacks)
        a, b = stacks
        for t in (*a, *b):  # like set_lora: slot-wise copy_ of new weights
            for s in range(4):
                t[s, 0, : t.shape[2] // 2].copy_(torch.randn_like(t[s, 0, : t.shape[2] // 2]))
        for s_ in range(4):  # like reset_lora
            a[0][s_][:, :, :1] = 0
        _run_case(W, max_loras=4, rank=16, d_in=48, widths=(32, 16, 16), ntok=19, layout=layout, seed=5,
                  wrapper=w, stacks=stacks)


def test_inference_tensors(W):
    """Stacks created under torch.inference_mode have no version counter: no cached copies, still exact."""
    for layout in ("decode-lora", "decode", "prefill"):
        with torch.inference_mode():
            stacks = _setup(4, 16, 48, (32, 16, 16), 12)
        with torch.inference_mode():
            w = _run_case(W, max_loras=4, rank=16, d_in=48, widths=(32, 16, 16), ntok=21, layout=layout, seed=6,
                          stacks=stacks)
        with torch.inference_mode():
            for t in (*stacks[0], *stacks[1]):
                t.mul_(-1.5)
            _run_case(W, max_loras=4, rank=16, d_in=48, widths=(32, 16, 16), ntok=21, layout=layout, seed=6,
                      stacks=stacks, wrapper=w)


def test_unsupported_falls_back_to_vllm_and_logs_once(W, caplog):
    """A case the wrapper does not handle goes to vLLM's op (correct, with cpu_fix) and says so once."""
    from vllm.lora.layers import LoRAMapping

    caplog.set_level(logging.WARNING, logger="vllm.peftdeploy")
    w = _wrapper(W, 4)
    m = (3, 0, 5, 3, 5, 0, 3)
    w.update_metadata(LoRAMapping(m, m, is_prefill=True), [5, 3, None, None], 4, 32000)
    a, b = _setup(4, 16, 32, (24, 8), 0)
    x = torch.randn(7, 32)
    y0 = torch.randn(7, 32)
    ref = _reference(y0, x, a, b, (24, 8), [1, -1, 0, 1, 0, -1, 1], 1.0)
    for _ in range(3):  # x in float64: mixed dtypes
        y = y0.double().clone()
        w.add_lora_linear(y, x.double(), a, b, 1.0, (24, 8))
        assert (y - ref).abs().max().item() < 1e-4
    lines = [r.getMessage() for r in caplog.records if "vLLM's CPU op" in r.getMessage()]
    assert len(lines) == 1 and "float64" in lines[0], lines
    # a token count that does not match the mapping
    y = torch.randn(9, 32)
    with pytest.raises(Exception):  # vLLM's own op cannot do it either (shape mismatch), but we do not guess
        w.add_lora_linear(y, torch.randn(9, 32), a, b, 1.0, (24, 8))
    assert any("9 input rows" in r.getMessage() for r in caplog.records)


def test_embedding_and_logits(W):
    from vllm.lora.layers import LoRAMapping

    rng = random.Random(2)
    for layout in ("prefill", "decode", "decode-lora"):
        w = _wrapper(W, 4)
        ids = [7, 9, 11]
        m = _mapping(layout, 13, ids, rng)
        l2i = [9, None, 7, 11]
        w.update_metadata(LoRAMapping(tuple(m), tuple(m), is_prefill=True), l2i, 4, 32000)
        slots = [l2i.index(v) if v else -1 for v in m]
        # embedding: x is the token's LoRA-A embedding row [T, rank], B [max_loras, 1, dim, rank]
        bst = torch.randn(4, 1, 40, 16)
        bst[2] = 0  # slot 2 (id 7): an adapter without embedding LoRA
        x = torch.randn(13, 16)
        y0 = torch.randn(13, 40)
        y = y0.clone()
        w.add_lora_embedding(y, x, bst, add_input=True)
        ref = y0.double().clone()
        for t, s in enumerate(slots):
            if s >= 0:
                ref[t] += x[t].double() @ bst[s, 0].double().T
        assert (y.double() - ref).abs().max().item() < 1e-4
        assert torch.equal(y[[t for t, s in enumerate(slots) if s < 0]], y0[[t for t, s in enumerate(slots) if s < 0]])
        # logits: rows are the sampled tokens (prompt mapping; here one per token)
        a = torch.randn(4, 1, 16, 24)
        b = torch.randn(4, 1, 50, 16)
        h = torch.randn(13, 24)
        lg0 = torch.randn(13, 56)  # padded vocab
        lg = lg0.clone()
        w.add_lora_logits(lg, h, a, b, 1.0)
        ref = _reference(lg0, h, (a,), (b,), (50,), slots, 1.0)
        assert (lg.double() - ref).abs().max().item() < 1e-4
        assert torch.equal(lg[:, 50:], lg0[:, 50:])


# ------------------------------------------------------------------------------------------------
# install(): which wrapper the platform names
# ------------------------------------------------------------------------------------------------
_INSTALL = textwrap.dedent(
    '''
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    from peftdeploy.vllm_plugin import register
    register(); register()
    from vllm.platforms import current_platform
    from peftdeploy.vllm_plugin import lora_kernels
    print("QUALNAME", current_platform.get_punica_wrapper(), lora_kernels.active())
    current_platform.get_punica_wrapper()
    '''
)


@pytest.mark.parametrize("env,expect,line", [
    (None, "peftdeploy.vllm_plugin.lora_kernels.cpu.PunicaWrapperPeftdeployCPU peftdeploy",
     "peftdeploy: LoRA kernels: peftdeploy (cpu segment GEMMs) on vLLM 0.32"),
    ("vllm", "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU vllm",
     "peftdeploy: LoRA kernels: vllm (PEFTDEPLOY_LORA_KERNELS=vllm)"),
    ("bogus", "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU vllm", "'bogus' is not one of"),
])
def test_install_selects_the_wrapper(env, expect, line):
    e = {k: v for k, v in os.environ.items() if k not in ("PEFTDEPLOY_LORA_KERNELS", "PEFTDEPLOY_RECIPE")}
    if env is not None:
        e["PEFTDEPLOY_LORA_KERNELS"] = env
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _INSTALL], env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"QUALNAME {expect}" in p.stdout, p.stdout
    assert p.stdout.count("peftdeploy: LoRA kernels:") == 1 and line in p.stdout, p.stdout


@pytest.mark.parametrize("env,expect", [(None, "peftdeploy"), ("auto", "peftdeploy"), ("vllm", "vllm"),
                                        ("bogus", "vllm")])
def test_active_now_follows_the_variable(monkeypatch, env, expect):
    """The compile hook asks `active_now`: an engine started after the variable changed reads it afresh."""
    from peftdeploy.vllm_plugin import lora_kernels as lk

    monkeypatch.setitem(lk._state, "result", "peftdeploy")  # installed earlier in this process with the default
    if env is None:
        monkeypatch.delenv("PEFTDEPLOY_LORA_KERNELS", raising=False)
    else:
        monkeypatch.setenv("PEFTDEPLOY_LORA_KERNELS", env)
    assert lk.active_now() == expect


def test_install_unverified_version_keeps_vllms(monkeypatch):
    import vllm

    from peftdeploy.vllm_plugin import lora_kernels as lk

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    monkeypatch.delenv("PEFTDEPLOY_LORA_KERNELS", raising=False)
    result, level, line = lk._choose()
    assert result == "vllm" and level == logging.WARNING and "0.99.0 is not verified" in line


# ------------------------------------------------------------------------------------------------
# end to end in CPU vLLM
# ------------------------------------------------------------------------------------------------
E2E_SCRIPT = textwrap.dedent(
    '''
    import json, os, sys
    from peftdeploy.vllm_compat import ensure_vllm_cpu_compat
    ensure_vllm_cpu_compat()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest


    def run(model, adapters, prompts, max_tokens):
        llm = LLM(model=model, dtype="float32", max_model_len=512, enable_lora=True, max_lora_rank=16,
                  max_loras=2, max_cpu_loras=3, seed=0, max_num_seqs=32)
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        names = list(adapters)
        reqs = {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(adapters.items())}
        reqs["base"] = None
        chats = [[{"role": "user", "content": p}] for p in prompts]
        out = {"sequential": {}, "mixed": []}
        for name in ["base"] + names:   # one model at a time
            outs = llm.chat(chats, sp, lora_request=reqs[name], use_tqdm=False)
            out["sequential"][name] = [list(o.outputs[0].token_ids) for o in outs]
        # one concurrent batch: every (model, prompt) pair, models interleaved, 3 adapters > max_loras 2
        pairs = [(n, i) for i in range(len(prompts)) for n in ["base"] + names]
        outs = llm.chat([chats[i] for _, i in pairs], sp, lora_request=[reqs[n] for n, _ in pairs],
                        use_tqdm=False)
        out["mixed"] = [[n, i, list(o.outputs[0].token_ids)] for (n, i), o in zip(pairs, outs)]
        del llm
        return out


    def main():   # one engine: the kernels PEFTDEPLOY_LORA_KERNELS names (this process has it from the start)
        model, adapters, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), \\
            int(sys.argv[4])
        kernels = os.environ["PEFTDEPLOY_LORA_KERNELS"]
        print(f"=== KERNELS {kernels}", flush=True)
        result = {kernels: run(model, adapters, prompts, max_tokens)}
        print(f"=== END {kernels}", flush=True)
        print("RESULT " + json.dumps(result), flush=True)


    if __name__ == "__main__":
        main()
    '''
)
E2E_PROMPTS = ["What is the capital of France?", *fx.EVAL_PROMPTS[:3]]
E2E_MAX_TOKENS = 40  # the demo-styles check (moved here from test_demo.py) reads 40-token answers, as it did there


@pytest.mark.slow
def test_e2e_peftdeploy_kernels_equal_vllm_and_peft(tmp_path):
    model_dir = fx.demo_model_dir()
    adapters = {n: str(fx.adapter_dir(n)) for n in fx.ADAPTER_NAMES}
    script = tmp_path / "kernels_e2e.py"
    script.write_text(E2E_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTDEPLOY_RECIPE", "PEFTDEPLOY_CPU_LORA_FIX")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # one process per engine, the engine core inside it (VLLM_ENABLE_V1_MULTIPROCESSING=0: no engine-core and
    # worker processes spawned, each importing vLLM again, ~25 s per engine here); `up` serves the compiled
    # peftdeploy kernels with vLLM's processes in test_up_e2e (e2e-serve against PEFT)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    log, res = "", {}
    for kernels in ("peftdeploy", "vllm"):
        proc = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(adapters),
                               json.dumps(E2E_PROMPTS), str(E2E_MAX_TOKENS)], cwd=str(tmp_path),
                              env={**env, "PEFTDEPLOY_LORA_KERNELS": kernels}, capture_output=True, text=True,
                              timeout=900)
        log += proc.stdout + proc.stderr
        r = next((json.loads(x[len("RESULT "):]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert r is not None, f"{kernels}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        res.update(r)

    # each engine says which kernels it runs: peftdeploy's by default, vLLM's with the env var
    ours, theirs = log.split("=== KERNELS vllm")[0], log.split("=== KERNELS vllm")[1]
    assert "peftdeploy: LoRA kernels: peftdeploy (cpu segment GEMMs) on vLLM 0.32" in ours
    assert "Using PunicaWrapperPeftdeployCPU" in ours
    assert "peftdeploy: LoRA kernels: vllm (PEFTDEPLOY_LORA_KERNELS=vllm)" in theirs
    assert "Using PunicaWrapperCPU" in theirs and "PunicaWrapperPeftdeployCPU" not in theirs
    assert "using vLLM's CPU op" not in log  # no fallback in the real model
    # peftdeploy's engine runs its LoRA model compiled (the default, cpu_compile.py), vLLM's eagerly
    assert "peftdeploy: LoRA model compiled" in ours and "peftdeploy: LoRA model compiled" not in theirs

    p, v = res["peftdeploy"], res["vllm"]
    assert p["sequential"] == v["sequential"]
    assert p["mixed"] == v["mixed"]
    for name, i, toks in p["mixed"]:  # batched with other adapters = alone
        assert toks == p["sequential"][name][i], (name, i)

    # the demo model in CPU vLLM (was test_demo.py::test_demo_model_in_cpu_vllm, which started an engine of its
    # own with the same model, adapters and prompts): the base model answers, each demo adapter keeps its style
    tok = fx.tokenizer(str(model_dir))
    texts = {n: [tok.decode(t, skip_special_tokens=True).strip() for t in p["sequential"][n]]
             for n in ["base", *fx.ADAPTER_NAMES]}
    assert "Paris" in texts["base"][0], texts["base"]
    for name in fx.ADAPTER_NAMES:
        assert sum(map(fx.STYLE_CHECKS[name], texts[name])) >= 3, (name, texts[name])

    # the PEFT reference (transformers + peft, float32, greedy, the same chat template)
    for name in ["base", *fx.ADAPTER_NAMES]:
        model = fx.load_model(model_dir, None if name == "base" else name)
        for i, prompt in enumerate(E2E_PROMPTS):
            enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=E2E_MAX_TOKENS, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            ref = out[0][enc["input_ids"].shape[1]:].tolist()
            got = p["sequential"][name][i]
            assert got == ref[:len(got)] and (len(got) == len(ref) or got[-1:] == [tok.eos_token_id]), \
                (name, prompt, tok.decode(got), tok.decode(ref))
