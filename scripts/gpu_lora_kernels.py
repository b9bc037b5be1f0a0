#!/usr/bin/env python3
"""Per-layer LoRA kernel micro-benchmark and check on one GPU: peftdeploy's Triton kernels
(peftdeploy/vllm_plugin/lora_kernels/triton_ops.py) against vLLM's punica kernels (lora_shrink +
lora_expand, called exactly as vLLM's PunicaWrapperGPU.add_lora_linear calls them) when vLLM is
importable, on the Llama-3-8B layer shapes (qkv, o, gate_up, down), 8 adapters of rank 16, Zipf(1.0)
over the adapters, batches of 1/16/64/256 tokens (decode) and 1024/8192 tokens (prefill segments of
964 tokens).

    python3 scripts/gpu_lora_kernels.py --out OUT [--sweep] [--check] [--bench] [--best-out FILE]

--check  bf16 and fp16 against a float64 reference (‖out − ref‖ / ‖Δref‖, base rows bit-identical,
         output poisoned first so unwritten rows show) for every shape and batch size; vLLM's too.
--sweep  time candidate launch configurations per (token bucket, shape); write the fastest per key
         to --best-out (the JSON that PEFTDEPLOY_LORA_KERNEL_CONFIG takes, and triton_ops.TUNED holds).
--bench  µs per LoRA layer, peftdeploy (chosen config) vs vLLM, and the memory floor (adapter weights
         of the active adapters + x + y read-modify-write, over the measured copy bandwidth).
Timing: CUDA-graph replays (triton.testing.do_bench_cudagraph, median); each timed call runs 8
layers with distinct weights (rotating past L2) and the figure is per layer. Writes OUT/lora_kernels.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peftdeploy.vllm_plugin.lora_kernels import act_fused as AF  # noqa: E402
from peftdeploy.vllm_plugin.lora_kernels import norm_fused as NF  # noqa: E402
from peftdeploy.vllm_plugin.lora_kernels import triton_ops as O  # noqa: E402

SHAPES = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
          "down": (14336, (4096,))}
TOKENS = (64, 1028, 8192, 2956, 16, 256, 1024)  # the measured workload's decode batch and prefill steps first
# (each is its bucket's O.BUCKET_TOKENS: 1028 = 64 running decode tokens + one 964-token prompt)
L, R, LAYERS, PROMPT, DECODE = 8, 16, 8, 964, 64
SMOKE = __import__("os").environ.get("TRITON_INTERPRET") == "1"  # CPU dry run of this script's code paths
PDL = not SMOKE and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
if SMOKE:
    SHAPES = {"qkv": (64, (64, 32, 32)), "gate_up": (64, (48, 48)), "down": (96, (32,))}
    TOKENS = (5, 300)
    LAYERS = 2


def log(m: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)


def zipf_slots(T: int, seed: int, dev: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([1.0 / (i + 1) for i in range(L)])
    if T <= 256:  # decode: one token per request
        return torch.multinomial(p, T, replacement=True, generator=g).to(dev)
    # a prefill step: the running requests' decode tokens (one each, Zipf over the adapters), then
    # contiguous prompt segments
    dec = min(DECODE, T - 1)
    out, t = torch.multinomial(p, dec, replacement=True, generator=g).tolist(), dec
    while t < T:
        n = min(PROMPT, T - t)
        out += [int(torch.multinomial(p, 1, generator=g))] * n
        t += n
    return torch.tensor(out, device=dev)


class Layer:
    def __init__(self, K: int, widths: tuple[int, ...], dtype: torch.dtype, dev: str, seed: int):
        g = torch.Generator(device=dev).manual_seed(seed)
        self.A = [(torch.randn(L, 1, R, K, generator=g, device=dev) / K ** 0.5).to(dtype) for _ in widths]
        self.B = [(torch.randn(L, 1, w, R, generator=g, device=dev) / R ** 0.5).to(dtype) for w in widths]


def reference(y, x, layer: Layer, slots) -> torch.Tensor:
    out = y.double().clone()
    col = 0
    for a, b in zip(layer.A, layer.B):
        w = b.shape[-2]
        for s in range(L):
            m = slots == s
            if m.any():
                h = x[m].double() @ a[s, 0].double().T
                out[m, col:col + w] += h @ b[s, 0].double().T
        col += w
    return out


def vllm_fn():
    if SMOKE:
        return None
    try:
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
    except Exception as e:  # noqa: BLE001
        log(f"vLLM's LoRA ops not importable ({type(e).__name__}: {e}); peftdeploy only")
        return None

    def make(T: int, slots: torch.Tensor):
        meta = LoRAKernelMeta.make(L, T, device=slots.device)
        meta.prepare_tensors(slots.to(torch.int32))

        def run(y, x, layer: Layer):
            buf = torch.empty((len(layer.A), T, R), dtype=torch.float32, device=x.device)
            if "scaling" in str(getattr(getattr(lora_shrink, "default", None), "_schema", "scaling")):
                lora_shrink(x, list(layer.A), buf, *meta.meta_args(T, False), 1.0)  # vLLM 0.26
            else:
                lora_shrink(x, list(layer.A), buf, *meta.meta_args(T, False))
            lora_expand(buf, list(layer.B), y, *meta.meta_args(T, False), offset_start=0, add_inputs=True)
        return run
    return make


def pd_fn(T: int, slots: torch.Tensor, cfg: O.Config | None):
    tiles, nl = O.make_tiles(slots.to(torch.int32), L, max_tokens=8192)  # sized as in the server

    def run(y, x, layer: Layer):
        O.lora_linear(y, x, layer.A, layer.B, tiles, nl, scale=1.0, config=cfg)
    return run


def time_layers(run, y, x, layers) -> float:
    def fn():
        for ly in layers:
            run(y, x, ly)
    fn()
    if SMOKE:
        return float("nan")
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=60, return_mode="median") * 1000.0 / len(layers)  # µs per layer


def copy_bandwidth() -> float:
    if SMOKE:
        return 1e12
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), rep=100, return_mode="median")
    return 2 * a.numel() / (ms / 1000)  # bytes/s, read + write


def floor_us(T, K, widths, slots, bw) -> float:
    active = int(torch.unique(slots[slots >= 0]).numel())
    w = active * (len(widths) * R * K + sum(widths) * R) * 2
    io = T * K * 2 + T * sum(widths) * 4
    return (w + io) / bw * 1e6


def candidates(T: int) -> list[O.Config]:
    if T <= 256:
        bm = 16 if T <= 64 else 32
        out = [O.Config(fused=False, bm=bm, bn=bn, bk=bk, split_k=sk) for sk, bk, bn in
               ((1, 256, 128), (4, 128, 128), (8, 128, 128), (16, 64, 128), (8, 128, 64), (8, 128, 256),
                (4, 256, 256), (16, 128, 128))]
        out += [O.Config(fused=True, bm=bm, bn=bn, bk=bk, n_iters=it, stages=st) for bn, it, bk, st in
                ((128, 1, 128, 2), (128, 2, 128, 2), (64, 1, 256, 2), (256, 1, 128, 2), (64, 1, 256, 3),
                 (128, 1, 256, 3), (32, 1, 256, 3), (64, 1, 128, 4))]
        out += [O.Config(fused=False, bm=bm, bn=128, bk=128, split_k=sk, stages=3) for sk in (8, 16)]
        if T == 256:
            out += [O.Config(fused=False, bm=16, bn=128, bk=128, split_k=8), O.Config(fused=False, bm=64, bn=128,
                                                                                       bk=64, split_k=4)]
        return out
    # prefill steps of a few prompts have few tiles: deeper K splits (down_proj's K = 14336)
    extra = [O.Config(fused=False, bm=bm, bn=128, bk=128, split_k=sk) for bm, sk in
             (((64, 4), (64, 8), (64, 16), (32, 8), (32, 16), (128, 8), (128, 16)) if T <= 4096 else
              ((64, 4), (128, 4), (128, 8)))]
    return extra + [O.Config(fused=False, bm=64, bn=128, bk=64), O.Config(fused=False, bm=64, bn=256, bk=64),
            O.Config(fused=False, bm=128, bn=128, bk=64, warps=8), O.Config(fused=False, bm=64, bn=128, bk=128,
                                                                             split_k=2),
            O.Config(fused=True, bm=64, bn=128, bk=64, n_iters=4), O.Config(fused=True, bm=128, bn=128, bk=64,
                                                                             n_iters=4, warps=8),
            O.Config(fused=False, bm=128, bn=256, bk=64, warps=8, stages=3)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/gpu")
    ap.add_argument("--check", action="store_true", help="check against float64 (with --gemm: only that)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--best-out", default=None)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--deadline-s", type=float, default=470)
    ap.add_argument("--gemm", action="store_true", help="the shrink inside the base GEMM (lora_gemm) against "
                    "base GEMM + split kernels and the base GEMM alone; checks it, sweeps its expand, writes "
                    "the best as 'gemm:' entries of --best-out")
    ap.add_argument("--slots", type=int, default=L, help="adapter slots (max_loras); Zipf(1.0) over them")
    ap.add_argument("--no-sweep-gemm", action="store_true", help="--gemm: time the default configuration only")
    a = ap.parse_args()
    globals()["L"] = a.slots
    if a.gemm:
        return gemm_main(a)
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if SMOKE else "cuda"
    res: dict = {"gpu": None if SMOKE else torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
                 "check": [], "sweep": [], "bench": [], "best": {}}
    try:
        import vllm

        res["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        res["vllm"] = None
    vmake = vllm_fn()
    tokens = [int(t) for t in a.tokens.split(",")]

    def save():
        (out / "lora_kernels.json").write_text(json.dumps(res, indent=1, default=str))

    if a.check:
        for dtype in ((torch.float16,) if SMOKE else (torch.bfloat16, torch.float16)):
            for name, (K, widths) in SHAPES.items():
                ly = Layer(K, widths, dtype, dev, seed=hash(name) % 997)
                for T in ((1, 7, 300) if SMOKE else (1, 64, 1000, 2000)):
                    slots = zipf_slots(T, T, dev)
                    slots[torch.rand(T, device=dev) < 0.2] = -1
                    x = torch.randn(T, K, device=dev).to(dtype)
                    y = torch.randn(T, sum(widths), device=dev).to(dtype)
                    ref = reference(y, x, ly, slots)
                    d = (ref - y.double())[slots >= 0].norm()
                    row = {"dtype": str(dtype), "shape": name, "T": T}
                    for who, runf in (("peftdeploy", pd_fn(T, slots, None)),
                                      ("vllm", vmake(T, slots) if vmake else None)):
                        if runf is None:
                            continue
                        o = y.clone()
                        runf(o, x, ly)
                        if not SMOKE:
                            torch.cuda.synchronize()
                        base = slots < 0
                        row[who] = {"rel_err": float((o.double() - ref)[~base].norm() / d) if d > 0 else 0.0,
                                    "base_rows_identical": bool(torch.equal(o[base], y[base])),
                                    "finite": bool(torch.isfinite(o).all())}
                    res["check"].append(row)
                    log(f"check {row}")
        save()
        bad = [r for r in res["check"] if r["peftdeploy"]["rel_err"] > 1e-2 or not r["peftdeploy"]["base_rows_identical"]
               or not r["peftdeploy"]["finite"]]
        log(f"check: {len(res['check'])} cases, {len(bad)} bad")
        if bad:
            return 3
    bw = copy_bandwidth()
    res["copy_bandwidth_GBps"] = bw / 1e9
    log(f"device copy bandwidth {bw / 1e9:.0f} GB/s")
    dtype = torch.float16 if SMOKE else torch.bfloat16
    best: dict[str, dict] = {}
    layer_sets = {name: [Layer(K, widths, dtype, dev, seed=i) for i in range(LAYERS)]
                  for name, (K, widths) in SHAPES.items()}
    for T in tokens:
        for name, (K, widths) in SHAPES.items():
            layers = layer_sets[name]
            if time.time() - t0 > a.deadline_s:
                log(f"deadline: skip {name} T={T}")
                continue
            slots = zipf_slots(T, 1, dev)
            x = torch.randn(T, K, device=dev).to(dtype)
            y = torch.randn(T, sum(widths), device=dev).to(dtype)
            key = O.config_key(T, K, widths, R)
            fl = floor_us(T, K, widths, slots, bw)
            if a.sweep:
                times = []
                for cfg in candidates(T):
                    try:
                        us = time_layers(pd_fn(T, slots, cfg), y, x, layers)
                    except Exception as e:  # noqa: BLE001
                        log(f"  {name} T={T} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    times.append((us, cfg))
                    res["sweep"].append({"shape": name, "T": T, "key": key, "config": cfg.__dict__, "us": us})
                times.sort(key=lambda t: t[0])
                if times:
                    best[key] = times[0][1].__dict__
                    res["best"][key] = {"config": times[0][1].__dict__, "us": times[0][0]}
                    log(f"sweep {name} T={T}: best {times[0][0]:.1f} µs {times[0][1]} (floor {fl:.1f} µs); "
                        f"worst {times[-1][0]:.1f}")
                save()
            if a.bench:
                cfg = O.Config(**best[key]) if key in best else None
                row = {"shape": name, "T": T, "floor_us": fl,
                       "peftdeploy_us": time_layers(pd_fn(T, slots, cfg), y, x, layers),
                       "config": (cfg or O.choose_config(T, K, widths, R)).__dict__}
                if vmake:
                    row["vllm_us"] = time_layers(vmake(T, slots), y, x, layers)
                    row["speedup"] = row["vllm_us"] / row["peftdeploy_us"]
                res["bench"].append(row)
                log(f"bench {name} T={T}: peftdeploy {row['peftdeploy_us']:.1f} µs"
                    + (f", vLLM {row['vllm_us']:.1f} µs ({row['speedup']:.2f}x)" if vmake else "")
                    + f", floor {fl:.1f} µs")
                save()
    if a.best_out and best:
        Path(a.best_out).write_text(json.dumps(best, indent=1))
        log(f"wrote {len(best)} tuned configs to {a.best_out}")
    if res["bench"]:
        print("\n| layer | tokens | peftdeploy µs | vLLM µs | vLLM / peftdeploy | floor µs |")
        print("|---|---|---|---|---|---|")
        for r in res["bench"]:
            print(f"| {r['shape']} | {r['T']} | {r['peftdeploy_us']:.1f} | {r.get('vllm_us', float('nan')):.1f} | "
                  f"{r.get('speedup', float('nan')):.2f} | {r['floor_us']:.1f} |")
    res["total_s"] = time.time() - t0
    save()
    log(f"total {res['total_s']:.0f} s")
    return 0


class GemmLayer(Layer):
    """A base layer (W) with its LoRA: `ext` = [W; A_0; ...] as gemm_fused.convert stores it."""

    def __init__(self, K: int, widths: tuple[int, ...], dtype: torch.dtype, dev: str, seed: int):
        super().__init__(K, widths, dtype, dev, seed)
        g = torch.Generator(device=dev).manual_seed(seed + 1000)
        n = sum(widths)
        self.ext = torch.cat([(torch.randn(n, K, generator=g, device=dev) / K ** 0.5).to(dtype)]
                             + [a.reshape(L * R, K) for a in self.A])
        self.W = self.ext[:n]
        self.n = n


def _least(*v: float | None) -> float:
    v = [x for x in v if x is not None and x == x]
    return min(v) if v else float("nan")


def gemm_candidates(T: int) -> list[O.Config]:
    bms = (16, 32) if T <= 64 else ((32, 64) if T <= 256 else (64, 128))
    return [O.Config(fused=True, bm=bm, bn=bn, bk=16, n_iters=it, warps=w)
            for bm in bms for bn, it in ((64, 1), (128, 1), (128, 2)) for w in (4,)]


def gemm_main(a: argparse.Namespace) -> int:
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if SMOKE else "cuda"
    dtype = torch.float16 if SMOKE else torch.bfloat16
    res: dict = {"gpu": None if SMOKE else torch.cuda.get_device_name(), "triton": triton.__version__,
                 "check": [], "rows": [], "best": {}}
    tokens = [int(t) for t in a.tokens.split(",")]
    best: dict[str, dict] = {}
    if a.best_out and Path(a.best_out).exists():
        best = json.loads(Path(a.best_out).read_text())

    def save():
        (out / "lora_gemm.json").write_text(json.dumps(res, indent=1, default=str))

    for name, (K, widths) in SHAPES.items():  # check: bf16 against float64, padding rows included
        ly = GemmLayer(K, widths, dtype, dev, seed=7)
        for T in ((5, 300) if SMOKE else (1, 64, 1000)):
            slots = zipf_slots(T, T, dev)
            slots[torch.rand(T, device=dev) < 0.2] = -1
            mapped = max(1, T - 3)
            x = torch.randn(T, K, device=dev).to(dtype)
            tiles, nl = O.make_tiles(slots[:mapped].to(torch.int32), L, max_tokens=8192)
            base = x.double() @ ly.W.double().T
            full = slots.clone()
            full[mapped:] = -1
            ref = reference(base, x, ly, full)
            no = full < 0
            d = (ref - base)[~no].norm()
            for pdl in ((False, True) if PDL else (False,)):
                y = O.lora_gemm(x, ly.ext, None, ly.n, ly.B, tiles, nl, L, R, 1.0, pdl=pdl)
                row = {"shape": name, "T": T, "pdl": pdl,
                       "rel_err": float(((y.double() - base) - (ref - base))[~no].norm() / d) if d > 0 else 0.0,
                       "base_rows_max_abs": float((y.double()[no] - base[no]).abs().max()) if no.any() else 0.0,
                       "finite": bool(torch.isfinite(y).all())}
                res["check"].append(row)
                log(f"check {row}")
            if name == "gate_up":  # the expand inside the activation: silu(gate)·up against float64
                act = AF.lora_silu_mul(torch.nn.functional.linear(x, ly.ext), ly.B, tiles, nl, widths[0], L, R)
                aref = AF.reference(x, ly.W, ly.A, ly.B, full)
                aplain = AF.reference(x, ly.W, ly.A, ly.B, torch.full_like(full, -1))
                ad = (aref - aplain)[~no].norm()
                row = {"shape": "gate_up+silu", "T": T, "pdl": False,
                       "rel_err": float((act.double() - aref)[~no].norm() / ad) if ad > 0 else 0.0,
                       "base_rows_max_abs": float((act.double()[no] - aref[no]).abs().max()) if no.any() else 0.0,
                       "finite": bool(torch.isfinite(act).all())}
                res["check"].append(row)
                log(f"check {row}")
            if len(widths) == 1:  # o / down: the expand inside the residual add + RMSNorm after the layer
                g = torch.Generator(device=dev).manual_seed(T)
                resid = torch.randn(T, widths[0], generator=g, device=dev).to(dtype)
                nw = (1 + 0.2 * torch.randn(widths[0], generator=g, device=dev)).to(dtype)
                wide = torch.nn.functional.linear(x, ly.ext)
                nout, _ = NF.lora_add_rms_norm(wide, resid, ly.B[0], nw, 1e-5, full.to(torch.int32),
                                              torch.tensor([mapped], device=dev), R)
                nref, _ = NF.reference(wide, resid, ly.B[0], nw, 1e-5, full)
                nplain, _ = NF.reference(wide, resid, ly.B[0], nw, 1e-5, torch.full_like(full, -1))
                nd = (nref - nplain)[~no].norm()
                row = {"shape": name + "+add_rms_norm", "T": T, "pdl": False,
                       "rel_err": float((nout.double() - nref)[~no].norm() / nd) if nd > 0 else 0.0,
                       "base_rows_max_abs": float((nout.double()[no] - nref[no]).abs().max()) if no.any() else 0.0,
                       "finite": bool(torch.isfinite(nout).all())}
                res["check"].append(row)
                log(f"check {row}")
    bad = [r for r in res["check"] if r["rel_err"] > 1e-2 or r["base_rows_max_abs"] > 0.1 or not r["finite"]]
    log(f"check: {len(res['check'])} cases, {len(bad)} bad")
    save()
    if bad:
        return 3
    if a.check:  # --gemm --check: the checks only
        return 0
    layer_sets = {name: [GemmLayer(K, widths, dtype, dev, seed=i) for i in range(LAYERS)]
                  for name, (K, widths) in SHAPES.items()}
    for T in tokens:
        for name, (K, widths) in SHAPES.items():
            if time.time() - t0 > a.deadline_s:
                log(f"deadline: skip {name} T={T}")
                continue
            layers = layer_sets[name]
            slots = zipf_slots(T, 1, dev)
            tiles, nl = O.make_tiles(slots.to(torch.int32), L, max_tokens=8192)
            x = torch.randn(T, K, device=dev).to(dtype)
            y = torch.empty(T, sum(widths), device=dev, dtype=dtype)

            def base_run(y, x, ly):
                torch.nn.functional.linear(x, ly.W)

            def split_run(y, x, ly):
                yy = torch.nn.functional.linear(x, ly.W)
                O.lora_linear(yy, x, ly.A, ly.B, tiles, nl, scale=1.0)

            def ext_run(y, x, ly):  # the base GEMM with the A rows, no expand
                torch.nn.functional.linear(x, ly.ext)

            def copy_run(y, x, ly):  # ... + a second launch that only copies y out (the floor of any expand)
                y.copy_(torch.nn.functional.linear(x, ly.ext)[:, :ly.n])

            def fused(cfg, pdl=False):
                def run(y, x, ly):
                    O.lora_gemm(x, ly.ext, None, ly.n, ly.B, tiles, nl, L, R, 1.0, config=cfg, pdl=pdl)
                return run

            row = {"shape": name, "T": T, "slots": L, "base_us": time_layers(base_run, y, x, layers),
                   "split_us": time_layers(split_run, y, x, layers), "ext_us": time_layers(ext_run, y, x, layers),
                   "copy_us": time_layers(copy_run, y, x, layers)}
            if PDL:
                row["pdl_us"] = time_layers(fused(None, True), y, x, layers)
            times = []
            for cfg in ([] if a.no_sweep_gemm else gemm_candidates(T)):
                try:
                    times.append((time_layers(fused(cfg), y, x, layers), cfg))
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} T={T} {cfg}: {type(e).__name__}: {str(e)[:200]}")
            times.sort(key=lambda t: t[0])
            row["default_us"] = time_layers(fused(None), y, x, layers)
            if PDL:  # twice, interleaved: the spread of one setting is the noise of this comparison
                row["pdl2_us"] = time_layers(fused(None, True), y, x, layers)
                row["default2_us"] = time_layers(fused(None), y, x, layers)
            if times:
                row["fused_us"], row["config"] = times[0][0], times[0][1].__dict__
                best["gemm:" + O.config_key(T, K, widths, R)] = times[0][1].__dict__
            if name == "gate_up":  # gate_up's expand inside the MLP's activation (act_fused.py), act included
                inter = widths[0]

                def act_base(y, x, ly):  # the merged model: GEMM, then silu·mul
                    AF.lora_silu_mul(torch.nn.functional.linear(x, ly.W), ly.B, tiles, nl, inter, L, R, no_lora=True)

                def act_unfused(y, x, ly):  # GEMM-fused LoRA, then silu·mul
                    yy = O.lora_gemm(x, ly.ext, None, ly.n, ly.B, tiles, nl, L, R, 1.0)
                    AF.lora_silu_mul(yy, ly.B, tiles, nl, inter, L, R, no_lora=True)

                def act_fused(y, x, ly):  # the wide GEMM output straight into the fused activation
                    AF.lora_silu_mul(torch.nn.functional.linear(x, ly.ext), ly.B, tiles, nl, inter, L, R)

                row["act_base_us"] = time_layers(act_base, y, x, layers)
                row["act_unfused_us"] = time_layers(act_unfused, y, x, layers)
                row["act_fused_us"] = time_layers(act_fused, y, x, layers)
                row["act_fused2_us"] = time_layers(act_fused, y, x, layers)
                row["act_unfused2_us"] = time_layers(act_unfused, y, x, layers)
                log(f"  gate_up + silu·mul T={T}: merged {row['act_base_us']:.1f} µs; LoRA GEMM-fused + "
                    f"{_least(row['act_unfused_us'], row['act_unfused2_us']) - row['act_base_us']:.1f}, "
                    f"expand in the activation + "
                    f"{_least(row['act_fused_us'], row['act_fused2_us']) - row['act_base_us']:.1f}")
            if len(widths) == 1:  # o / down + vLLM's fused_add_rms_norm after it (norm_fused.py)
                H = widths[0]
                resid = torch.randn(T, H, device=dev).to(dtype)
                nw = torch.ones(H, device=dev, dtype=dtype)
                tmap, cnt = slots.to(torch.int32), torch.tensor([T], device=dev)

                def norm_base(y, x, ly):  # the merged model: GEMM, then the residual add + RMSNorm
                    NF.lora_add_rms_norm(torch.nn.functional.linear(x, ly.W), resid, ly.B[0], nw, 1e-5, tmap, cnt, R,
                                         no_lora=True)

                def norm_unfused(y, x, ly):  # GEMM-fused LoRA, then the norm
                    yy = O.lora_gemm(x, ly.ext, None, ly.n, ly.B, tiles, nl, L, R, 1.0)
                    NF.lora_add_rms_norm(yy, resid, ly.B[0], nw, 1e-5, tmap, cnt, R, no_lora=True)

                def norm_fused(y, x, ly):  # the wide GEMM output straight into the fused norm
                    NF.lora_add_rms_norm(torch.nn.functional.linear(x, ly.ext), resid, ly.B[0], nw, 1e-5, tmap,
                                         cnt, R)

                row["norm_base_us"] = time_layers(norm_base, y, x, layers)
                row["norm_unfused_us"] = time_layers(norm_unfused, y, x, layers)
                row["norm_fused_us"] = time_layers(norm_fused, y, x, layers)
                row["norm_fused2_us"] = time_layers(norm_fused, y, x, layers)
                row["norm_unfused2_us"] = time_layers(norm_unfused, y, x, layers)
                log(f"  {name} + add·RMSNorm T={T}: merged {row['norm_base_us']:.1f} µs; LoRA GEMM-fused + "
                    f"{_least(row['norm_unfused_us'], row['norm_unfused2_us']) - row['norm_base_us']:.1f}, "
                    f"expand in the norm + "
                    f"{_least(row['norm_fused_us'], row['norm_fused2_us']) - row['norm_base_us']:.1f}")
            res["rows"].append(row)
            log(f"{name} T={T} slots={L}: base {row['base_us']:.1f} µs, +split {row['split_us'] - row['base_us']:.1f}, "
                f"+fused {row.get('fused_us', float('nan')) - row['base_us']:.1f} (default config "
                f"{row['default_us'] - row['base_us']:.1f}, PDL {row.get('pdl_us', float('nan')) - row['base_us']:.1f}; "
                f"A rows {row['ext_us'] - row['base_us']:.1f}, + a copy launch {row['copy_us'] - row['base_us']:.1f}) "
                f"{row.get('config')}")
            save()
    if a.best_out and best:
        Path(a.best_out).write_text(json.dumps(best, indent=1))
    print("\n| layer | tokens | slots | base GEMM µs | + split LoRA | + GEMM-fused (default) | + fused, PDL | "
          "+ A rows only | + A rows and a copy launch | fused / split |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in res["rows"]:
        b = r["base_us"]
        ds, df = r["split_us"] - b, _least(r["default_us"], r.get("default2_us"), r.get("fused_us")) - b
        dp = _least(r.get("pdl_us"), r.get("pdl2_us")) - b
        print(f"| {r['shape']} | {r['T']} | {r['slots']} | {b:.1f} | {ds:.1f} | {df:.1f} | {dp:.1f} | "
              f"{r['ext_us'] - b:.1f} | {r['copy_us'] - b:.1f} | {df / ds if ds else nan:.2f} |")
    res["total_s"] = time.time() - t0
    save()
    log(f"total {res['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
