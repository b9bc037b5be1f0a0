#!/usr/bin/env python
"""Benchmark the streaming LoRA merge against `cp -r`, PEFT and mergekit.

Builds (once, reused from --cache-dir) a random Llama-shaped bf16 model of ~1.7 GB in several
safetensors shards (TinyLlama dimensions with 16 layers: hidden 2048, intermediate 5632, 32 heads,
4 kv heads, vocab 32000) and a rank-16 LoRA adapter on all linear projections, then runs, each in
its own process, one after the other:

  cp -r (x2)        copying the model directory: the disk/page-cache limit (1st run warms the cache)
  ours (hub-cache backbone)
                    peftdeploy.merge.merge_model on the model laid out as a Hugging Face hub cache
                    (blobs hard-linked, snapshot symlinks): how an `hf://` backbone sits on disk;
                    the shards' SHA-256 (provenance) are their blob names
  ours (local dir, hash memoized)
                    the plain directory, with the shards' SHA-256 memoized (a HashCache that has
                    seen them: every merge after the first from that directory)
  ours (local dir, first sight)
                    the plain directory, never hashed: SHA-256 of every shard runs alongside the
                    merge (on this 2-core machine SHA-256 of 1.67 GB alone costs ~0.8 s of CPU)
  ours cached cold  merge_cached (content-addressed cache, hub-cache backbone) into an empty cache
  ours cached hit   merge_cached again (key lookup only)
  peft              AutoModelForCausalLM.from_pretrained(bf16) + PeftModel + merge_and_unload +
                    save_pretrained
  mergekit          mergekit-yaml, passthrough of "model+lora" (from --mergekit-venv; skipped
                    with a note if it is not installed there)

and reports wall time, CPU time (user + sys) and peak RSS (ru_maxrss of the child) of each, with
ratios to cp and to PEFT, and the 1-minute load average at each run (the machine may be shared:
CPU time is the figure other jobs disturb least), as a table and as JSON (--json prints it; it is always written to
out/bench_merge.json). The page cache cannot be dropped without root, so every run reads a warm
cache (cp runs first, twice); `sync` is run between runs so that one run's dirty pages are not
written back during the next one.

Usage: .venv/bin/python scripts/bench_merge.py [--json] [--skip-peft] [--skip-mergekit]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# model + adapter
# ---------------------------------------------------------------------------------------------
def build_model(d: Path, a: argparse.Namespace) -> Path:
    spec = {k: getattr(a, k) for k in ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads",
                                       "shard_mb")}
    stamp = d / ".bench-complete"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        cfg = json.loads((d / "config.json").read_text())
        if not cfg.get("architectures"):  # models built by an earlier version of this script
            cfg["architectures"] = ["LlamaForCausalLM"]
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
        return d
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, intermediate_size=a.intermediate,
                vocab_size=a.vocab, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
                architectures=["LlamaForCausalLM"]).save_pretrained(str(d))
    hd = a.hidden // a.heads
    shapes = [("model.embed_tokens.weight", (a.vocab, a.hidden))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (a.hidden,)),
                   (p + "self_attn.q_proj.weight", (a.heads * hd, a.hidden)),
                   (p + "self_attn.k_proj.weight", (a.kv_heads * hd, a.hidden)),
                   (p + "self_attn.v_proj.weight", (a.kv_heads * hd, a.hidden)),
                   (p + "self_attn.o_proj.weight", (a.hidden, a.heads * hd)),
                   (p + "post_attention_layernorm.weight", (a.hidden,)),
                   (p + "mlp.gate_proj.weight", (a.intermediate, a.hidden)),
                   (p + "mlp.up_proj.weight", (a.intermediate, a.hidden)),
                   (p + "mlp.down_proj.weight", (a.hidden, a.intermediate))]
    shapes += [("model.norm.weight", (a.hidden,)), ("lm_head.weight", (a.vocab, a.hidden))]
    limit = a.shard_mb << 20
    groups: list[list] = [[]]
    size = 0
    for n, s in shapes:
        nb = 2
        for x in s:
            nb *= x
        if groups[-1] and size + nb > limit:
            groups.append([])
            size = 0
        groups[-1].append((n, s))
        size += nb
    g = torch.Generator().manual_seed(0)
    wm = {}
    total = 0
    for i, grp in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {}
        for n, s in grp:
            if len(s) == 1:
                sd[n] = (1 + 0.1 * torch.randn(s, generator=g)).to(torch.bfloat16)
            else:
                sd[n] = (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
            wm[n] = fn
            total += sd[n].numel() * 2
        save_file(sd, str(d / fn), metadata={"format": "pt"})
        del sd
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": wm}, indent=2))
    stamp.write_text(json.dumps(spec))
    return d


def build_adapter(d: Path, model: Path, a: argparse.Namespace) -> Path:
    spec = {"rank": a.rank, "model": str(model), "hidden": a.hidden, "layers": a.layers, "targets": a.targets}
    stamp = d / ".bench-complete"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return d
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=a.targets).save_pretrained(str(d))
    idx = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    from peftdeploy.merge.shard_read import read_header

    shapes = {}
    for f in set(idx.values()):
        shapes.update({n: t.shape for n, t in read_header(model / f).tensors.items()})
    g = torch.Generator().manual_seed(1)
    sd = {}
    for n, s in shapes.items():
        mod = n.rsplit(".", 1)[0]
        if mod.rsplit(".", 1)[-1] in a.targets:
            out_f, in_f = s
            sd[f"base_model.model.{mod}.lora_A.weight"] = torch.randn((a.rank, in_f), generator=g) / in_f ** 0.5
            sd[f"base_model.model.{mod}.lora_B.weight"] = torch.randn((out_f, a.rank), generator=g) * 0.01
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(json.dumps(spec))
    return d


def build_hub_layout(root: Path, model: Path) -> Path:
    """The model as a Hugging Face hub cache holds it (blobs named by their hash, a snapshot of
    symlinks to them), without copying: blobs are hard links to the model's files. This is what a
    backbone from `hf://` looks like on disk: the LFS blob names are the files' SHA-256, so the
    merge knows the backbone's hashes without reading it."""
    import hashlib

    from peftdeploy.merge.hashing import sha256_file

    repo = root / "models--bench--llama"
    rev = "0" * 40
    snap = repo / "snapshots" / rev
    stamp = repo / ".bench-complete"
    files = sorted(p for p in model.iterdir() if p.is_file() and not p.name.startswith("."))
    spec = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return snap
    shutil.rmtree(repo, ignore_errors=True)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for p in files:
        if p.suffix == ".safetensors":  # LFS: blob name = sha256 of the content
            name = sha256_file(p)
        else:  # git blob id, as the hub names small files
            data = p.read_bytes()
            name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / name
        try:
            os.link(p, blob)
        except OSError:
            shutil.copy2(p, blob)
        (snap / p.name).symlink_to(Path("../../blobs") / name)
    stamp.write_text(json.dumps(spec))
    return snap


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
TIME = "/usr/bin/time"


