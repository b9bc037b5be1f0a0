"""Target `kubernetes`: plain manifests (ConfigMap, Deployment, Service, PVC for merge policy).

* Deployment: the vLLM container with the planned flags and env, GPU resources, startup/readiness/
  liveness probes on /health, a memory-backed /dev/shm; init containers fetch hf:// adapters and
  s3:// sources (serve policy) or run `peftdeploy merge` of the ConfigMap recipe into the PVC
  (merge policy), and vLLM serves the PVC path.
* Secrets are referenced, never copied: the API key and HF token come from the Secret
  `<recipe>-secrets` (key = the environment variable's name, e.g. PEFTDEPLOY_API_KEY, HF_TOKEN);
  s3 credentials from the optional Secret `<recipe>-aws` (or the pod's IAM role).
* ConfigMap `<recipe>-recipe`: the resolved recipe (secrets as ${VAR}).
"""
from __future__ import annotations

from typing import Any

from .base import (
    ADAPTERS_DIR,
    AWS_CLI_IMAGE,
    CONTAINER_PORT,
    MODELS_DIR,
    RECIPE_DIR,
    RenderContext,
    dump_yaml,
    fetch_script,
    header,
    model_location,
    vllm_flags,
)

TARGET = "kubernetes"
KUBERNETES_VERSION = "1.30"  # the API version the manifests are validated against in tests
SHM_SIZE = "16Gi"


def _secret_ref(ctx: RenderContext, env: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": ctx.secret_name, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": env, "valueFrom": {"secretKeyRef": ref}}


def secret_envs(ctx: RenderContext, *, for_server: bool = True) -> list[dict[str, Any]]:
    """Env entries that reference the recipe's Secret: API key (required when the recipe has one),
    HF token (optional). `for_server=False` names them as the recipe expects (for `peftdeploy`)."""
    out = [_secret_ref(ctx, "HF_TOKEN", "HF_TOKEN", optional=True)]
    for server_var, source_var in ctx.secret_env():
        out.append(_secret_ref(ctx, server_var if for_server else source_var, source_var))
    return sorted(out, key=lambda e: e["name"])


def adapter_paths(ctx: RenderContext) -> dict[str, str]:
    return {name: f"{ADAPTERS_DIR}/{name}" for name, _ in ctx.adapter_sources()}


