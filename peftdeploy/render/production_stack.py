"""Target `production-stack`: values for the vLLM production-stack Helm chart (vllm-stack).

    helm repo add vllm https://vllm-project.github.io/production-stack
    helm install <name> vllm/vllm-stack -f values.yaml

One `servingEngineSpec.modelSpec` entry runs the recipe's backbone (or, under merge policy, the
merged model that an init container writes into the model's PVC, mounted by the chart at /data).
Serve policy: `enableLoRA` plus one `loraAdapters` entry per adapter, loaded by the chart's LoRA
controller (`loraController.enableLoraController`). The flags the chart has no field for go to
`vllmConfig.extraArgs`. Secrets are references to the Secret `<recipe>-secrets`, never strings
(the chart would otherwise store a literal in a generated Secret).
"""
from __future__ import annotations

import re
from typing import Any

from .base import RECIPE_DIR, RenderContext, dump_yaml, flag_pairs, header, served_merged_dir, vllm_flags
from .kubernetes import configmap, secret_envs

TARGET = "production-stack"
PVC_MOUNT = "/data"  # where the chart mounts a model's PVC (pvcStorage)

# vLLM flag -> vllmConfig field (the chart renders these as flags itself)
_FIELDS = {
    "--max-model-len": ("maxModelLen", int),
    "--dtype": ("dtype", str),
    "--gpu-memory-utilization": ("gpuMemoryUtilization", float),
    "--tensor-parallel-size": ("tensorParallelSize", int),
    "--max-loras": ("maxLoras", int),
    "--max-num-seqs": ("maxNumSeqs", int),
}
_BOOL_FIELDS = {"--enable-prefix-caching": "enablePrefixCaching", "--enable-chunked-prefill": "enableChunkedPrefill"}


def _k8s_name(name: str) -> str:
    n = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return n[:63] or "adapter"


def _vllm_config(ctx: RenderContext) -> dict[str, Any]:
    flags = vllm_flags(ctx, include_revision=False)
    # drop what the chart sets itself: host/port, --enable-lora (enableLoRA)
    cfg: dict[str, Any] = {}
    extra: list[str] = []
    for f, val in flag_pairs(flags, skip=("--host", "--port", "--enable-lora")):
        if f in _FIELDS and val is not None:
            key, typ = _FIELDS[f]
            cfg[key] = typ(val)
        elif f in _BOOL_FIELDS and val is None:
            cfg[_BOOL_FIELDS[f]] = True
        else:
            extra.append(f"{f}={val}" if val is not None else f)
    if "tensorParallelSize" not in cfg and ctx.gpu_count > 1:
        cfg["tensorParallelSize"] = ctx.gpu_count
    if extra:
        cfg["extraArgs"] = extra
    return dict(sorted(cfg.items()))


def _adapter_source(name: str, src: Any) -> dict[str, Any]:
    if src.kind == "hf":
        d = {"type": "huggingface", "adapterName": name, "repository": src.repo_id}
        if src.subdir:
            d["adapterPath"] = src.subdir
        return d
    return {"type": "s3", "adapterName": name, "adapterPath": src.spec}


