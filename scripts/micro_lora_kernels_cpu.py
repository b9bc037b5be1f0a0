#!/usr/bin/env python3
"""CPU time of the LoRA math of one engine step, the demo's exact shapes and adapters (issue 15).

    .venv/bin/python scripts/micro_lora_kernels_cpu.py        # ~1 min, no vLLM server, 1 thread

SmolLM2-135M's linears (hidden 576, 30 layers, qkv 576+192+192, o, gate_up 2x1536, down) with vLLM's
LoRA stacks filled as vLLM fills them (max_loras 3, max_lora_rank 16, zero-padded ranks, zero stacks
for modules an adapter does not target, PEFT scaling folded into B) from the three demo adapters
(pirate r8 q/v, json r8 all linear, shout r12 o/down rsLoRA). Times the 120 add_lora_linear calls of
one step with vLLM's CPU punica wrapper (the baseline) and peftdeploy's, for decode / mixed batches,
next to the base model's own 120 GEMMs for the same tokens; CPU time of this thread (time.thread_time,
min of 7), so other load on the machine matters less than for wall time. Writes
out/micro_lora_kernels_cpu.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

H, I, KV, R = 576, 1536, 192, 16
NAMES = ["pirate", "json", "shout"]  # slots 0, 1, 2 = LoRA ids 1, 2, 3
MODS = {"qkv": (H, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), (H, KV, KV)),
        "o": (H, ("self_attn.o_proj",), (H,)), "gate_up": (H, ("mlp.gate_proj", "mlp.up_proj"), (I, I)),
        "down": (I, ("mlp.down_proj",), (H,))}
CASES = {  # LoRA id per token, vLLM's batch order
    "decode 8, pirate": [1] * 8,
    "decode 8, 3 adapters interleaved": [1, 1, 2, 1, 3, 1, 2, 1],
    "decode 8 mixed + 120 prefill pirate": [1, 1, 2, 1, 3, 1, 2, 1] + [1] * 120,
    "decode 8 mixed + 120 prefill json": [1, 1, 2, 1, 3, 1, 2, 1] + [2] * 120,
    "decode 8 + 120 prefill, pirate": [1] * 128,
}


def stacks():
    import torch
    from safetensors import safe_open

    from peftdeploy.demo import demo_adapter_dir

    ads = []
    for n in NAMES:
        d = demo_adapter_dir(n)
        c = json.loads((Path(d) / "adapter_config.json").read_text())
        sc = c["lora_alpha"] / (c["r"] ** 0.5 if c.get("use_rslora") else c["r"])
        f = safe_open(str(Path(d) / "adapter_model.safetensors"), "pt")
        ads.append((f, set(f.keys()), sc))
    out = {}
    for layer in range(30):
        for m, (din, subs, outs) in MODS.items():
            a = tuple(torch.zeros(len(NAMES), 1, R, din) for _ in outs)
            b = tuple(torch.zeros(len(NAMES), 1, w, R) for w in outs)
            for s, (f, keys, sc) in enumerate(ads):
                for i, sub in enumerate(subs):
                    k = f"base_model.model.model.layers.{layer}.{sub}.lora_A.weight"
                    if k in keys:
                        A = f.get_tensor(k).float()
                        B = f.get_tensor(k.replace("lora_A", "lora_B")).float() * sc
                        a[i][s, 0, : A.shape[0]] = A
                        b[i][s, 0, :, : B.shape[1]] = B
            out[(layer, m)] = (a, b, outs)
    return out


def main() -> int:
    import torch
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from peftdeploy.vllm_plugin import cpu_fix
    from peftdeploy.vllm_plugin.lora_kernels.cpu import PunicaWrapperPeftdeployCPU

    cpu_fix.apply()
    torch.set_num_threads(1)
    stk = stacks()
    base_w = {m: torch.randn(sum(o), din) for m, (din, _, o) in MODS.items()}

    def best(f, reps=7):
        t_min = 1e9
        for _ in range(reps):
            t = time.thread_time()
            f()
            t_min = min(t_min, time.thread_time() - t)
        return 1000 * t_min

    rows = []
    for name, mapping in CASES.items():
        n = len(mapping)
        xs = {m: torch.randn(n, din) for m, (din, _, _) in MODS.items()}
        row = {"case": name, "tokens": n}
        row["base_gemms_ms"] = best(lambda: [torch.mm(xs[m], base_w[m].t()) for _ in range(30) for m in MODS])
        for key, cls in (("vllm", PunicaWrapperCPU), ("peftdeploy", PunicaWrapperPeftdeployCPU)):
            w = cls(8192, 256, "cpu", max_loras=len(NAMES))
            w.update_metadata(LoRAMapping(tuple(mapping), tuple(mapping), is_prefill=n > 8), [1, 2, 3],
                              len(NAMES), 49152)
            ys = {m: torch.zeros(n, sum(o)) for m, (_, _, o) in MODS.items()}
            row[f"{key}_ms"] = best(lambda: [w.add_lora_linear(ys[m], xs[m], a, b, 1.0, outs)
                                             for (_, m), (a, b, outs) in stk.items()])
        rows.append(row)
    print(f"\n{'case':38s} {'tok':>4s} {'base GEMMs':>11s} {'vLLM LoRA':>10s} {'peftdeploy':>11s} {'speed-up':>8s}"
          "   (ms CPU per step, 1 thread; LoRA as % of base GEMMs)")
    for r in rows:
        print(f"{r['case']:38s} {r['tokens']:4d} {r['base_gemms_ms']:11.2f} {r['vllm_ms']:10.2f} "
              f"{r['peftdeploy_ms']:11.2f} {r['vllm_ms'] / r['peftdeploy_ms']:7.1f}x   "
              f"({100 * r['vllm_ms'] / r['base_gemms_ms']:.0f}% -> {100 * r['peftdeploy_ms'] / r['base_gemms_ms']:.0f}%)")
    (REPO / "out").mkdir(exist_ok=True)
    p = REPO / "out" / "micro_lora_kernels_cpu.json"
    p.write_text(json.dumps({"rows": rows, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    print(f"\nwrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
