"""Benchmark: workload determinism and shares, percentiles, report shape; one end-to-end run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftdeploy.bench import report
from peftdeploy.bench.client import RequestResult, RunResult, _Timer, completions_url
from peftdeploy.bench.workload import (
    BASE,
    WorkloadConfig,
    build_workload,
    expected_count_bound,
    load_prompts,
    model_shares,
    zipf_weights,
)

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ workload
def test_workload_is_deterministic_given_seed():
    cfg = WorkloadConfig(adapters=("a", "b", "c"), zipf_alpha=1.0, base_share=0.1, num_requests=200, rate=5.0,
                         concurrency=4, seed=7)
    assert build_workload(cfg) == build_workload(cfg)
    other = build_workload(WorkloadConfig(**{**cfg.to_dict(), "adapters": cfg.adapters, "seed": 8}))
    assert [r.adapter for r in other.requests] != [r.adapter for r in build_workload(cfg).requests]


def test_streams_are_independent():
    """Changing the load (rate) must not change which adapter or prompt each request gets."""
    a = build_workload(WorkloadConfig(adapters=("x", "y"), num_requests=50, rate=1.0, seed=3))
    b = build_workload(WorkloadConfig(adapters=("x", "y"), num_requests=50, rate=9.0, seed=3))
    assert [(r.adapter, r.prompt) for r in a.requests] == [(r.adapter, r.prompt) for r in b.requests]
    assert a.requests[-1].arrival_s > b.requests[-1].arrival_s


def test_zipf_weights():
    w = zipf_weights(4, 1.0)
    assert w[0] == pytest.approx(1 / (1 + 1 / 2 + 1 / 3 + 1 / 4))
    assert w[1] == pytest.approx(w[0] / 2)
    assert sum(w) == pytest.approx(1.0)
    assert zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("alpha,base", [(1.0, 0.0), (1.0, 0.2), (0.5, 0.1), (2.0, 0.0)])
def test_zipf_shares_statistical(alpha, base):
    n = 20000
    cfg = WorkloadConfig(adapters=tuple(f"l{i}" for i in range(8)), zipf_alpha=alpha, base_share=base,
                         num_requests=n, concurrency=1, input_len=4, output_len=2, seed=11)
    counts = build_workload(cfg).counts()
    shares = model_shares(cfg)
    assert sum(shares.values()) == pytest.approx(1.0)
    for label, p in shares.items():
        assert abs(counts.get(label, 0) - n * p) <= expected_count_bound(n, p), (label, counts, shares)
    if base == 0:
        assert BASE not in counts


def test_no_adapters_means_base_only():
    w = build_workload(WorkloadConfig(adapters=(), base_model="m", num_requests=10, concurrency=2))
    assert {r.model for r in w.requests} == {"m"} and w.counts() == {BASE: 10}


def test_poisson_arrivals_mean_rate():
    w = build_workload(WorkloadConfig(adapters=("a",), num_requests=4000, rate=10.0, seed=5, input_len=2))
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(w.requests, w.requests[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.08)
    assert all(g >= 0 for g in gaps)


def test_lengths_fixed_and_from_prompt_set():
    fixed = build_workload(WorkloadConfig(adapters=("a",), num_requests=20, concurrency=2, input_len=30,
                                          output_len=17))
    assert all(len(r.prompt.split()) == 30 and r.max_tokens == 17 for r in fixed.requests)
    ps = load_prompts()
    assert len(ps) >= 100 and len({p.text for p in ps}) == len(ps)
    from_set = build_workload(WorkloadConfig(adapters=("a",), num_requests=100, concurrency=2, output_len=None))
    texts = {p.text: p.output_len for p in ps}
    assert all(texts[r.prompt] == r.max_tokens for r in from_set.requests)
    assert len({r.prompt for r in from_set.requests}) == 100  # a permutation of the set


def test_invalid_config():
    with pytest.raises(ValueError):
        WorkloadConfig(adapters=("a",), num_requests=1)  # neither rate nor concurrency
    with pytest.raises(ValueError):
        WorkloadConfig(adapters=("a",), base_share=1.5, concurrency=1)


# ------------------------------------------------------------------------------------ client
def test_timer_parses_vllm_stream():
    t = _Timer(0.0)
    for line in [
        'data: {"choices":[{"index":0,"text":" Hi","finish_reason":null}],"usage":null}',
        "",
        'data: {"choices":[{"index":0,"text":" there","finish_reason":null}],"usage":null}',
        'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}],"usage":null}',
        'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}',
        "data: [DONE]",
    ]:
        t.line(line)
    assert t.chunks == 2 and t.usage["completion_tokens"] == 2 and len(t.itls) == 1
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"


# ------------------------------------------------------------------------------------ report
def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    for p in (0, 50, 90, 99, 100):
        assert report.percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    assert report.percentile([], 50) is None
    assert report.percentile([2.0], 99) == 2.0


def _fake_run() -> RunResult:
    res = []
    for i in range(10):
        a = "a" if i % 3 else BASE
        res.append(RequestResult(index=i, model=a, adapter=a, ok=i != 9, start_s=i * 0.1,
                                 ttft_s=0.1 + i / 100, e2e_s=1.0 + i / 10, tpot_s=0.01 * (i + 1),
                                 output_tokens=10, prompt_tokens=5, itls=[0.01, 0.02]))
    res[-1].error = "HTTP 500: boom"
    return RunResult(url="http://x/v1/completions", backend="httpx", results=res, wall_s=2.0, started_at=0.0)


def test_summary_shape_and_values(tmp_path):
    s = report.summarize(_fake_run())
    o = s["overall"]
    assert o["requests"] == 10 and o["ok"] == 9 and o["errors"] == 1
    assert o["output_tokens"] == 90 and o["output_tok_s"] == pytest.approx(45.0)
    for m in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(o[m]) == {"mean", "p50", "p90", "p99"}
        assert o[m]["p50"] <= o[m]["p90"] <= o[m]["p99"]
    assert set(s["per_adapter"]) == {"a", BASE}
    assert sum(g["ok"] for g in s["per_adapter"].values()) == 9
    assert sum(g["output_tok_s"] for g in s["per_adapter"].values()) == pytest.approx(o["output_tok_s"])
    assert s["error_messages"] == {"HTTP 500: boom": 1}
    med = report.median_summary([s, s, s])
    assert med["runs"] == 3 and med["overall"]["output_tok_s"] == pytest.approx(45.0)
    p = report.write_json({"points": [s]}, tmp_path / "b.json")
    assert json.loads(p.read_text())["points"][0]["overall"]["ok"] == 9
    head, rows = report.summary_rows(s)
    assert rows[-1][0] == "ALL" and len(rows[0]) == len(head)


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    s = report.summarize(_fake_run())
    assert report.plot_per_adapter(s, tmp_path / "a.png").stat().st_size > 1000
    pts = [{"label": f"c={c}", "load": c, "summary": s["overall"]} for c in (1, 2, 4)]
    assert report.plot_load_curve(pts, tmp_path / "l.png").stat().st_size > 1000
    rows = [{"setup": "merged", "output_tok_s": 10.0, "runs_tok_s": [9, 10, 11], "ratio": 1.0, "ttft_p50": 0.1,
             "tpot_p50": 0.01}, {"setup": "lora", "output_tok_s": 8.0, "runs_tok_s": [8, 8, 8], "ratio": 0.8}]
    assert report.plot_compare(rows, tmp_path / "c.png").stat().st_size > 1000


def test_compare_setups_and_variants():
    from peftdeploy.bench.compare import default_setups
    from peftdeploy.bench.deploy import variant
    from peftdeploy.plan.spec import LaunchSpec, ServedAdapter

    setups = default_setups(["p", "j"], zipf=1.0)
    names = [s.name for s in setups]
    assert names[0] == "merged" and "lora: 1 adapter" in names
    assert {s.max_loras for s in setups if len(s.adapters) == 2} == {2, 1}
    assert len({s.server for s in setups}) == 3  # merged, max_loras=2, max_loras=1

    spec = LaunchSpec(recipe_name="r", recipe_hash="h", mode="serve", model="/m", model_source="demo://m",
                      served_model_name="r", host="127.0.0.1", port=8000, device="cpu",
                      args=(("--served-model-name", "r"), ("--dtype", "float32"), ("--enable-lora", None),
                            ("--max-loras", "2"), ("--lora-modules", None), ("p=/p", None), ("j=/j", None),
                            ("--port", "8000")),
                      adapters=(ServedAdapter("p", "/p", "demo://p", 8), ServedAdapter("j", "/j", "demo://j", 16)))
    off = variant(spec, adapters=None, model="/merged", port=18299)
    argv = off.argv()
    assert "--enable-lora" not in argv and "p=/p" not in argv and argv[2] == "/merged"
    assert argv[argv.index("--port") + 1] == "18299" and argv.count("--port") == 1
    one = variant(spec, adapters=["j"], max_loras=1)
    a = one.argv()
    assert a[a.index("--max-loras") + 1] == "1" and "j=/j" in a and "p=/p" not in a
    assert a[a.index("--max-lora-rank") + 1] == "16"


def test_gpu_script_dry_run():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bench.py"), "--dry-run"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--load-format dummy" in out.stdout and "--enable-lora" in out.stdout


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_cli_against_demo_server(tmp_path, e2e_serve):
    """`peftdeploy bench --url` sends a few requests to a running deployment of the demo recipe: the session's
    e2e-serve deployment (conftest; this module is in its xdist group), so no server of its own is started."""
    from peftdeploy.demo import demo_adapter_names

    names = [n for n in ("pirate", "json") if n in demo_adapter_names()]
    if not names:
        pytest.skip("no demo adapters in peftdeploy/data/adapters")
    assert set(names) <= set(e2e_serve.models)
    recipe = tmp_path / "bench.yaml"  # the workload: adapters and traffic (the server is e2e-serve's)
    recipe.write_text(
        "apiVersion: peftdeploy/v1\nname: bench-e2e\nbackbone:\n  model: demo://smollm2-135m\n  dtype: float32\n"
        "  max_model_len: 1024\nadapters:\n" + "".join(f"  - name: {n}\n    source: demo://adapters/{n}\n" for n in names)
        + "policy:\n  mode: serve\n  traffic: {" + ", ".join(f"{n}: 0.4" for n in names) + ", base: 0.2}\n"
        "serving:\n  max_num_seqs: 8\n")
    out = tmp_path / "out"
    exe = shutil.which("peftdeploy", path=str(Path(sys.executable).parent)) or "peftdeploy"
    proc = subprocess.run(
        [exe, "bench", str(recipe), "--url", e2e_serve.base_url, "--concurrency", "4", "-n", "8", "--input-len", "16",
         "--output-len", "8", "--warmup", "2", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=880,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    o = data["points"][0]["summary"]
    assert o["ok"] == o["requests"] == 8 and o["errors"] == 0
    assert o["output_tokens"] == 8 * 8
    assert o["output_tok_s"] > 0 and o["req_s"] > 0
    for m in ("ttft_s", "tpot_s", "e2e_s"):
        assert o[m]["p50"] > 0
    assert set(data["points"][0]["summary"]) >= {"req_s", "output_tok_s", "ttft_s", "tpot_s", "e2e_s"}
    per = data["points"][0]["median"]["per_adapter"]
    assert sum(g["ok"] for g in per.values()) == 8
    assert (out / "bench.json").exists()
