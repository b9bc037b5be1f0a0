"""`peftdeploy render`: golden files per target on the shipped recipes, validation with each engine's
own schema where it installs (kubernetes-validate, Ray Serve's schema classes, SkyPilot's schemas,
the KServe SDK), the secrets rule (no secret value appears in any output) and the locality rule (no
path of this machine appears in any output).

Regenerate golden files with PEFTDEPLOY_UPDATE_GOLDEN=1 pytest tests/test_render.py.

The shipped recipes go through the real planner (`make_plan`, device "cuda", a fixed --gpu-memory and
--host-memory) against an offline hub cache filled by tests/hubcache.py, as `peftdeploy render` does.
`launch_for` builds a LaunchSpec by hand only for unit cases the shipped recipes don't cover (sources a
cluster cannot reach, s3-only adapters).

The SkyPilot validator (and the KServe SDK) conflict with .venv: `bash scripts/setup_validators.sh`
creates .venv-validators/, used automatically (or PEFTDEPLOY_SKYPILOT_PYTHON=/path/to/python).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from click.testing import CliRunner

from hubcache import LLAMA3_8B, prefill_shipped, write_adapter
from peftdeploy.plan.spec import LaunchSpec, MergeStep, ServedAdapter
from peftdeploy.plan import make_plan
from peftdeploy.recipe import load_recipe
from peftdeploy.render import TARGETS, RenderError, make_context, render, render_many
from peftdeploy.render.base import DEFAULT_VLLM_IMAGE, server_kernels

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
GOLDEN = Path(__file__).parent / "golden" / "render"
UPDATE = os.environ.get("PEFTDEPLOY_UPDATE_GOLDEN") == "1"
K8S_VERSION = "1.30.0"
STORE = "s3://acme-models/ray-serve"  # ray-serve's --store in the golden renders
GPU_MEMORY = "80GiB"  # render plans for this GPU (and host RAM): the golden files don't depend on the machine
HOST_MEMORY = "64GiB"
VALIDATORS_PY = ROOT / ".venv-validators" / "bin" / "python"  # scripts/setup_validators.sh
VALIDATORS_STAMP = ROOT / ".venv-validators" / ".peftdeploy-validators"  # written when that setup finished

SECRET_API = "sk-live-DO-NOT-LEAK-4f9c2e"
SECRET_HF = "hf_DO_NOT_LEAK_TOKEN_77aa"


# the shipped recipes whose sources are on the hub / s3 (tests/hubcache.py fills an offline cache with them)
HUB_RECIPES = ("llama3-8b-multilora.yaml", "mistral-7b-awq-qlora.yaml", "qwen2.5-7b-merge-fp8.yaml", "team-base.yaml")


def shipped_recipes() -> list[Path]:
    return [RECIPES / n for n in HUB_RECIPES]


def other_recipes() -> list[str]:
    """recipes/*.yaml besides the hub ones (the demo:// recipes: `peftdeploy up` on a laptop)."""
    return sorted(p.name for p in RECIPES.glob("*.yaml") if p.name not in HUB_RECIPES)


# ---------------------------------------------------------------------------------------------
# the offline hub cache (two of them: output must not depend on where the caches are)
# ---------------------------------------------------------------------------------------------
CACHE_VARS = ("HF_HUB_CACHE", "PEFTDEPLOY_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "HF_TOKEN", "PEFTDEPLOY_API_KEY")


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    out = []
    for tag in ("a", "b"):
        base = tmp_path_factory.mktemp(f"render-cache-{tag}")
        prefill_shipped(base / "hub", base / "pd", base / "work")
        out.append({"HF_HUB_CACHE": str(base / "hub"), "PEFTDEPLOY_CACHE": str(base / "pd"), "HF_HUB_OFFLINE": "1"})
    return out


@contextlib.contextmanager
def using(cache: dict[str, str], extra: dict[str, str] | None = None) -> Iterator[None]:
    """The process environment of one offline cache (nothing else of the caller's HF/peftdeploy env)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in CACHE_VARS:
            mp.delenv(k, raising=False)
        for k, v in {**cache, **(extra or {})}.items():
            mp.setenv(k, v)
        yield


@pytest.fixture
def hub(caches: list[dict[str, str]]) -> Iterator[dict[str, str]]:
    with using(caches[0]):
        yield caches[0]


def planned(path: Path, env: dict[str, str] | None = None) -> tuple[object, LaunchSpec]:
    """(recipe, LaunchSpec) from the real planner, as `peftdeploy render` plans (in the current cache env)."""
    loaded = load_recipe(path, env=env if env is not None else {})
    plan = make_plan(loaded, device="cuda", gpu_memory=GPU_MEMORY, host_memory=HOST_MEMORY,
                     **server_kernels(DEFAULT_VLLM_IMAGE))  # the kernels the default image runs, as the CLI plans
    assert plan.ok, [(f.code, f.message) for f in plan.errors]
    return loaded.recipe, plan.launch


def context(path: Path, env: dict[str, str] | None = None, **opts):
    r, launch = planned(path, env)
    return make_context(r, launch, **opts)


def launch_for(recipe, *, local_root: str = "/home/dev/.cache/peftdeploy") -> LaunchSpec:
    """A LaunchSpec built by hand, as `plan` makes it for a GPU (local paths for everything resolved on
    this machine), for recipes whose sources are not in the test hub cache."""
    merge = recipe.policy.mode == "merge"
    s = recipe.serving
    args: list[tuple[str, str | None]] = [("--served-model-name", recipe.name), ("--host", s.host),
                                          ("--port", str(s.port))]
    if not merge and recipe.backbone.revision:
        args.append(("--revision", recipe.backbone.revision))
    args += [("--dtype", recipe.backbone.dtype), ("--gpu-memory-utilization", f"{s.gpu_memory_utilization:g}")]
    if recipe.backbone.max_model_len:
        args.append(("--max-model-len", str(recipe.backbone.max_model_len)))
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


def hand_context(path: Path, env: dict[str, str] | None = None, **opts):
    r = load_recipe(path, env=env if env is not None else {}).recipe
    return make_context(r, launch_for(r), **opts)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


@pytest.fixture(params=[p.name for p in shipped_recipes()])
def recipe_path(request, hub) -> Path:
    return RECIPES / request.param


def _cli():
    from peftdeploy.cli import main

    return main


def _lora_modules(args: list[str]) -> list[str]:
    """The values after --lora-modules (up to the next flag)."""
    if "--lora-modules" not in args:
        return []
    out = []
    for a in args[args.index("--lora-modules") + 1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


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


def test_no_stale_golden_recipes():
    assert sorted(x.name for x in GOLDEN.iterdir()) == sorted(p.stem for p in shipped_recipes())


def _render_in(cache: dict[str, str], path: Path) -> tuple[dict[str, dict[str, str]], LaunchSpec]:
    with using(cache):
        r, launch = planned(path)
        return render_many(make_context(r, launch, store=STORE), list(TARGETS))[0], launch


def test_deterministic_across_caches_and_labelled(recipe_path: Path, caches: list[dict[str, str]]):
    (a, la), (b, lb) = _render_in(caches[0], recipe_path), _render_in(caches[1], recipe_path)
    assert la.model_names == lb.model_names
    assert a == b, "the output depends on where the caches are"
    ctx = context(recipe_path)
    for target, files in a.items():
        for name, text in files.items():
            assert ctx.recipe_hash in text and ctx.recipe_name in text, f"{target}/{name} lacks recipe name/hash"


def test_no_local_paths_in_output(recipe_path: Path, caches: list[dict[str, str]]):
    for cache in caches:
        out, launch = _render_in(cache, recipe_path)
        local = {cache["HF_HUB_CACHE"], cache["PEFTDEPLOY_CACHE"], str(Path(cache["HF_HUB_CACHE"]).parent),
                 str(ROOT), str(RECIPES), os.path.expanduser("~") + "/"}
        planned_blob = json.dumps(launch.to_dict())
        assert str(ROOT) in planned_blob  # the plan does carry local paths: the renderers drop them
        assert "--middleware" in planned_blob and "PEFTDEPLOY_MODEL_NAMES" in planned_blob  # ... and these
        if launch.adapters or launch.merge:
            assert cache["HF_HUB_CACHE"] in planned_blob or cache["PEFTDEPLOY_CACHE"] in planned_blob
        for target, files in out.items():
            for name, text in files.items():
                for p in local:
                    assert p not in text, f"{target}/{name} contains the local path {p}"
                # nor what only a host with peftdeploy installed can run (the traffic middleware)
                for word in ("/tmp/", "snapshots/", "models--", "PEFTDEPLOY_RECIPE", "PEFTDEPLOY_MODEL_NAMES",
                             "--middleware", "peftdeploy.vllm_plugin"):
                    assert word not in text, f"{target}/{name} contains {word!r}"


# ---------------------------------------------------------------------------------------------
# adapters: plan emits ("--lora-modules", json1), (json2, None), ...; every target serves all of them
# ---------------------------------------------------------------------------------------------
def test_every_served_adapter_in_every_target(recipe_path: Path):
    ctx = context(recipe_path, store=STORE)
    names = [a.name for a in ctx.launch.adapters] if not ctx.merge else []
    flags = [k for k, _ in ctx.launch.args]
    if names:  # one flag, then continuation tokens: the case the renderers must handle
        assert flags.count("--lora-modules") == 1
        i = flags.index("--lora-modules")
        assert [json.loads(k)["name"] for k in flags[i + 1:i + len(names)]] == names[1:]
    expected = [f"{n}=/adapters/{n}" for n in names]
    out = render_many(ctx, list(TARGETS))[0]
    for target, files in out.items():
        for name, text in files.items():
            assert '"base_model_name"' not in text and '{"name"' not in text, f"{target}/{name}: plan's JSON leaked"

    c = docs(out["kubernetes"]["deployment.yaml"])[0]["spec"]["template"]["spec"]["containers"][0]
    assert _lora_modules(c["args"]) == expected
    assert ("--enable-lora" in c["args"]) is bool(names)
    kc = docs(out["kserve"]["inference-service.yaml"])[1]["spec"]["predictor"]["containers"][0]
    assert _lora_modules(kc["args"]) == expected
    run = yaml.safe_load(out["skypilot"]["service.yaml"])["run"]
    assert _lora_modules(shlex.split(run)) == expected

    values = yaml.safe_load(out["production-stack"]["values.yaml"])
    spec = values["servingEngineSpec"]["modelSpec"][0]
    assert [a["adapterSource"]["adapterName"] for a in values.get("loraAdapters", [])] == names
    assert not any(x.startswith("--lora-modules") for x in spec["vllmConfig"].get("extraArgs", []))
    assert spec["enableLoRA"] is bool(names)

    llm = yaml.safe_load(out["ray-serve"]["serve-config.yaml"])["applications"][0]["args"]["llm_configs"][0]
    assert "lora_modules" not in llm["engine_kwargs"]
    if names:
        assert llm["engine_kwargs"]["enable_lora"] is True
        assert llm["lora_config"]["dynamic_lora_loading_path"] == f"{STORE}/adapters"
        assert llm["lora_config"]["max_num_adapters_per_replica"] >= len(names)
        sync = out["ray-serve"]["sync-to-store.sh"]
        for n in names:
            assert f"{STORE}/adapters/{n}" in sync
    else:
        assert "lora_config" not in llm and "enable_lora" not in llm["engine_kwargs"]


# ---------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------
def test_no_secret_value_in_any_output(recipe_path: Path, hub: dict[str, str]):
    env = {"PEFTDEPLOY_API_KEY": SECRET_API, "HF_TOKEN": SECRET_HF}
    with using(hub, env):
        r, launch = planned(recipe_path, env=env)
        assert r.serving.api_key.is_set  # the secret really was read
        ctx = make_context(r, launch, store=STORE)
        blob = json.dumps(render_many(ctx, list(TARGETS))[0])
        assert SECRET_API not in blob and SECRET_HF not in blob
        # and through the CLI (the real planner), printing and writing
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
        mods = _lora_modules(c["args"])
        assert [m.split("=")[0] for m in mods] == [a.name for a in ctx.launch.adapters]


@functools.lru_cache(maxsize=None)
def _kserve_predictor_fields() -> frozenset[str] | None:
    """Every PredictorSpec field the KServe SDK knows: in this python, else in the validators venv."""
    try:
        from kserve.models import V1beta1PredictorSpec  # type: ignore

        return frozenset(V1beta1PredictorSpec.attribute_map.values())
    except ImportError:
        pass
    py = _validator_python()
    if py is None or py == sys.executable:
        return None
    res = subprocess.run([py, "-c", "import json; from kserve.models import V1beta1PredictorSpec as S; "
                                    "print(json.dumps(sorted(S.attribute_map.values())))"],
                         capture_output=True, text=True, timeout=300)
    return frozenset(json.loads(res.stdout)) if res.returncode == 0 else None


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
    known = _kserve_predictor_fields() or {"minReplicas", "maxReplicas", "containers", "initContainers", "volumes"}
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


def test_ray_serve_needs_a_store_for_hub_adapters(hub):
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
    ctx = hand_context(tmp_path / "r.yaml")
    files = render(ctx, "ray-serve")
    assert "sync-to-store.sh" not in files
    llm = yaml.safe_load(files["serve-config.yaml"])["applications"][0]["args"]["llm_configs"][0]
    assert llm["lora_config"]["dynamic_lora_loading_path"] == "s3://b/lora"
    assert [x.split("=")[0] for x in _lora_modules(render(ctx, "skypilot")["service.yaml"].split())] == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# SkyPilot (its own venv: scripts/setup_validators.sh -> .venv-validators, or PEFTDEPLOY_SKYPILOT_PYTHON)
# ---------------------------------------------------------------------------------------------
_SKY_CHECK = r"""
import sys, yaml
from sky.utils import common_utils, schemas
import sky
for path in sys.argv[1:]:
    cfg = yaml.safe_load(open(path))
    common_utils.validate_schema(cfg, schemas.get_task_schema(), f'Invalid task YAML {path}: ')
    task = sky.Task.from_yaml_config(cfg)
    assert task.service is not None, f'{path}: no service section'
    print('ok', path, task.service.readiness_path)
"""


def _validator_python() -> str | None:
    """A python with skypilot: $PEFTDEPLOY_SKYPILOT_PYTHON, .venv-validators, or this one."""
    env = os.environ.get("PEFTDEPLOY_SKYPILOT_PYTHON")
    if env:
        return env
    if VALIDATORS_PY.exists() and VALIDATORS_STAMP.exists():  # a finished scripts/setup_validators.sh
        return str(VALIDATORS_PY)
    try:
        import sky  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def test_skypilot_service(recipe_path: Path):
    ctx = context(recipe_path, env={"PEFTDEPLOY_API_KEY": "x"})
    svc = yaml.safe_load(render(ctx, "skypilot")["service.yaml"])
    assert svc["service"]["readiness_probe"]["path"] == "/health"
    assert all(v is None for v in svc["secrets"].values())  # declared, never given a value


def test_skypilot_validates(tmp_path: Path, hub):
    paths = []
    for recipe in shipped_recipes():
        ctx = context(recipe, env={"PEFTDEPLOY_API_KEY": "x"})
        p = tmp_path / recipe.stem / "service.yaml"
        p.parent.mkdir()
        p.write_text(render(ctx, "skypilot")["service.yaml"])
        paths.append(str(p))
    py = _validator_python()
    if py is None:
        pytest.skip("skypilot not installed (bash scripts/setup_validators.sh, or set PEFTDEPLOY_SKYPILOT_PYTHON "
                    "to a venv's python that has it)")
    res = subprocess.run([py, "-c", _SKY_CHECK, *paths], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ok ") == len(paths)


# ---------------------------------------------------------------------------------------------
# sources a cluster cannot reach
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,word", [("./adapters/mine", "path on this machine"), ("demo://tiny-lora", "demo://")])
def test_local_and_demo_sources_are_refused(tmp_path: Path, source: str, word: str, monkeypatch):
    (tmp_path / "adapters" / "mine").mkdir(parents=True)
    p = tmp_path / "r.yaml"
    p.write_text("apiVersion: peftdeploy/v1\nname: localbits\nbackbone: {model: hf://org/base}\n"
                 f"adapters:\n  - {{name: mine, source: '{source}'}}\n")
    ctx = hand_context(p)
    for t in TARGETS:
        with pytest.raises(RenderError) as ei:
            render(ctx, t)
        assert "adapter 'mine'" in ei.value.message and word in ei.value.message
        assert "hf://" in ei.value.fix and "s3://" in ei.value.fix
    r = load_recipe(p, env={}).recipe
    monkeypatch.setattr("peftdeploy.commands.render_cmd.plan_launch", lambda path, **kw: (r, launch_for(r)))
    res = CliRunner().invoke(_cli(), ["render", str(p), "--target", "all"])
    assert res.exit_code == 2
    assert "adapter 'mine'" in res.output and "Traceback" not in res.output


def test_local_adapter_refused_through_the_real_plan(tmp_path: Path, hub):
    write_adapter(tmp_path / "adapters" / "mine", LLAMA3_8B, r=8, layers=[0],
                  base_model="meta-llama/Meta-Llama-3-8B-Instruct")
    p = tmp_path / "r.yaml"
    p.write_text("apiVersion: peftdeploy/v1\nname: localbits\n"
                 "backbone: {model: hf://meta-llama/Meta-Llama-3-8B-Instruct, revision: main}\n"
                 "adapters:\n  - {name: mine, source: ./adapters/mine}\n")
    res = CliRunner().invoke(_cli(), ["render", str(p), "--target", "all"])
    assert res.exit_code == 2, res.output
    assert "adapter 'mine'" in res.output and "path on this machine" in res.output and "Traceback" not in res.output
    assert str(tmp_path) not in res.stdout


# ---------------------------------------------------------------------------------------------
# CLI (the real planner, the offline cache)
# ---------------------------------------------------------------------------------------------
def _needs_store(ctx) -> bool:
    return ctx.merge or any(s.kind == "hf" for _, s in ctx.adapter_sources())


def test_cli_every_target_of_every_shipped_recipe(recipe_path: Path):
    ctx = context(recipe_path)
    runner = CliRunner()
    for t in TARGETS:
        res = runner.invoke(_cli(), ["render", str(recipe_path), "--target", t])
        assert "Traceback" not in res.output
        if t == "ray-serve" and _needs_store(ctx):  # refused, with the way forward
            assert res.exit_code == 2, res.output
            assert "ray-serve" in res.output and "--store s3://" in res.output
            continue
        assert res.exit_code == 0, f"{t}: {res.output}"
        assert f"# Source: {t}/" in res.stdout and docs(res.stdout)
    res = runner.invoke(_cli(), ["render", str(recipe_path), "--target", "all"])
    assert res.exit_code == 0, res.output
    rendered = {ln.split("/")[0][len("# Source: "):] for ln in res.stdout.splitlines() if ln.startswith("# Source: ")}
    assert rendered == set(TARGETS) - ({"ray-serve"} if _needs_store(ctx) else set())
    assert ("skipped ray-serve" in res.stderr) is _needs_store(ctx)


_CLI_PROBE = ("import atexit, json, sys\n"
              "atexit.register(lambda: sys.stderr.write('\\nHEAVY ' + json.dumps(sorted({m.split('.')[0] for m in "
              "sys.modules} & {'torch', 'vllm', 'ray', 'sky', 'kserve'})) + '\\n'))\n"
              "from peftdeploy.cli import main\nmain()\n")


def test_cli_subprocess_matches_golden(tmp_path: Path, caches: list[dict[str, str]]):
    """`peftdeploy render --target all --out` in a fresh process on the *other* cache == the golden files;
    render, a pure stage, imports neither torch nor vLLM (nor the engines it renders for)."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    env.update(caches[1])
    for recipe in shipped_recipes():
        out = tmp_path / recipe.stem
        res = subprocess.run([sys.executable, "-c", _CLI_PROBE, "render", str(recipe),
                              "--target", "all", "--store", STORE, "--gpu-memory", GPU_MEMORY,
                              "--host-memory", HOST_MEMORY, "--out", str(out)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "\nHEAVY []\n" in res.stderr, res.stderr[-2000:]
        got = {str(f.relative_to(out)): f.read_text() for f in sorted(out.rglob("*")) if f.is_file()}
        gdir = GOLDEN / recipe.stem
        want = {str(f.relative_to(gdir)): f.read_text() for f in sorted(gdir.rglob("*")) if f.is_file()}
        assert got == want, f"{recipe.name}: CLI output differs from the golden files"


@pytest.mark.parametrize("name", other_recipes() or ["(none)"])
def test_cli_other_recipes_render_or_refuse(name: str, hub):
    """Every other shipped recipe renders or is refused (exit 2) with its reason: never a traceback.
    A demo:// backbone is refused before planning (planning would build the demo model first)."""
    if name == "(none)":
        pytest.skip("no recipes besides the hub ones")
    res = CliRunner().invoke(_cli(), ["render", str(RECIPES / name), "--target", "all"])
    assert res.exit_code in (0, 2), res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    if res.exit_code == 2:
        assert res.output.strip(), "refused without a reason"


def test_demo_backbone_refused_before_planning(tmp_path: Path, hub, monkeypatch):
    p = tmp_path / "r.yaml"
    p.write_text("apiVersion: peftdeploy/v1\nname: demoish\nbackbone: {model: demo://smollm2-135m}\n")

    def boom(*a, **k):
        raise AssertionError("planned a recipe whose backbone a cluster cannot reach")

    monkeypatch.setattr("peftdeploy.plan.make_plan", boom)
    res = CliRunner().invoke(_cli(), ["render", str(p), "--target", "all"])
    assert res.exit_code == 2, res.output
    assert "backbone source 'demo://smollm2-135m'" in res.output and "peftdeploy up" in res.output


def test_cli_refuses_what_the_plan_refuses(hub):
    path = str(RECIPES / "llama3-8b-multilora.yaml")
    res = CliRunner().invoke(_cli(), ["render", path, "--target", "kubernetes", "--gpu-memory", "8GiB"])
    assert res.exit_code == 2, res.output
    assert "8GiB GPU" in res.output and "peftdeploy plan" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(_cli(), ["render", path, "--target", "kubernetes", "--gpu-memory", "lots"])
    assert res.exit_code == 2 and "--gpu-memory" in res.output, res.output


def test_cli_offline_cache_miss(tmp_path: Path):
    with using({"HF_HUB_CACHE": str(tmp_path / "empty"), "PEFTDEPLOY_CACHE": str(tmp_path / "pd"),
                "HF_HUB_OFFLINE": "1"}):
        res = CliRunner().invoke(_cli(), ["render", str(RECIPES / "team-base.yaml"), "--target", "all"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "not in the hub cache" in res.output


def test_cli_stdout_and_out_dir(tmp_path: Path, hub):
    path = RECIPES / "qwen2.5-7b-merge-fp8.yaml"
    runner = CliRunner()
    res = runner.invoke(_cli(), ["render", str(path), "--target", "kubernetes", "--replicas", "2"])
    assert res.exit_code == 0, res.output
    parsed = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert {d["kind"] for d in parsed} == {"ConfigMap", "Deployment", "Service", "PersistentVolumeClaim"}
    assert "# Source: kubernetes/deployment.yaml" in res.stdout
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
    j = json.loads(res.stdout)
    assert j["ok"] and "ray-serve" in j["skipped"] and "kubernetes/deployment.yaml" in j["files"]


def test_lora_kernels_env_in_every_target(hub):
    """serving.lora_kernels reaches the server in every target (issue 15): the planned PEFTDEPLOY_LORA_KERNELS.
    A stock vLLM image has no peftdeploy plugin, so auto plans vLLM's kernels there; an image with the plugin
    on a verified vLLM (by its tag) gets peftdeploy's. Merge policy serves no LoRA: no such variable."""
    import re

    pat = re.compile(r"PEFTDEPLOY_LORA_KERNELS(?::|\n\s*value:)\s*'?(\w+)")
    path = str(RECIPES / "llama3-8b-multilora.yaml")
    for image, want in ((DEFAULT_VLLM_IMAGE, "vllm"), ("ghcr.io/acme/vllm-peftdeploy:v0.26.0", "peftdeploy")):
        res = CliRunner().invoke(_cli(), ["render", path, "--target", "all", "--json", "--store", STORE,
                                          "--image", image])
        assert res.exit_code == 0, res.output
        files = json.loads(res.stdout)["files"]
        targets = {k.split("/")[0] for k in files}
        assert targets == set(TARGETS), targets
        for t in TARGETS:
            found = [m for k, text in files.items() if k.startswith(t + "/") for m in pat.findall(text)]
            assert found and set(found) == {want}, (t, image, found)
    res = CliRunner().invoke(_cli(), ["render", str(RECIPES / "qwen2.5-7b-merge-fp8.yaml"), "--target", "all",
                                      "--json"])
    assert res.exit_code == 0 and "PEFTDEPLOY_LORA_KERNELS" not in res.stdout
