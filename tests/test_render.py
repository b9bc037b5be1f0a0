"""`peftdeploy render`: golden files per target on the shipped recipes, validation with each engine's
own schema where it installs (kubernetes-validate, Ray Serve's schema classes, SkyPilot's schemas),
and the secrets rule: no secret value appears in any output.

Regenerate golden files with PEFTDEPLOY_UPDATE_GOLDEN=1 pytest tests/test_render.py.

The LaunchSpec fed to the renderers is built here from the recipe (`launch_for`), the way `plan`
does for device "cuda", so the golden files depend only on the recipes and the renderers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from peftdeploy.launch.spec import LaunchSpec, MergeStep, ServedAdapter
from peftdeploy.recipe import load_recipe
from peftdeploy.render import TARGETS, RenderError, make_context, render, render_many

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
GOLDEN = Path(__file__).parent / "golden" / "render"
UPDATE = os.environ.get("PEFTDEPLOY_UPDATE_GOLDEN") == "1"
K8S_VERSION = "1.30.0"
STORE = "s3://acme-models/ray-serve"  # ray-serve's --store in the golden renders

SECRET_API = "sk-live-DO-NOT-LEAK-4f9c2e"
SECRET_HF = "hf_DO_NOT_LEAK_TOKEN_77aa"


def shipped_recipes() -> list[Path]:
    return sorted(p for p in RECIPES.glob("*.yaml") if p.name != "team-base.yaml")


def launch_for(recipe, *, local_root: str = "/home/dev/.cache/peftdeploy") -> LaunchSpec:
    """A LaunchSpec as `plan` makes it for a GPU: local paths for everything resolved on this machine."""
    merge = recipe.policy.mode == "merge"
    s = recipe.serving
    args: list[tuple[str, str | None]] = [("--served-model-name", recipe.name), ("--host", s.host),
                                          ("--port", str(s.port))]
    if not merge and recipe.backbone.revision:
        args.append(("--revision", recipe.backbone.revision))
    args += [("--dtype", recipe.backbone.dtype), ("--gpu-memory-utilization", f"{s.gpu_memory_utilization:g}")]
    if recipe.backbone.max_model_len:
        args.append(("--max-model-len", str(recipe.backbone.max_model_len)))
    if recipe.quantization.scheme not in ("none",):
        args.append(("--quantization", recipe.quantization.scheme))
    if recipe.quantization.kv_cache_dtype != "auto":
        args.append(("--kv-cache-dtype", recipe.quantization.kv_cache_dtype))
    if s.tensor_parallel_size > 1:
        args.append(("--tensor-parallel-size", str(s.tensor_parallel_size)))
    adapters: tuple[ServedAdapter, ...] = ()
    if not merge and recipe.adapters:
        n = s.max_loras if isinstance(s.max_loras, int) else min(len(recipe.adapters), 4)
        args += [("--enable-lora", None), ("--max-loras", str(n)), ("--max-lora-rank", "16"),
                 ("--max-cpu-loras", str(max(n, len(recipe.adapters))))]
        adapters = tuple(ServedAdapter(a.name, f"{local_root}/adapters/{a.name}", a.source, 16) for a in recipe.adapters)
    if adapters:  # as plan/command.py: JSON objects, the 2nd..nth as continuation tokens (json, None)
        mods = [json.dumps({"name": a.name, "path": a.path, "base_model_name": recipe.name}) for a in adapters]
        args += [("--lora-modules", mods[0]), *((m, None) for m in mods[1:])]
    return LaunchSpec(
        recipe_name=recipe.name, recipe_hash=recipe.compute_hash(), mode="merge" if merge else "serve",
        model=f"{local_root}/merged/abc" if merge else f"{local_root}/hub/backbone", model_source=recipe.backbone.model,
        served_model_name=recipe.name, host=s.host, port=s.port, device="cuda",
        tensor_parallel_size=s.tensor_parallel_size, args=tuple(args), adapters=adapters,
        env=(("PEFTDEPLOY_RECIPE", f"{local_root}/recipe.yaml"),
             *((("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),) if adapters and recipe.policy.dynamic_loading else ())),
        secret_env=(("VLLM_API_KEY", recipe.serving.api_key.env),) if recipe.serving.api_key.env else (),
        merge=MergeStep(tuple(recipe.merge_adapter_names()), f"{local_root}/merged/abc", "0123456789abcdef0123")
        if merge else None,
        plugin_recipe=f"{local_root}/recipe.yaml",
    )


def context(path: Path, env: dict[str, str] | None = None, **opts):
    r = load_recipe(path, env=env if env is not None else {}).recipe
    return make_context(r, launch_for(r), **opts)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


@pytest.fixture(params=[p.name for p in shipped_recipes()])
def recipe_path(request) -> Path:
    return RECIPES / request.param


# ---------------------------------------------------------------------------------------------
# golden files
# ---------------------------------------------------------------------------------------------
def test_golden_files(recipe_path: Path):
    ctx = context(recipe_path, store=STORE)
    out, skipped = render_many(ctx, list(TARGETS))
    assert not skipped
    gdir = GOLDEN / recipe_path.stem
    if UPDATE:
        shutil.rmtree(gdir, ignore_errors=True)
    for target, files in out.items():
        for name, text in files.items():
            p = gdir / target / name
            if UPDATE:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(text, encoding="utf-8")
            assert p.exists(), f"missing golden {p}: run with PEFTDEPLOY_UPDATE_GOLDEN=1"
            assert text == p.read_text(encoding="utf-8"), f"{p} differs (PEFTDEPLOY_UPDATE_GOLDEN=1 to accept)"
        on_disk = sorted(x.name for x in (gdir / target).iterdir())
        assert on_disk == sorted(files), f"stale golden files in {gdir / target}"


def test_deterministic_and_labelled(recipe_path: Path):
    a = render_many(context(recipe_path, store=STORE), list(TARGETS))[0]
    b = render_many(context(recipe_path, store=STORE), list(TARGETS))[0]
    assert a == b
    ctx = context(recipe_path)
    for target, files in a.items():
        for name, text in files.items():
            assert ctx.recipe_hash in text and ctx.recipe_name in text, f"{target}/{name} lacks recipe name/hash"


def test_no_local_paths_in_output(recipe_path: Path):
    for files in render_many(context(recipe_path, store=STORE), list(TARGETS))[0].values():
        for name, text in files.items():
            assert "/home/dev" not in text, name
            assert "PEFTDEPLOY_RECIPE" not in text, name


# ---------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------
def test_no_secret_value_in_any_output(recipe_path: Path, monkeypatch):
    monkeypatch.setenv("PEFTDEPLOY_API_KEY", SECRET_API)
    monkeypatch.setenv("HF_TOKEN", SECRET_HF)
    env = {"PEFTDEPLOY_API_KEY": SECRET_API, "HF_TOKEN": SECRET_HF}
    r = load_recipe(recipe_path, env=env).recipe
    assert r.serving.api_key.is_set  # the secret really was read
    ctx = make_context(r, launch_for(r), store=STORE)
    blob = json.dumps(render_many(ctx, list(TARGETS))[0])
    assert SECRET_API not in blob and SECRET_HF not in blob
    # and through the CLI, printing and writing
    monkeypatch.setattr("peftdeploy.render.cli.plan_launch", lambda p: (r, launch_for(r)))
    res = CliRunner().invoke(_cli(), ["render", str(recipe_path), "--target", "all", "--store", STORE])
    assert res.exit_code == 0, res.output
    assert SECRET_API not in res.output and SECRET_HF not in res.output


def test_secrets_are_references(recipe_path: Path):
    ctx = context(recipe_path, env={"PEFTDEPLOY_API_KEY": "x"})
    dep = docs(render(ctx, "kubernetes")["deployment.yaml"])[0]
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": f"{ctx.name}-secrets", "key": "PEFTDEPLOY_API_KEY"}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert all("value" not in e for k, e in env.items() if k in ("VLLM_API_KEY", "HF_TOKEN"))
    values = yaml.safe_load(render(ctx, "production-stack")["values.yaml"])
    spec = values["servingEngineSpec"]
    assert isinstance(spec["vllmApiKey"], dict) and isinstance(spec["modelSpec"][0]["hf_token"], dict)


# ---------------------------------------------------------------------------------------------
# kubernetes (+ the pod parts of kserve) with kubernetes-validate
# ---------------------------------------------------------------------------------------------
def _k8s_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("replicas", [1, 3])
def test_kubernetes_validates(recipe_path: Path, replicas: int):
    ctx = context(recipe_path, replicas=replicas)
    files = render(ctx, "kubernetes")
    kinds = []
    for name, text in files.items():
        if name.endswith(".yaml"):
            for d in docs(text):
                _k8s_validate(d)
                kinds.append(d["kind"])
                assert d["metadata"]["labels"]["app.kubernetes.io/name"] == ctx.name
                assert d["metadata"]["annotations"]["peftdeploy.io/recipe-hash"] == ctx.recipe_hash
    assert {"ConfigMap", "Deployment", "Service"} <= set(kinds)
    dep = next(d for d in docs(files["deployment.yaml"]))
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert dep["spec"]["replicas"] == replicas
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and "livenessProbe" in c
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(ctx.gpu_count)
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])
    cm = docs(files["configmap.yaml"])[0]
    assert yaml.safe_load(cm["data"]["recipe.yaml"])["name"] == ctx.recipe_name
    if ctx.merge:
        assert "PersistentVolumeClaim" in kinds
        assert pod["initContainers"][0]["command"][:2] == ["peftdeploy", "merge"]
        assert c["args"][0] == "/models/merged"
        pvc = docs(files["pvc.yaml"])[0]
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce" if replicas == 1 else "ReadWriteMany"]
        assert yaml.safe_load(cm["data"]["recipe.yaml"])["policy"]["merge"]["output"] == "/models/merged"
    else:
        mods = c["args"][c["args"].index("--lora-modules") + 1:] if "--lora-modules" in c["args"] else []
        assert {m.split("=")[0] for m in mods if "=" in m} == {a.name for a in ctx.launch.adapters}


def test_kserve_pod_parts_validate(recipe_path: Path):
    ctx = context(recipe_path)
    ds = docs(render(ctx, "kserve")["inference-service.yaml"])
    _k8s_validate(ds[0])
    isvc = ds[1]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    pred = dict(isvc["spec"]["predictor"])
    assert pred["containers"][0]["name"] == "kserve-container"
    # KServe's PredictorSpec inlines a PodSpec: validate those fields as a Pod
    pod_fields = {k: v for k, v in pred.items() if k not in ("minReplicas", "maxReplicas")}
    _k8s_validate({"apiVersion": "v1", "kind": "Pod", "metadata": isvc["metadata"], "spec": pod_fields})
    known = {"minReplicas", "maxReplicas", "containers", "initContainers", "volumes"}
    try:  # the KServe SDK, where installed, knows every PredictorSpec field
        from kserve.models import V1beta1PredictorSpec  # type: ignore

        known = set(V1beta1PredictorSpec.attribute_map.values())
    except ImportError:
        pass
    assert set(pred) <= known


# ---------------------------------------------------------------------------------------------
# production-stack values
# ---------------------------------------------------------------------------------------------
def test_production_stack_values_schema(recipe_path: Path):
    jsonschema = pytest.importorskip("jsonschema")
    from peftdeploy.render.production_stack_schema import VALUES_SCHEMA

    ctx = context(recipe_path)
    values = yaml.safe_load(render(ctx, "production-stack")["values.yaml"])
    jsonschema.validate(values, VALUES_SCHEMA, cls=jsonschema.Draft202012Validator)
    spec = values["servingEngineSpec"]["modelSpec"][0]
    assert spec["enableLoRA"] is (bool(ctx.launch.adapters) and not ctx.merge)
    assert "vllmConfig" in spec
    for obj in values.get("extraObjects", []):
        _k8s_validate(obj)
    if ctx.launch.adapters and not ctx.merge:
        assert values["loraController"]["enableLoraController"] is True
        assert [a["adapterSource"]["adapterName"] for a in values["loraAdapters"]] == [a.name for a in ctx.launch.adapters]
        assert spec["vllmConfig"]["maxLoras"] >= 1


# ---------------------------------------------------------------------------------------------
# Ray Serve
# ---------------------------------------------------------------------------------------------
def test_ray_serve_config_validates(recipe_path: Path):
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    ctx = context(recipe_path, store=STORE)
    cfg = yaml.safe_load(render(ctx, "ray-serve")["serve-config.yaml"])
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    llm = app["args"]["llm_configs"][0]
    try:
        from ray.serve.llm import LLMConfig  # needs pyarrow (and imports vLLM's config classes)
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"ray.serve.llm not importable: {e}")
    c = LLMConfig.model_validate(llm)
    if ctx.launch.adapters and not ctx.merge:
        assert c.lora_config.dynamic_lora_loading_path.startswith("s3://")
        assert c.lora_config.max_num_adapters_per_replica >= 1
        assert llm["engine_kwargs"]["enable_lora"] is True


def test_ray_serve_needs_a_store_for_hub_adapters():
    ctx = context(RECIPES / "llama3-8b-multilora.yaml")
    with pytest.raises(RenderError) as ei:
        render(ctx, "ray-serve")
    assert "--store" in (ei.value.fix or "")
    # `all` renders the other targets and reports the skip
    out, skipped = render_many(ctx, list(TARGETS), skip_unrenderable=True)
    assert set(skipped) == {"ray-serve"} and set(out) == set(TARGETS) - {"ray-serve"}


def test_ray_serve_uses_s3_adapters_in_place(tmp_path: Path):
    (tmp_path / "r.yaml").write_text(
        "apiVersion: peftdeploy/v1\nname: s3only\nbackbone: {model: hf://org/base}\n"
        "adapters:\n  - {name: a, source: s3://b/lora/a}\n  - {name: b, source: s3://b/lora/b}\n")
    ctx = context(tmp_path / "r.yaml")
    files = render(ctx, "ray-serve")
    assert "sync-to-store.sh" not in files
    llm = yaml.safe_load(files["serve-config.yaml"])["applications"][0]["args"]["llm_configs"][0]
    assert llm["lora_config"]["dynamic_lora_loading_path"] == "s3://b/lora"


# ---------------------------------------------------------------------------------------------
# SkyPilot (its own venv where it conflicts: PEFTDEPLOY_SKYPILOT_PYTHON=/path/to/python)
# ---------------------------------------------------------------------------------------------
_SKY_CHECK = r"""
import sys, yaml
from sky.utils import common_utils, schemas
cfg = yaml.safe_load(open(sys.argv[1]))
common_utils.validate_schema(cfg, schemas.get_task_schema(), 'Invalid task YAML: ')
import sky
task = sky.Task.from_yaml_config(cfg)
assert task.service is not None, 'no service section'
print('ok', task.service.readiness_path)
"""


def _sky_python() -> str | None:
    env = os.environ.get("PEFTDEPLOY_SKYPILOT_PYTHON")
    if env:
        return env
    try:
        import sky  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def test_skypilot_validates(recipe_path: Path, tmp_path: Path):
    ctx = context(recipe_path, env={"PEFTDEPLOY_API_KEY": "x"})
    files = render(ctx, "skypilot")
    svc = yaml.safe_load(files["service.yaml"])
    assert svc["service"]["readiness_probe"]["path"] == "/health"
    assert all(v is None for v in svc["secrets"].values())  # declared, never given a value
    py = _sky_python()
    if py is None:
        pytest.skip("skypilot not installed (set PEFTDEPLOY_SKYPILOT_PYTHON to a venv's python that has it)")
    p = tmp_path / "service.yaml"
    p.write_text(files["service.yaml"])
    res = subprocess.run([py, "-c", _SKY_CHECK, str(p)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# sources a cluster cannot reach; CLI
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,word", [("./adapters/mine", "path on this machine"), ("demo://tiny-lora", "demo://")])
def test_local_and_demo_sources_are_refused(tmp_path: Path, source: str, word: str, monkeypatch):
    (tmp_path / "adapters" / "mine").mkdir(parents=True)
    p = tmp_path / "r.yaml"
    p.write_text("apiVersion: peftdeploy/v1\nname: localbits\nbackbone: {model: hf://org/base}\n"
                 f"adapters:\n  - {{name: mine, source: '{source}'}}\n")
    ctx = context(p)
    for t in TARGETS:
        with pytest.raises(RenderError) as ei:
            render(ctx, t)
        assert "adapter 'mine'" in ei.value.message and word in ei.value.message
        assert "hf://" in ei.value.fix and "s3://" in ei.value.fix
    r = load_recipe(p, env={}).recipe
    monkeypatch.setattr("peftdeploy.render.cli.plan_launch", lambda path: (r, launch_for(r)))
    res = CliRunner().invoke(_cli(), ["render", str(p), "--target", "all"])
    assert res.exit_code == 2
    assert "adapter 'mine'" in res.output and "Traceback" not in res.output


def _cli():
    from peftdeploy.cli import main

    return main


def test_cli_stdout_and_out_dir(tmp_path: Path, monkeypatch):
    path = RECIPES / "qwen2.5-7b-merge-fp8.yaml"
    r = load_recipe(path, env={}).recipe
    monkeypatch.setattr("peftdeploy.render.cli.plan_launch", lambda p: (r, launch_for(r)))
    runner = CliRunner()
    res = runner.invoke(_cli(), ["render", str(path), "--target", "kubernetes", "--replicas", "2"])
    assert res.exit_code == 0, res.output
    parsed = [d for d in yaml.safe_load_all(res.output) if d]
    assert {d["kind"] for d in parsed} == {"ConfigMap", "Deployment", "Service", "PersistentVolumeClaim"}
    assert "# Source: kubernetes/deployment.yaml" in res.output
    out = tmp_path / "out"
    (out / "kubernetes").mkdir(parents=True)
    (out / "kubernetes" / "stale.yaml").write_text("old")
    res = runner.invoke(_cli(), ["render", str(path), "--target", "all", "--out", str(out), "--store", STORE])
    assert res.exit_code == 0, res.output
    assert sorted(x.name for x in out.iterdir()) == sorted(TARGETS)  # no temp dirs left behind
    assert not (out / "kubernetes" / "stale.yaml").exists()  # a target dir is replaced whole
    assert (out / "kubernetes" / "pvc.yaml").exists()
    assert os.access(out / "ray-serve" / "sync-to-store.sh", os.X_OK)
    res = runner.invoke(_cli(), ["render", str(path), "--target", "all", "--json"])
    assert res.exit_code == 0, res.output
    j = json.loads(res.output)
    assert j["ok"] and "ray-serve" in j["skipped"] and "kubernetes/deployment.yaml" in j["files"]