def values(ctx: RenderContext) -> dict[str, Any]:
    bb = ctx.backbone
    image, _, tag = ctx.image.rpartition(":")
    spec: dict[str, Any] = {
        "name": ctx.name,
        "annotations": ctx.annotations(),
        "labels": ctx.labels("server"),
        "podAnnotations": ctx.annotations(),
        "repository": image or ctx.image,
        "tag": tag or "latest",
        "replicaCount": ctx.replicas,
        "requestGPU": ctx.gpu_count,
        "shmSize": "16Gi",
    }
    if ctx.gpu_type != "nvidia.com/gpu":
        spec["requestGPUType"] = ctx.gpu_type
    env = [{"name": k, "value": v} for k, v in ctx.plain_env()]
    # the chart only maps the API key; other secret server env (if any) are references here
    env += [e for e in secret_envs(ctx) if e["name"] not in ("HF_TOKEN", "VLLM_API_KEY")]
    if ctx.merge:
        spec["modelURL"] = served_merged_dir(ctx, f"{PVC_MOUNT}/merged")  # the merge init container writes it (recipe output)
        spec["pvcStorage"] = ctx.storage_size
        spec["pvcAccessMode"] = ["ReadWriteOnce" if ctx.replicas == 1 else "ReadWriteMany"]
        spec["initContainer"] = {
            "name": "merge",
            "image": ctx.tools_image,
            "command": ["peftdeploy", "merge", f"{RECIPE_DIR}/recipe.yaml"],
            "env": sorted([*secret_envs(ctx, for_server=False),
                           {"name": "PEFTDEPLOY_CACHE", "value": f"{PVC_MOUNT}/cache"}], key=lambda e: e["name"]),
            "mountPvcStorage": True,
            "extraVolumeMounts": [{"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True}],
        }
        spec["extraVolumes"] = [{"name": "recipe", "configMap": {"name": f"{ctx.name}-recipe"}}]
        spec["enableLoRA"] = False
    else:
        if bb.kind != "hf" or bb.subdir:
            from .base import RenderError

            raise RenderError(
                f"production-stack loads the backbone from the hub by repo id; {bb.spec} is not one",
                fix="use an hf://org/repo backbone, or the kubernetes target (it fetches s3:// in an init container)")
        spec["modelURL"] = bb.repo_id
        if bb.revision:
            spec["modelRevision"] = bb.revision
        spec["enableLoRA"] = bool(ctx.launch.adapters)
        if ctx.launch.adapters:
            # the LoRA controller loads adapters through vLLM's runtime LoRA API
            env = [e for e in env if e["name"] != "VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
            env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
    if ctx.plugin and ctx.uses_recipe and not ctx.merge:  # the plugin reads PEFTDEPLOY_RECIPE: mount the recipe
        spec["extraVolumes"] = [{"name": "recipe", "configMap": {"name": f"{ctx.name}-recipe"}}]
        spec["extraVolumeMounts"] = [{"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True}]
    if ctx.cache_size and not ctx.merge:  # the chart's PVC is mounted at /data: the HF cache lives there
        spec["pvcStorage"] = ctx.cache_size
        spec["pvcAccessMode"] = ["ReadWriteOnce" if ctx.replicas == 1 else "ReadWriteMany"]
        env.append({"name": "HF_HOME", "value": f"{PVC_MOUNT}/huggingface"})
    spec["hf_token"] = {"secretName": ctx.secret_name, "secretKey": "HF_TOKEN"}
    if env:
        spec["env"] = sorted(env, key=lambda e: e["name"])
    spec["vllmConfig"] = _vllm_config(ctx)
    spec = dict(sorted(spec.items()))

    engine: dict[str, Any] = {"modelSpec": [spec]}
    api_env = ctx.api_key_env()
    if api_env:
        engine["vllmApiKey"] = {"secretName": ctx.secret_name, "secretKey": api_env}
    out: dict[str, Any] = {"servingEngineSpec": engine}
    if ctx.merge:
        out["extraObjects"] = [configmap(ctx, merged_dir=f"{PVC_MOUNT}/merged")]
    elif ctx.plugin and ctx.uses_recipe:
        out["extraObjects"] = [configmap(ctx)]
    adapters = ctx.adapter_sources()
    if adapters:
        out["loraController"] = {"enableLoraController": True}
        out["loraAdapters"] = [
            {
                "name": _k8s_name(f"{ctx.name}-{name}"),
                "baseModel": ctx.launch.served_model_name,
                "adapterSource": _adapter_source(name, src),
                "loraAdapterDeploymentConfig": {"algorithm": "default", "replicas": ctx.replicas},
                **({"vllmApiKey": {"secretName": ctx.secret_name, "secretKey": api_env}} if api_env else {}),
            }
            for name, src in adapters
        ]
    return dict(sorted(out.items()))


def render(ctx: RenderContext) -> dict[str, str]:
    ctx.check_sources()
    h = header(ctx, TARGET, "helm install <release> vllm/vllm-stack -f values.yaml\n"
                            f"Secret {ctx.secret_name} must hold HF_TOKEN"
                            + (f" and {ctx.api_key_env()}" if ctx.api_key_env() else "") + " (kubectl create secret ...).")
    return {"values.yaml": h + dump_yaml(values(ctx))}


def render_fleet(ctxs: list[RenderContext], fleet: Any) -> dict[str, str]:
    """One modelSpec per replica group in one release: the chart's router routes by the request's model name."""
    parts = [values(c) for c in ctxs]
    out: dict[str, Any] = {"servingEngineSpec": dict(parts[0]["servingEngineSpec"])}
    out["servingEngineSpec"]["modelSpec"] = [m for p in parts for m in p["servingEngineSpec"]["modelSpec"]]
    for key in ("extraObjects", "loraAdapters"):
        items = [x for p in parts for x in p.get(key, [])]
        if items:
            out[key] = items
    if any("loraController" in p for p in parts):
        out["loraController"] = {"enableLoraController": True}
    c = ctxs[0]
    routes = "; ".join(f"{x.group}: {', '.join(x.launch.model_names)}" for x in ctxs)
    h = header(c, TARGET, "helm install <release> vllm/vllm-stack -f values.yaml\n"
                          f"fleet: {fleet.reason}\nthe router routes by model name: {routes}")
    return {"values.yaml": h + dump_yaml(dict(sorted(out.items())))}