def run_measured(name: str, argv: list[str], log_dir: Path, env: dict | None = None) -> dict:
    """Run argv in its own process; wall time, and peak RSS from /usr/bin/time (ru_maxrss of a
    process forked from the small `time`, not from this big Python: Linux carries the parent's
    RSS high-water mark into a forked child's ru_maxrss across exec)."""
    subprocess.run(["sync"], check=False)
    tag = name.replace(" ", "_").replace("(", "").replace(")", "")
    log = log_dir / f"{tag}.log"
    k = 0
    while log.exists():
        k += 1
        log = log_dir / f"{tag}.{k}.log"
    tfile = log.with_suffix(".time")
    use_time = os.access(TIME, os.X_OK)
    full = [TIME, "-f", "%M %U %S", "-o", str(tfile)] + argv if use_time else argv
    load0 = os.getloadavg()[0]
    with open(log, "wb") as lf:
        t = time.perf_counter()
        p = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT, env=env or os.environ.copy())
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    rss, user, sys_ = ru.ru_maxrss * 1024, ru.ru_utime, ru.ru_stime
    if use_time:
        try:
            last = tfile.read_text().strip().splitlines()[-1].split()
            rss, user, sys_ = int(last[0]) * 1024, float(last[1]), float(last[2])
        except (OSError, ValueError, IndexError):
            pass
    res = {"name": name, "wall_s": round(wall, 3), "max_rss_bytes": rss, "user_s": round(user, 2),
           "sys_s": round(sys_, 2), "cpu_s": round(user + sys_, 2), "rc": p.returncode, "log": str(log),
           "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    if p.returncode != 0:
        res["error"] = log.read_text(errors="replace")[-2000:]
    print(f"  {name:20s} {wall:7.2f} s  cpu {user + sys_:6.2f} s  {rss / 2**20:8.0f} MiB  load {load0:5.2f}  "
          f"rc={p.returncode}", file=sys.stderr, flush=True)
    return res


def summarize(name: str, runs: list[dict]) -> dict:
    """Median wall, max RSS over repeated runs (all samples kept)."""
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return dict(runs[-1], name=name)
    walls = sorted(r["wall_s"] for r in ok)
    cpus = sorted(r["cpu_s"] for r in ok)
    out = dict(ok[0], name=name)
    out["wall_s"] = walls[len(walls) // 2]
    out["wall_min_s"] = walls[0]
    out["cpu_s"] = cpus[len(cpus) // 2]
    out["max_rss_bytes"] = max(r["max_rss_bytes"] for r in ok)
    out["samples"] = [{"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "max_rss_bytes": r["max_rss_bytes"],
                       "load_1min": r["load_1min"], "detail": r.get("detail")} for r in ok]
    ins = [r["detail"]["total_s"] for r in ok if isinstance(r.get("detail"), dict) and "total_s" in r["detail"]]
    if ins:
        out["in_process_s"] = sorted(ins)[len(ins) // 2]
    return out


def _lora_scale(adapter: Path) -> float:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    return cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])


def _detail(r: dict) -> dict:
    try:
        r["detail"] = json.loads(Path(r["log"]).read_text().strip().splitlines()[-1])
    except (ValueError, IndexError, OSError):
        pass
    return r


HUB = "peftdeploy (hub-cache backbone)"
MEMO_ROW = "peftdeploy (local dir, hash memoized)"
FIRST = "peftdeploy (local dir, first sight)"
OURS = """
import sys, json
from peftdeploy.merge import AdapterInput, HashCache, merge_model
hc = HashCache(sys.argv[6]) if len(sys.argv) > 6 else None
r = merge_model(sys.argv[1], [AdapterInput("bench", sys.argv[2])], sys.argv[3], progress=False,
                shard_size_bytes=int(sys.argv[4]), threads=int(sys.argv[5]), hash_cache=hc)
print(json.dumps(r.provenance["timings"]))
"""
MEMO = """
import sys
from pathlib import Path
from peftdeploy.merge import HashCache
hc = HashCache(sys.argv[2])
hc.sha256_many(sorted(Path(sys.argv[1]).glob("*.safetensors")))
hc.save()
"""
OURS_CACHED = """
import sys, json
from peftdeploy.merge import AdapterInput, merge_cached
r = merge_cached(sys.argv[1], [AdapterInput("bench", sys.argv[2])], cache_root=sys.argv[3], progress=False,
                 shard_size_bytes=int(sys.argv[4]), threads=int(sys.argv[5]))
print(json.dumps({"hit": r.cache_hit, "seconds": r.seconds, "timings": r.provenance.get("timings")}))
"""
PEFT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3], max_shard_size=int(sys.argv[4]))
"""
CHECK = """
import sys, json, torch
from safetensors import safe_open
def load(d, names, prefix=""):
    try:
        wm = json.load(open(d + "/model.safetensors.index.json"))["weight_map"]
    except FileNotFoundError:
        wm = None
    out = {}
    for n in names:
        with safe_open(d + "/" + (wm[prefix + n] if wm else "adapter_model.safetensors"), "pt") as f:
            out[n] = f.get_tensor(prefix + n)
    return out
