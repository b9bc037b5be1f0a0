"""Issue 19: calibrated quantization (llm-compressor in its tool venv), the calibration set, the
method field, the cache key, errors, and the ppl gate. Tiny model (tests/tiny.py); the llm-compressor
runs are skipped when .venv-quantize is absent (CI creates it: scripts/setup_quantize.sh)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from peftdeploy.quantize import calibration as C  # noqa: E402
from peftdeploy.quantize.methods import METHODS, SETUP_COMMAND, ToolMissing, resolve_method, tool_python  # noqa: E402
from peftdeploy.recipe.schema import SCHEME_METHODS  # noqa: E402
from tests.conftest import cli_env, peftdeploy_cmd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HAVE_TOOL = tool_python() is not None
needs_tool = pytest.mark.skipif(not HAVE_TOOL, reason=f"no quantize tool venv ({SETUP_COMMAND})")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")


def _words(t: str) -> list[str]:
    return re.findall(r"[a-z']+", t.lower())


def test_shipped_calibration_pinned_license_and_disjoint_from_eval():
    cs = C.load_calibration()
    assert cs.dataset == "builtin://mixed-prose" and cs.sha256 == C.BUILTIN["mixed-prose"][1]
    assert (cs.samples, cs.seq_len) == (64, 512)
    readme = (C.data_dir() / "README.md").read_text()
    assert "CC0" in readme and "disjoint" in readme
    ev = _words((ROOT / "peftdeploy" / "data" / "eval" / "lighthouse.txt").read_text())
    cal = _words(cs.text)
    sh = {tuple(ev[i:i + 8]) for i in range(len(ev) - 7)}
    common = [" ".join(cal[i:i + 8]) for i in range(len(cal) - 7) if tuple(cal[i:i + 8]) in sh]
    assert not common, common[:3]
    assert len(cal) > 3000


def test_custom_calibration_files(tmp_path):
    t = tmp_path / "c.txt"
    t.write_text("word " * 100)
    cs = C.load_calibration(dataset=str(t), samples=8, seq_len=128)
    assert cs.identity["samples"] == 8 and cs.identity["dataset"] == str(t)
    with pytest.raises(C.CalibrationError, match="pins"):
        C.load_calibration(dataset=str(t), sha256="0" * 64)
    j = tmp_path / "c.jsonl"
    j.write_text(json.dumps({"text": "hello " * 60}) + "\n" + json.dumps({"txt": 1}) + "\n")
    with pytest.raises(C.CalibrationError, match=r"c.jsonl:2: each line needs a \"text\""):
        C.load_calibration(dataset=str(j))
    with pytest.raises(C.CalibrationError, match="no shipped calibration set"):
        C.load_calibration(dataset="builtin://nope")
    with pytest.raises(C.CalibrationError, match="does not exist"):
        C.load_calibration(dataset=str(tmp_path / "missing.txt"))


def _validate(tmp_path, quant: str) -> subprocess.CompletedProcess:
    r = tmp_path / "r.yaml"
    r.write_text(f"apiVersion: peftdeploy/v1\nname: x\nbackbone: {{model: demo://smollm2-135m}}\nquantization: {quant}\n")
    return subprocess.run(peftdeploy_cmd("validate", str(r)), env=cli_env(), capture_output=True, text=True,
                          timeout=120)


def test_recipe_fields_validated(tmp_path):
    assert METHODS == SCHEME_METHODS  # the recipe stage keeps its own copy (no quantize/ import)
    p = _validate(tmp_path, "{scheme: int8, method: awq}")
    assert p.returncode == 2 and "r.yaml:4" in p.stderr and "quantization.method" in p.stderr \
        and "use auto | rtn | gptq" in p.stderr, p.stderr
    p = _validate(tmp_path, "{scheme: none, max_ppl_increase: 0.05}")
    assert p.returncode == 2 and "max_ppl_increase" in p.stderr, p.stderr
    p = _validate(tmp_path, "{scheme: w4a16, calibration: {sampels: 8}}")
    assert p.returncode == 2 and "sampels" in p.stderr, p.stderr
    p = _validate(tmp_path, "{scheme: w4a16, method: gptq, calibration: {samples: 8, seq_len: 256}, "
                            "max_ppl_increase: 0.05}")
    assert p.returncode == 0, p.stderr
    # relative calibration paths resolve against the recipe file
    from peftdeploy.recipe import load_recipe

    (tmp_path / "cal.txt").write_text("x")
    r = tmp_path / "r2.yaml"
    r.write_text("apiVersion: peftdeploy/v1\nname: x\nbackbone: {model: demo://smollm2-135m}\n"
                 "quantization: {scheme: w4a16, calibration: {dataset: ./cal.txt}}\n")
    assert load_recipe(r).recipe.quantization.calibration.dataset == str(tmp_path / "cal.txt")


def test_existing_recipes_keep_their_meaning():
    from peftdeploy.recipe import load_recipe

    for f in sorted((ROOT / "recipes").glob("*.yaml")):
        q = load_recipe(f).recipe.quantization
        if f.name == "demo-w4a16-gptq.yaml":
            continue
        if f.name in ("demo-int8.yaml", "demo-w4a16.yaml"):
            # the quantized demos pin what they always ran (RTN), whether or not the tool venv exists
            assert q.method == "rtn" and resolve_method(q.scheme, q.method, tool_present=True).name == "rtn", f
        else:  # written before issue 19: the new fields at their defaults
            assert (q.method, q.group_size, q.max_ppl_increase) == ("auto", "auto", None), f
        assert q.calibration.dataset == C.DEFAULT_DATASET, f


def test_resolve_method():
    assert resolve_method("w4a16", "auto", tool_present=True).name == "gptq"
    assert resolve_method("w4a16", "auto", tool_present=False).name == "rtn"
    assert resolve_method("int8", "auto", tool_present=True).why.count("SmoothQuant") == 1
    assert resolve_method("fp8", "auto", tool_present=True).name == "runtime"  # as before the field existed
    m = resolve_method("fp8", "rtn")
    assert m.tool == "llmcompressor" and not m.calibrated
    assert resolve_method("w4a16", "rtn").tool == "peftdeploy"
    assert resolve_method("none").name == "none"


def test_missing_tool_venv_is_one_clear_error(tiny, tmp_path, monkeypatch):
    from peftdeploy.quantize.cache import quantize_cached_result

    monkeypatch.setenv("PEFTDEPLOY_QUANTIZE_PYTHON", "none")
    assert tool_python() is None and resolve_method("w4a16").name == "rtn"
    with pytest.raises(ToolMissing) as ei:
        quantize_cached_result(tiny, "w4a16", method="gptq", cache_root=tmp_path / "q")
    assert SETUP_COMMAND in ei.value.fix and "method: rtn" in ei.value.fix
    assert not [p for p in (tmp_path / "q").iterdir() if p.is_dir()]  # no checkpoint, no temp dir left


def test_plan_says_which_method_and_refuses_without_tool(tmp_path, monkeypatch):
    from peftdeploy.plan import make_plan
    from peftdeploy.recipe import load_recipe

    monkeypatch.setenv("PEFTDEPLOY_QUANTIZE_PYTHON", "none")
    plan = make_plan(load_recipe(ROOT / "recipes" / "demo-w4a16.yaml"), device="cpu", host_memory="16GiB")
    f = {x.code: x for x in plan.findings}
    assert "with rtn" in f["quantization-method"].message and "quantization-tool" not in f
    assert plan.launch.merge.quantize_method == "rtn"
    plan = make_plan(load_recipe(ROOT / "recipes" / "demo-w4a16-gptq.yaml"), device="cpu", host_memory="16GiB")
    f = {x.code: x for x in plan.findings}
    assert f["quantization-tool"].severity.value == "error" and SETUP_COMMAND in f["quantization-tool"].fix
    assert "refuses it if perplexity rises more than 5.0%" in f["quantization-method"].message


def test_cache_key_covers_method_and_calibration(tiny, tmp_path):
    from peftdeploy.quantize.cache import quant_key

    k_rtn, ident = quant_key(tiny, "w4a16")
    assert "calibration" not in ident and "tool" not in ident  # rtn entries made before issue 19 stay hits
    a = C.load_calibration()
    b = C.load_calibration(samples=8)
    (tmp_path / "t.txt").write_text("other text " * 200)
    c = C.load_calibration(dataset=str(tmp_path / "t.txt"))
    keys = {quant_key(tiny, "w4a16", method="gptq", calibration=x)[0] for x in (a, b, c)}
    keys |= {quant_key(tiny, "w4a16", method="awq", calibration=a)[0], k_rtn}
    assert len(keys) == 5
    _, gi = quant_key(tiny, "w4a16", method="gptq", calibration=a)
    assert gi["calibration"]["sha256"] == a.sha256 and gi["tool"].startswith("llmcompressor==")
    assert "int8_gptq" not in gi  # w4a16 entries keep their keys
    _, ii = quant_key(tiny, "int8", method="gptq", calibration=a)
    assert ii["int8_gptq"]["act_symmetric"] is True  # asymmetric breaks on vLLM 0.32 CPU (llmc_worker)


@needs_tool
@pytest.mark.parametrize("scheme,method,fmt", [("w4a16", "gptq", "pack-quantized"), ("int8", "gptq", "int-quantized"),
                                               ("fp8", "rtn", "float-quantized")])
def test_llmcompressor_checkpoint(tiny, tmp_path, scheme, method, fmt):
    from peftdeploy.quantize.cache import quantize_cached_result

    cal = C.load_calibration(samples=4, seq_len=64)
    msgs: list[str] = []
    q = quantize_cached_result(tiny, scheme, method=method, calibration=cal, cache_root=tmp_path / "q",
                               progress=msgs.append, group_size=32)
    assert not q.cache_hit and any("calibrating on 4 samples" in m for m in msgs) == (method == "gptq"), msgs
    cfg = json.loads((q.path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == fmt and "lm_head" in cfg["ignore"]
    if scheme == "int8":  # dynamic per-token symmetric activations (llmc_worker.INT8_GPTQ)
        acts = cfg["config_groups"]["group_0"]["input_activations"]
        assert acts["symmetric"] is True and acts["dynamic"] is True and acts["strategy"] == "token"
    prov = q.provenance
    assert prov["method"] == method and prov["tool"]["llmcompressor"] == "0.14.0.1"
    assert (prov["calibration"] == cal.identity) == (method == "gptq")
    assert (q.path / "tokenizer.json").is_file() and (q.path / "chat_template.jinja").is_file()
    again = quantize_cached_result(tiny, scheme, method=method, calibration=cal, cache_root=tmp_path / "q",
                                   group_size=32)
    assert again.cache_hit and again.path == q.path


@needs_tool
def test_llmcompressor_failure_and_timeout_are_one_error(tiny, tmp_path):
    import shutil

    from peftdeploy.quantize.llmc import QuantizeToolError, quantize_llmc

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"  # transformers refuses it inside the worker
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizeToolError, match=r"failed \(exit \d+\); nothing was kept") as ei:
        quantize_llmc(bad, tmp_path / "o1", "w4a16", "gptq", calibration=C.load_calibration(samples=2, seq_len=32),
                      group_size=32)
    assert "Last output" in str(ei.value) and not (tmp_path / "o1").exists()
    with pytest.raises(QuantizeToolError, match="timed out after 1 s") as ei:
        quantize_llmc(tiny, tmp_path / "o2", "w4a16", "gptq", calibration=C.load_calibration(samples=2, seq_len=32),
                      group_size=32, timeout=1)
    assert "PEFTDEPLOY_QUANTIZE_TIMEOUT" in ei.value.fix and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_up_gate_refuses_rtn_w4a16_on_demo(demo_model_dir, tmp_path):
    """The gate: demo-w4a16 with round-to-nearest (+17% perplexity) and max_ppl_increase 0.05 is refused
    by `up` with exit 2, the measured numbers and the fix; nothing is started. A second `up` reads the
    cached measurement (no vLLM start). The eval cache is the suite's: an earlier test may have measured the
    same pair already, and then the first `up` is a cache hit too (CI ordering: both ~2 s)."""
    import time

    from tests.conftest import free_e2e_port

    r = tmp_path / "bad.yaml"
    r.write_text(f"apiVersion: peftdeploy/v1\nextends: {ROOT / 'recipes' / 'demo-w4a16.yaml'}\nname: demo-bad\n"
                 f"quantization: {{scheme: w4a16, method: rtn, max_ppl_increase: 0.05}}\n"
                 f"serving: {{port: {free_e2e_port()}}}\n")
    from peftdeploy.quantize.cpu_isa import host_cpu_isa

    isa = host_cpu_isa()
    if isa is not None and isa.missing_kernel("w4a16"):  # an AVX2 host: refused by plan, before any measurement
        p = subprocess.run(peftdeploy_cmd("up", str(r), "--detach"), env=cli_env(), capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 2 and "cannot run on this machine" in p.stderr and "Traceback" not in p.stderr, \
            p.stderr[-3000:]
        assert "perplexity of the full-precision" not in p.stderr  # no vLLM started for a model it cannot run
        return
    msgs = []
    for _ in range(2):
        t0 = time.perf_counter()
        p = subprocess.run(peftdeploy_cmd("up", str(r), "--detach"), env=cli_env(), capture_output=True, text=True,
                           timeout=1500)
        msgs.append((p.returncode, p.stderr, time.perf_counter() - t0))
    for rc, err, _ in msgs:
        assert rc == 2, err[-3000:]
        m = re.search(r"perplexity ([\d.]+) on the eval text against ([\d.]+) for the full-precision merge: "
                      r"\+([\d.]+)%, over the allowed \+5.00%; not serving it", err)
        assert m, err[-3000:]
        assert float(m.group(3)) > 10 and "quantization.method: gptq" in err and "Traceback" not in err
    assert msgs[1][1].count("perplexity of the full-precision") == 0  # cached: vLLM not started again
    if "perplexity of the full-precision" in msgs[0][1]:  # the first `up` measured (not cached by an earlier test)
        assert msgs[1][2] < msgs[0][2]
    st = subprocess.run(peftdeploy_cmd("status", "--json"), env=cli_env(), capture_output=True, text=True, timeout=120)
    assert "demo-bad" not in st.stdout