def init_containers(ctx: RenderContext, *, image: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(init containers, names of emptyDir volumes they need) for fetching or merging."""
    inits: list[dict[str, Any]] = []
    volumes: set[str] = set()
    if ctx.merge:
        inits.append({
            "name": "merge",
            "image": ctx.tools_image,
            "command": ["peftdeploy", "merge", f"{RECIPE_DIR}/recipe.yaml"],
            "env": sorted([*secret_envs(ctx, for_server=False),
                           {"name": "PEFTDEPLOY_CACHE", "value": f"{MODELS_DIR}/cache"}], key=lambda e: e["name"]),
            "envFrom": [{"secretRef": {"name": f"{ctx.name}-aws", "optional": True}}],
            "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR},
                             {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True}],
        })
        return inits, []
    py, sh = fetch_script(ctx)
    mounts = []
    if ctx.adapter_sources():
        volumes.add("adapters")
        mounts.append({"name": "adapters", "mountPath": ADAPTERS_DIR})
    if model_location(ctx).startswith(MODELS_DIR):
        volumes.add("models")
        mounts.append({"name": "models", "mountPath": MODELS_DIR})
    if py:
        inits.append({
            "name": "fetch-hub",
            "image": image,
            "command": ["python3", "-c", py],
            "env": [_secret_ref(ctx, "HF_TOKEN", "HF_TOKEN", optional=True)],
            "volumeMounts": mounts,
        })
    if sh:
        inits.append({
            "name": "fetch-s3",
            "image": AWS_CLI_IMAGE,
            "command": ["sh", "-c", sh],
            "envFrom": [{"secretRef": {"name": f"{ctx.name}-aws", "optional": True}}],
            "volumeMounts": mounts,
        })
    return inits, sorted(volumes)


def probes() -> dict[str, Any]:
    get = {"path": "/health", "port": "http"}
    return {
        # model download + load can take many minutes: the startup probe holds the others off
        "startupProbe": {"httpGet": dict(get), "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {"httpGet": dict(get), "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {"httpGet": dict(get), "periodSeconds": 30, "failureThreshold": 3, "timeoutSeconds": 10},
    }


def vllm_container(ctx: RenderContext) -> dict[str, Any]:
    paths = adapter_paths(ctx)
    args = [model_location(ctx), *vllm_flags(ctx, adapter_paths=paths)]
    env = [{"name": k, "value": v} for k, v in ctx.plain_env()]
    env += [{"name": "HF_HOME", "value": "/cache/huggingface"}]
    env += secret_envs(ctx)
    env.sort(key=lambda e: e["name"])
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "hf-cache", "mountPath": "/cache"},
              {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True}]
    if ctx.merge or model_location(ctx).startswith(MODELS_DIR):
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    if paths:
        mounts.append({"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True})
    gpus = str(ctx.gpu_count)
    return {
        "name": "vllm",
        "image": ctx.image,
        "command": ["vllm", "serve"],
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "resources": {"limits": {ctx.gpu_type: gpus}, "requests": {ctx.gpu_type: gpus}},
        **probes(),
        "volumeMounts": sorted(mounts, key=lambda m: m["mountPath"]),
    }


def hf_cache_volume(ctx: RenderContext) -> dict[str, Any]:
    """The HF cache: a PVC sized from the plan (no re-download on every restart); emptyDir when unknown."""
    if ctx.cache_size:
        return {"name": "hf-cache", "persistentVolumeClaim": {"claimName": f"{ctx.name}-hf-cache"}}
    return {"name": "hf-cache", "emptyDir": {}}


def hf_cache_pvc(ctx: RenderContext) -> dict[str, Any]:
    return pvc(ctx, f"{ctx.name}-hf-cache", "hf-cache", ctx.cache_size)  # replicas of a group share downloads


def pod_volumes(ctx: RenderContext, empty_dirs: list[str]) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
        hf_cache_volume(ctx),
        {"name": "recipe", "configMap": {"name": f"{ctx.name}-recipe"}},
    ]
    if ctx.merge:
        vols.append({"name": "models", "persistentVolumeClaim": {"claimName": f"{ctx.name}-models"}})
    for v in empty_dirs:
        vols.append({"name": v, "emptyDir": {}})
    return sorted(vols, key=lambda v: v["name"])


def metadata(ctx: RenderContext, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": ctx.namespace, "labels": ctx.labels(component),
            "annotations": ctx.annotations()}


def configmap(ctx: RenderContext, merged_dir: str | None = None) -> dict[str, Any]:
    recipe = ctx.cluster_recipe(merged_dir) if merged_dir else ctx.cluster_recipe()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(ctx, f"{ctx.name}-recipe", "recipe"),
        "data": {"recipe.yaml": dump_yaml(recipe)},
    }


def deployment(ctx: RenderContext) -> dict[str, Any]:
    inits, empty_dirs = init_containers(ctx, image=ctx.image)
    pod_spec: dict[str, Any] = {}
    if inits:
        pod_spec["initContainers"] = inits
    pod_spec["containers"] = [vllm_container(ctx)]
    pod_spec["terminationGracePeriodSeconds"] = 60
    pod_spec["volumes"] = pod_volumes(ctx, empty_dirs)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(ctx, ctx.name, "server"),
        "spec": {
            "replicas": ctx.replicas,
            "selector": {"matchLabels": ctx.selector()},
            # a GPU node rarely has room for a surge pod: replace in place
            "strategy": {"type": "Recreate"} if ctx.merge and ctx.replicas == 1 else {
                "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": ctx.labels("server"), "annotations": ctx.annotations()},
                "spec": pod_spec,
            },
        },
    }


def service(ctx: RenderContext) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, ctx.name, "server"),
        "spec": {
            "type": "ClusterIP",
            "selector": ctx.selector(),
            "ports": [{"name": "http", "port": CONTAINER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pvc(ctx: RenderContext, name: str | None = None, component: str = "models",
        size: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(ctx, name or f"{ctx.name}-models", component),
        "spec": {
            # one replica: ReadWriteOnce; several share the merged model (or the HF cache): ReadWriteMany
            "accessModes": ["ReadWriteOnce" if ctx.replicas == 1 else "ReadWriteMany"],
            "resources": {"requests": {"storage": size or ctx.storage_size}},
        },
    }


def notes(ctx: RenderContext) -> str:
    keys = ["HF_TOKEN (optional: gated or private hub repos)"]
    keys += [f"{src} (served as {dst})" for dst, src in ctx.secret_env()]
    lit = " ".join(f"--from-literal={k.split(' ')[0]}=\"${k.split(' ')[0]}\"" for k in keys)
    return (
        f"Deploy {ctx.recipe_name} (recipe hash {ctx.recipe_hash}) on Kubernetes.\n\n"
        f"1. Create the Secret the manifests reference (values come from your shell, never from files):\n"
        f"     kubectl -n {ctx.namespace} create secret generic {ctx.secret_name} {lit}\n"
        f"   keys: {', '.join(keys)}\n"
        f"   s3:// sources: an optional Secret {ctx.name}-aws with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY\n"
        f"   (or give the pod an IAM role).\n"
        f"2. kubectl apply -f .\n"
        f"3. kubectl -n {ctx.namespace} port-forward svc/{ctx.name} {CONTAINER_PORT}:{CONTAINER_PORT}, then\n"
        f"   curl localhost:{CONTAINER_PORT}/v1/models  — models: {', '.join(ctx.launch.model_names)}\n"
    )


def render(ctx: RenderContext) -> dict[str, str]:
    ctx.check_sources()
    h = header(ctx, TARGET)
    files = {
        "configmap.yaml": h + dump_yaml(configmap(ctx)),
        "deployment.yaml": h + dump_yaml(deployment(ctx)),
        "service.yaml": h + dump_yaml(service(ctx)),
        "NOTES.txt": notes(ctx),
    }
    if ctx.merge:
        files["pvc.yaml"] = h + dump_yaml(pvc(ctx))
    if ctx.cache_size:
        files["hf-cache-pvc.yaml"] = h + dump_yaml(hf_cache_pvc(ctx))
    return dict(sorted(files.items()))


def fleet_notes(ctxs: list[RenderContext], fleet: Any) -> str:
    rows = "\n".join(f"  {c.group}: service {c.name}:{CONTAINER_PORT}, models {', '.join(c.launch.model_names)}"
                      for c in ctxs)
    return (f"Fleet of {ctxs[0].recipe_name}: {fleet.reason}\n\n"
            "Plain Kubernetes has no OpenAI router that routes by the request's model id: each replica group has\n"
            "its own Deployment and Service; send a model's requests to its group's Service, or render the\n"
            "production-stack target (its router routes by model name) or ray-serve.\n" + rows + "\n")


def render_fleet(ctxs: list[RenderContext], fleet: Any) -> dict[str, str]:
    files: dict[str, str] = {}
    for c in ctxs:
        for n, text in render(c).items():
            files[f"{c.group}/{n}"] = text
    files["FLEET.txt"] = fleet_notes(ctxs, fleet)
    return dict(sorted(files.items()))