names, scale = sys.argv[5].split(","), float(sys.argv[6])
ours, peft, base = load(sys.argv[1], names), load(sys.argv[2], names), load(sys.argv[3], names)
lora = [n for n in names if n.endswith("_proj.weight")]
ad = load(sys.argv[4], [n[:-len("weight")] + s for n in lora for s in ("lora_A.weight", "lora_B.weight")],
          prefix="base_model.model.")
def ulp(x):  # bf16 ulp of |x|
    return torch.pow(2.0, torch.floor(torch.log2(torch.clamp(x.abs(), min=1e-30))) - 7)
res = {"tensors": len(names), "max_ulps_vs_peft": 0.0}
for n in names:
    x, y = ours[n].double(), peft[n].double()
    res["max_ulps_vs_peft"] = max(res["max_ulps_vs_peft"], ((x - y).abs() / ulp(torch.maximum(x.abs(), y.abs()))).max().item())
for who, t in (("ours", ours), ("peft", peft)):
    worst, exact_n, total = 0.0, 0, 0
    for n in lora:
        W = base[n].double()
        D = scale * (ad[n[:-len("weight")] + "lora_B.weight"].double() @ ad[n[:-len("weight")] + "lora_A.weight"].double())
        exact = W + D
        got = t[n].double()
        worst = max(worst, ((got - exact).abs() / ulp(torch.maximum(W.abs(), D.abs()))).max().item())
        exact_n += int((got == exact.to(torch.bfloat16).double()).sum())
        total += exact.numel()
    res[who] = {"max_err_operand_ulps": worst, "correctly_rounded": exact_n / total}
