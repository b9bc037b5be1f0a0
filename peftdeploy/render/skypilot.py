"""Target `skypilot`: a SkyServe service YAML (`sky serve up service.yaml`).

Each replica installs the pinned vLLM release, fetches what the recipe names (s3:// through
SkyPilot file_mounts, hub adapters at their revision in `setup`), or under merge policy installs
peftdeploy and merges the shipped recipe.yaml in `setup`; `run` starts `vllm serve` with the planned
flags. Secrets are declared in `secrets:` without values: pass them at launch
(`sky serve up service.yaml --secret HF_TOKEN --secret PEFTDEPLOY_API_KEY`).
"""
from __future__ import annotations

import shlex
from typing import Any

from .base import (
    served_merged_dir,
    ADAPTERS_DIR,
    CONTAINER_PORT,
    MODELS_DIR,
    RenderContext,
    dump_yaml,
    fetch_script,
    header,
    vllm_flags,
)

TARGET = "skypilot"
# GPUs that fit a 7-8B model with LoRA; --accelerator picks one explicitly
DEFAULT_ACCELERATORS = ("A100-80GB", "H100", "L40S")
HOME = "~/peftdeploy"


def _vllm_version(image: str) -> str:
    tag = image.rpartition(":")[2].lstrip("v")
    return tag if tag and tag[0].isdigit() else ""


def service(ctx: RenderContext) -> dict[str, Any]:
    n = ctx.gpu_count
    accel: Any = f"{ctx.accelerator}:{n}" if ctx.accelerator else {a: n for a in DEFAULT_ACCELERATORS}
    version = _vllm_version(ctx.image)
    setup = ["set -e", f"pip install {shlex.quote('vllm==' + version) if version else 'vllm'}"]
    file_mounts: dict[str, Any] = {}
    if ctx.merge:
        setup.append(f"sudo mkdir -p {MODELS_DIR} && sudo chown -R $(whoami) {MODELS_DIR}")
        setup.append("pip install 'peftdeploy[merge]'")
        setup.append(f"PEFTDEPLOY_CACHE={MODELS_DIR}/cache peftdeploy merge {HOME}/recipe.yaml")
        file_mounts[f"{HOME}/recipe.yaml"] = "recipe.yaml"
        model = served_merged_dir(ctx, f"{MODELS_DIR}/merged")
    else:
        bb = ctx.backbone
        model = bb.repo_id if bb.kind == "hf" and not bb.subdir else f"{MODELS_DIR}/backbone"
        if bb.kind in ("s3", "gs"):
            file_mounts[f"{MODELS_DIR}/backbone"] = {"source": bb.spec, "mode": "COPY"}
        for name, src in ctx.adapter_sources():
            if src.kind in ("s3", "gs"):
                file_mounts[f"{ADAPTERS_DIR}/{name}"] = {"source": src.spec, "mode": "COPY"}
        py, _ = fetch_script(ctx)
        if py:
            setup.append(f"sudo mkdir -p {ADAPTERS_DIR} {MODELS_DIR} && sudo chown -R $(whoami) {ADAPTERS_DIR} {MODELS_DIR}")
            setup.append("python3 - <<'PY'\n" + py + "PY")
    paths = {name: f"{ADAPTERS_DIR}/{name}" for name, _ in ctx.adapter_sources()}
    argv = ["vllm", "serve", model, *vllm_flags(ctx, adapter_paths=paths)]
    env_prefix = ""
    api = ctx.api_key_env()
    if api:
        env_prefix = f"VLLM_API_KEY=\"${api}\" "
    run = env_prefix + shlex.join(argv)
    secrets: dict[str, None] = {"HF_TOKEN": None}
    for _, src in ctx.secret_env():
        secrets[src] = None
    out: dict[str, Any] = {
        "name": ctx.name,
        "resources": {
            "accelerators": accel,
            "ports": CONTAINER_PORT,
            "disk_size": 256,
            "labels": ctx.labels("server"),
        },
        "service": {
            "readiness_probe": {"path": "/health", "initial_delay_seconds": 1800},
            "replicas": ctx.replicas,
        },
    }
    env = dict(ctx.plain_env())
    env["HF_HOME"] = "~/.cache/huggingface"
    out["envs"] = dict(sorted(env.items()))
    out["secrets"] = dict(sorted(secrets.items()))
    if file_mounts:
        out["file_mounts"] = dict(sorted(file_mounts.items()))
    out["setup"] = "\n".join(setup) + "\n"
    out["run"] = run + "\n"
    return out


def render(ctx: RenderContext) -> dict[str, str]:
    ctx.check_sources()
    h = header(ctx, TARGET, "sky serve up service.yaml --secret HF_TOKEN"
               + "".join(f" --secret {src}" for _, src in ctx.secret_env()))
    files = {"service.yaml": h + dump_yaml(service(ctx))}
    if ctx.merge:
        files["recipe.yaml"] = h + dump_yaml(ctx.cluster_recipe())
    return dict(sorted(files.items()))
