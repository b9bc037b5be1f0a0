"""Target `kserve`: a KServe InferenceService (serving.kserve.io/v1beta1) running vLLM.

The predictor is a custom container (`kserve-container`) with exactly the vLLM flags the plan chose
(LoRA adapters as --lora-modules, fetched by init containers like the kubernetes target); KServe's
RawDeployment mode (no Knative: GPU pods don't scale to zero well). Merge policy: an init container
runs `peftdeploy merge` of the ConfigMap recipe into a per-pod volume. A ConfigMap holding the
resolved recipe goes alongside (inference-service.yaml holds both documents).
"""
from __future__ import annotations

from typing import Any

from .base import RenderContext, dump_yaml_docs, header
from .kubernetes import configmap, fleet_notes, hf_cache_pvc, hf_cache_volume, init_containers, vllm_container

TARGET = "kserve"


def inference_service(ctx: RenderContext) -> dict[str, Any]:
    container = vllm_container(ctx)
    container["name"] = "kserve-container"
    inits, empty_dirs = init_containers(ctx, image=ctx.image)
    vols: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
        hf_cache_volume(ctx),
        {"name": "recipe", "configMap": {"name": f"{ctx.name}-recipe"}},
    ]
    if ctx.merge:
        empty_dirs = sorted({*empty_dirs, "models"})
    vols += [{"name": v, "emptyDir": {}} for v in empty_dirs]
    predictor: dict[str, Any] = {
        "minReplicas": ctx.replicas,
        "maxReplicas": ctx.replicas,
    }
    if inits:
        predictor["initContainers"] = inits
    predictor["containers"] = [container]
    predictor["volumes"] = sorted(vols, key=lambda v: v["name"])
    annotations = {**ctx.annotations(), "serving.kserve.io/deploymentMode": "RawDeployment"}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": ctx.name,
            "namespace": ctx.namespace,
            "labels": ctx.labels("server"),
            "annotations": dict(sorted(annotations.items())),
        },
        "spec": {"predictor": predictor},
    }


def render(ctx: RenderContext) -> dict[str, str]:
    ctx.check_sources()
    h = header(ctx, TARGET, f"kubectl apply -f inference-service.yaml  (Secret {ctx.secret_name} must exist first)")
    docs = [configmap(ctx), inference_service(ctx)] + ([hf_cache_pvc(ctx)] if ctx.cache_size else [])
    return {"inference-service.yaml": h + dump_yaml_docs(docs)}


def render_fleet(ctxs: list[RenderContext], fleet: Any) -> dict[str, str]:
    """One InferenceService per replica group; KServe has no OpenAI router by model id across them."""
    files = {f"{c.group}/{n}": t for c in ctxs for n, t in render(c).items()}
    files["FLEET.txt"] = fleet_notes(ctxs, fleet).replace("Plain Kubernetes", "KServe").replace(
        "Deployment and Service", "InferenceService")
    return dict(sorted(files.items()))