print(json.dumps(res))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench_merge",
                    help="where the model and adapter are built and reused")
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch space for outputs (default: in cache-dir)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", dest="kv_heads", type=int, default=4)
    ap.add_argument("--shard-mb", dest="shard_mb", type=int, default=512, help="input (and output) shard size")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="comma-separated LoRA target modules (default: all linear projections)")
    ap.add_argument("--threads", type=int, default=1, help="merge_model worker threads")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved cp/ours repetitions (median reported)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-venv", type=Path, default=Path("/tmp/mk-venv"))
    ap.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_merge.json")
    a = ap.parse_args()
    a.targets = [t for t in a.targets.split(",") if t]

    py = sys.executable
    load_before = [round(x, 2) for x in os.getloadavg()]
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    print("building/reusing model and adapter …", file=sys.stderr, flush=True)
    model = build_model(a.cache_dir / "model", a)
    adapter = build_adapter(a.cache_dir / ("adapter" if a.targets == TARGETS else
                                           "adapter-" + "-".join(a.targets)), model, a)
    shards = sorted(model.glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=a.work_dir or a.cache_dir))
    logs = work / "logs"
    logs.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    notes = ["page cache not dropped (needs root): all runs read a warm page cache; cp ran once first to warm it",
             "sync between runs; wall s = the whole process (ours/peft include python+torch start-up); "
             "in-proc s = merge_model's own time",
             f"cp and ours: median of {a.repeat} interleaved runs (peak RSS: max)",
             "CPU s = user + sys of the process (less sensitive than wall time to other jobs on a shared "
             "machine); load_1min per run in the JSON"]
    results = []
    report_check = None
    try:
        print(f"model: {model_bytes / 1e9:.2f} GB in {len(shards)} shards (largest {largest / 1e9:.2f} GB)",
              file=sys.stderr)
        shard_bytes = a.shard_mb << 20
        ours_out = work / "ours"
        cp_runs, ours_runs, memo_runs = [], [], []
        dst = work / "cp"
        memo = work / "hash-memo.json"
        subprocess.run([py, "-c", MEMO, str(model), str(memo)], env=env, check=True)
        hub = build_hub_layout(a.cache_dir / "hub", model)
        results.append(run_measured("cp -r (first)", ["cp", "-r", str(model), str(dst)], logs))
        shutil.rmtree(dst)
        tail = [str(adapter), str(ours_out), str(shard_bytes), str(a.threads)]
        hub_runs = []
        for i in range(a.repeat):  # interleaved, so all see the same machine conditions
            cp_runs.append(run_measured("cp -r", ["cp", "-r", str(model), str(dst)], logs))
            shutil.rmtree(dst)
            for runs, nm, argv in ((hub_runs, "peftdeploy (hub)", [py, "-c", OURS, str(hub)] + tail),
                                   (memo_runs, "peftdeploy (memo)", [py, "-c", OURS, str(model)] + tail + [str(memo)]),
                                   (ours_runs, "peftdeploy (first sight)", [py, "-c", OURS, str(model)] + tail)):
                shutil.rmtree(ours_out, ignore_errors=True)
                runs.append(_detail(run_measured(nm, argv, logs, env)))
        results.append(summarize("cp -r (warm)", cp_runs))
        results.append(summarize(HUB, hub_runs))
        results.append(summarize(MEMO_ROW, memo_runs))
        results.append(summarize(FIRST, ours_runs))
        croot = work / "cache"
        for nm in ("peftdeploy cached (cold, hub backbone)", "peftdeploy cached (hit)"):
            r = _detail(run_measured(nm, [py, "-c", OURS_CACHED, str(hub), str(adapter), str(croot),
                                          str(shard_bytes), str(a.threads)], logs, env))
            if isinstance(r.get("detail"), dict):
                r["in_process_s"] = round(r["detail"].get("seconds", 0), 3)
            results.append(r)
        shutil.rmtree(croot, ignore_errors=True)
        peft_out = work / "peft"
        if not a.skip_peft:
            results.append(run_measured("peft", [py, "-c", PEFT, str(model), str(adapter), str(peft_out),
                                                 str(shard_bytes)], logs, env))
            if results[-1]["rc"] == 0 and (ours_out / "model.safetensors.index.json").exists():
                names = [f"model.layers.{i}.{m}.weight" for i in (0, a.layers - 1)
                         for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
                names += ["lm_head.weight", "model.layers.0.input_layernorm.weight"]
                chk = subprocess.run([py, "-c", CHECK, str(ours_out), str(peft_out), str(model), str(adapter),
                                      ",".join(names), str(_lora_scale(adapter))], capture_output=True, text=True, env=env)
                if chk.returncode == 0:
                    c = json.loads(chk.stdout.strip().splitlines()[-1])
                    notes.append(
                        f"accuracy on {c['tensors']} sampled tensors vs the exact float64 merge W + (alpha/r)·B@A: "
                        f"peftdeploy max error {c['ours']['max_err_operand_ulps']:.2f} bf16 ulp of max(|W|, |ΔW|), "
                        f"{100 * c['ours']['correctly_rounded']:.4f}% correctly rounded; PEFT (rounds ΔW to bf16, "
                        f"adds in bf16) max {c['peft']['max_err_operand_ulps']:.2f} ulp, "
                        f"{100 * c['peft']['correctly_rounded']:.4f}% correctly rounded; peftdeploy vs PEFT max "
                        f"{c['max_ulps_vs_peft']:.0f} ulp of the result (where W and ΔW cancel)")
                    report_check = c
                else:
                    notes.append("accuracy check failed: " + chk.stderr[-500:])
            shutil.rmtree(peft_out, ignore_errors=True)
        shutil.rmtree(ours_out, ignore_errors=True)
        mk = a.mergekit_venv / "bin" / "mergekit-yaml"
        if a.skip_mergekit:
            notes.append("mergekit skipped (--skip-mergekit)")
        elif not mk.exists():
            notes.append(f"mergekit skipped: {mk} not found (python3 -m venv {a.mergekit_venv} && "
                         f"{a.mergekit_venv}/bin/pip install mergekit)")
        else:
            cfg = work / "mergekit.yml"
            cfg.write_text(f"merge_method: passthrough\ndtype: bfloat16\nmodels:\n  - model: {model}+{adapter}\n")
            mk_out = work / "mergekit"
            results.append(run_measured("mergekit", [str(mk), str(cfg), str(mk_out), "--lora-merge-cache",
                                                     str(work / "mk-lora-cache"), "--no-copy-tokenizer",
                                                     "--quiet", "--lazy-unpickle"], logs,
                                        dict(env, PYTHONPATH="")))
            shutil.rmtree(mk_out, ignore_errors=True)
            shutil.rmtree(work / "mk-lora-cache", ignore_errors=True)
    finally:
        for p in work.iterdir():
            if p.is_dir() and p.name != "logs":
                shutil.rmtree(p, ignore_errors=True)

    by = {r["name"]: r for r in results}
    cp = by.get("cp -r (warm)")
    peft = by.get("peft")
    for r in results:
        if cp and r["rc"] == 0:
            r["wall_vs_cp"] = round(r["wall_s"] / cp["wall_s"], 2)
            r["cpu_vs_cp"] = round(r["cpu_s"] / max(cp["cpu_s"], 0.01), 2)
        r["rss_vs_largest_shard"] = round(r["max_rss_bytes"] / largest, 3)
        if peft and peft["rc"] == 0 and r["rc"] == 0:
            r["peft_wall_over_this"] = round(peft["wall_s"] / r["wall_s"], 2)
            r["peft_rss_over_this"] = round(peft["max_rss_bytes"] / r["max_rss_bytes"], 2)
    targets = {}
    for label in (HUB, MEMO_ROW, FIRST):
        ours = by.get(label)
        if not ours or ours["rc"] != 0:
            continue
        targets[f"{label}: wall <= 1.5x cp (whole process)"] = bool(cp and ours["wall_s"] <= 1.5 * cp["wall_s"])
        if ours.get("in_process_s") is not None:
            targets[f"{label}: wall <= 1.5x cp (merge_model itself)"] = bool(
                cp and ours["in_process_s"] <= 1.5 * cp["wall_s"])
        targets[f"{label}: peak RSS <= 1.25x largest shard"] = ours["max_rss_bytes"] <= 1.25 * largest
        if peft and peft["rc"] == 0:
            targets[f"{label}: >= 3x faster than peft"] = peft["wall_s"] >= 3 * ours["wall_s"]
            targets[f"{label}: >= 3x less memory than peft"] = peft["max_rss_bytes"] >= 3 * ours["max_rss_bytes"]
    report = {
        "model": {"bytes": model_bytes, "shards": len(shards), "largest_shard_bytes": largest, "dtype": "bfloat16",
                  "hidden": a.hidden, "layers": a.layers, "intermediate": a.intermediate, "vocab": a.vocab,
                  "heads": a.heads, "kv_heads": a.kv_heads},
        "adapter": {"rank": a.rank, "targets": a.targets,
                    "bytes": (adapter / "adapter_model.safetensors").stat().st_size},
        "machine": {"cpus": os.cpu_count()},
        "results": results, "targets": targets, "notes": notes, "logs": str(logs), "accuracy": report_check,
    }
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["load_average_before"] = load_before
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    if cp:
        from peftdeploy.bench.report import plot_wall_bars

        m = report["model"]
        png = plot_wall_bars([(r["name"], r["wall_s"]) for r in results if r["rc"] == 0 and r["name"] != "cp -r (first)"],
                             a.out.with_suffix(".png"),
                             f"LoRA merge of a {m['bytes'] / 1e9:.2f} GB bf16 model, rank-{a.rank} all-linear "
                             f"({os.cpu_count()} cores)", ref=("cp -r", cp["wall_s"]), limit=1.5 * cp["wall_s"])
        if png:
            print(f"plot: {png}", file=sys.stderr)
    _table(report)
    if a.json:
        print(json.dumps(report, indent=2))
    return 0 if all(r["rc"] == 0 for r in results) else 1


def _table(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = rep["model"]
    t = Table(title=f"LoRA merge: {m['bytes'] / 1e9:.2f} GB bf16 Llama, {m['shards']} shards "
                    f"(largest {m['largest_shard_bytes'] / 1e9:.2f} GB), rank-{rep['adapter']['rank']} LoRA on "
                    f"{'all linear projections' if rep['adapter']['targets'] == TARGETS else ','.join(rep['adapter']['targets'])}")
    for c in ("run", "wall s", "in-proc s", "CPU s", "peak RSS MiB", "wall / cp", "CPU / cp", "RSS / shard",
              "PEFT wall / this", "PEFT RSS / this"):
        t.add_column(c, justify="left" if c == "run" else "right")
    for r in rep["results"]:
        t.add_row(r["name"] + ("" if r["rc"] == 0 else " (FAILED)"), f"{r['wall_s']:.2f}",
                  f"{r['in_process_s']:.2f}" if r.get("in_process_s") is not None else "",
                  f"{r.get('cpu_s', 0):.2f}",
                  f"{r['max_rss_bytes'] / 2**20:.0f}", str(r.get("wall_vs_cp", "")), str(r.get("cpu_vs_cp", "")),
                  f"{r['rss_vs_largest_shard']:.2f}",
                  str(r.get("peft_wall_over_this", "")), str(r.get("peft_rss_over_this", "")))
    con = Console(stderr=True, width=170)
    con.print(t)
    for k, v in rep["targets"].items():
        con.print(f"  target {k}: {'met' if v else 'NOT met'}")
    for n in rep["notes"]:
        con.print(f"  note: {n}")
    con.print(f"  load average (1/5/15 min) before {rep.get('load_average_before')}, "
              f"after {rep.get('load_average_after')} on {rep['machine']['cpus']} CPUs")


if __name__ == "__main__":
    sys.exit(main())
