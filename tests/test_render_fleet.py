"""`render` of fleets (one engine per replica group) and of recipes that need the peftdeploy plugin in the
server (policy.catalog): image, PEFTDEPLOY_RECIPE + the mounted recipe, the HF cache PVC, and every feature
a target cannot carry reported (stderr warning, `skipped_features` in --json), never silent."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.test_render import (  # noqa: F401  (fixtures)
    GPU_MEMORY,
    HOST_MEMORY,
    RECIPES,
    STORE,
    _cli,
    _k8s_validate,
    caches,
    docs,
    hub,
)
from peftdeploy.render.base import DEFAULT_VLLM_IMAGE, PLUGIN_VLLM_IMAGE

MULTI = RECIPES / "llama3-8b-multilora.yaml"  # billing 0.5, refunds 0.2, shipping 0.15, tone-formal 0.05, base 0.1


def _recipe(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"apiVersion: peftdeploy/v1\nextends: {MULTI}\n" + body)
    return p


def _render(path: Path, *args: str) -> tuple[dict, str]:
    res = CliRunner().invoke(_cli(), ["render", str(path), "--gpu-memory", GPU_MEMORY, "--host-memory", HOST_MEMORY,
                                      "--json", *args])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    return out, res.stderr


def _container(files: dict, name: str) -> dict:
    dep = docs(files[name])[0]
    return dep["spec"]["template"]["spec"]["containers"][0], dep["spec"]["template"]["spec"]


# ------------------------------------------------------------------------ the plugin travels (catalog)
def test_catalog_render_carries_the_plugin(tmp_path: Path, hub):
    """Failed before: the stock image, no PEFTDEPLOY_RECIPE, catalog adapters would 404 — and no warning."""
    p = _recipe(tmp_path, "name: bots-catalog\npolicy: {catalog: ['hf://acme-ai/llama3-8b-{name}-lora']}\n")
    out, _ = _render(p, "--target", "kubernetes")
    assert out["image"] == PLUGIN_VLLM_IMAGE and out["skipped_features"] == []
    c, pod = _container(out["files"], "kubernetes/deployment.yaml")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["image"] == PLUGIN_VLLM_IMAGE
    assert env["PEFTDEPLOY_RECIPE"] == "/etc/peftdeploy/recipe.yaml"
    assert any(m["mountPath"] == "/etc/peftdeploy" and m["name"] == "recipe" for m in c["volumeMounts"])
    assert "peftdeploy.vllm_plugin.traffic.TrafficMiddleware" in c["args"]  # the counter travels too
    assert env["PEFTDEPLOY_MODEL_NAMES"].split(",")[0] == "bots-catalog"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["hf-cache"]["persistentVolumeClaim"]["claimName"] == "bots-catalog-hf-cache"
    pvc = docs(out["files"]["kubernetes/hf-cache-pvc.yaml"])[0]
    _k8s_validate(pvc)
    gi = int(pvc["spec"]["resources"]["requests"]["storage"].removesuffix("Gi"))
    assert 10 <= gi <= 40  # Llama-3-8B bf16 (~15 GiB) + adapters, 1.25×
    for name, text in out["files"].items():
        if name.endswith(".yaml"):
            for d in docs(text):
                _k8s_validate(d)


def test_stock_image_says_what_it_drops(tmp_path: Path, hub):
    p = _recipe(tmp_path, "name: bots-catalog\npolicy: {catalog: ['hf://acme-ai/llama3-8b-{name}-lora']}\n")
    out, _ = _render(p, "--target", "kubernetes", "--image", DEFAULT_VLLM_IMAGE)
    feats = {(f["target"], f["feature"]) for f in out["skipped_features"]}
    assert {("kubernetes", "policy.catalog"), ("kubernetes", "traffic counter"), ("kubernetes", "api-key guard")} == feats
    res = CliRunner().invoke(_cli(), ["render", str(p), "--target", "kubernetes", "--image", DEFAULT_VLLM_IMAGE,
                                      "--gpu-memory", GPU_MEMORY, "--host-memory", HOST_MEMORY])
    assert res.exit_code == 0 and "warning: kubernetes: policy.catalog not carried" in res.stderr
    c, _ = _container({"d": res.stdout.split("# Source: kubernetes/deployment.yaml\n")[1].split("---")[0]}, "d")
    assert "PEFTDEPLOY_RECIPE" not in {e["name"] for e in c["env"]}


# ------------------------------------------------------------------------------------------ fleets
@pytest.fixture
def fleet_recipe(tmp_path: Path) -> Path:
    # billing (70%) fills 2.1 of 3 engines: a merged group; the rest share a multi-LoRA engine
    return _recipe(tmp_path, "name: bots-fleet\npolicy:\n  mode: auto\n  traffic: {billing: 0.7, refunds: 0.1, "
                             "shipping: 0.1, tone-formal: 0.05, base: 0.05}\nfleet: {replicas: 3, max_replicas: 6}\n")


def test_fleet_renders_one_engine_per_group(fleet_recipe: Path, hub):
    jsonschema = pytest.importorskip("jsonschema")
    from peftdeploy.render.production_stack_schema import VALUES_SCHEMA

    out, err = _render(fleet_recipe, "--target", "all", "--store", STORE)
    f = out["fleet"]
    assert [(g["name"], g["kind"], g["replicas"]) for g in f["groups"]] == [
        ("bots-fleet-billing", "merged", 2), ("bots-fleet-lora", "lora", 1)]
    assert f["predicted"] > f["baseline"]
    files = out["files"]
    assert "skypilot" in out["skipped"] and "not rendered for skypilot" in out["skipped"]["skypilot"]["error"]

    # kubernetes: a Deployment + Service per group, valid; no model router: said, not silent
    for g in ("bots-fleet-billing", "bots-fleet-lora"):
        for n in ("configmap.yaml", "deployment.yaml", "service.yaml", "hf-cache-pvc.yaml"):
            for d in docs(files[f"kubernetes/{g}/{n}"]):
                _k8s_validate(d)
                assert d["metadata"]["name"].startswith(g)
    cm, _ = _container(files, "kubernetes/bots-fleet-billing/deployment.yaml")
    cl, pod_l = _container(files, "kubernetes/bots-fleet-lora/deployment.yaml")
    assert cm["args"][0] == "/models/merged" and cm["args"][cm["args"].index("--served-model-name") + 1] == "billing"
    assert "--enable-lora" not in cm["args"]
    assert cl["args"][cl["args"].index("--served-model-name") + 1] == "bots-fleet"
    lora_names = [a.split("=")[0] for a in cl["args"] if "=" in a and a.split("=")[0] in
                  ("billing", "refunds", "shipping", "tone-formal")]
    assert lora_names == ["refunds", "shipping", "tone-formal"]
    assert docs(files["kubernetes/bots-fleet-billing/deployment.yaml"])[0]["spec"]["replicas"] == 2
    assert "billing" in files["kubernetes/FLEET.txt"] and "no OpenAI router" in files["kubernetes/FLEET.txt"]
    feats = {(x["target"], x["feature"]) for x in out["skipped_features"]}
    assert ("kubernetes", "routing by model id") in feats and ("kserve", "routing by model id") in feats
    assert ("production-stack", "routing by model id") not in feats

    # production-stack: one modelSpec per group in one release, valid against the chart's schema
    values = yaml.safe_load(files["production-stack/values.yaml"])
    jsonschema.validate(values, VALUES_SCHEMA, cls=jsonschema.Draft202012Validator)
    specs = values["servingEngineSpec"]["modelSpec"]
    assert [s["name"] for s in specs] == ["bots-fleet-billing", "bots-fleet-lora"]
    assert [s["replicaCount"] for s in specs] == [2, 1]
    assert "--served-model-name=billing" in specs[0]["vllmConfig"]["extraArgs"]
    assert {a["adapterSource"]["adapterName"] for a in values["loraAdapters"]} == {"refunds", "shipping", "tone-formal"}
    for obj in values.get("extraObjects", []):
        _k8s_validate(obj)

    # kserve: one InferenceService per group
    for g in ("bots-fleet-billing", "bots-fleet-lora"):
        ds = docs(files[f"kserve/{g}/inference-service.yaml"])
        isvc = next(d for d in ds if d["kind"] == "InferenceService")
        assert isvc["metadata"]["name"] == g
        for d in ds:
            if d["kind"] != "InferenceService":
                _k8s_validate(d)

    # ray-serve: one app, one LLMConfig per group, autoscaling bounds per group
    cfg = yaml.safe_load(files["ray-serve/serve-config.yaml"])
    assert cfg["applications"][0]["name"] == "bots-fleet"
    llms = cfg["applications"][0]["args"]["llm_configs"]
    assert [c["model_loading_config"]["model_id"] for c in llms] == ["billing", "bots-fleet"]
    assert [c["deployment_config"]["autoscaling_config"] for c in llms] == [
        {"min_replicas": 2, "max_replicas": 6}, {"min_replicas": 1, "max_replicas": 6}]
    assert "lora_config" not in llms[0] and llms[1]["lora_config"]["dynamic_lora_loading_path"]
    assert "recipe-bots-fleet-billing.yaml" in {n.split("/", 1)[1] for n in files if n.startswith("ray-serve/")}
    assert '"$here/recipe-bots-fleet-billing.yaml"' in files["ray-serve/sync-to-store.sh"]


def test_fleet_render_deterministic(fleet_recipe: Path, hub):
    a, _ = _render(fleet_recipe, "--target", "all", "--store", STORE)
    b, _ = _render(fleet_recipe, "--target", "all", "--store", STORE)
    assert a["files"] == b["files"]


def test_plugin_image_dockerfile_matches_the_render_default():
    """docker/vllm-peftdeploy.Dockerfile builds what `render --image auto` names: the stock image render uses
    otherwise + `pip install` of this peftdeploy, tagged <vLLM tag>-peftdeploy<version> (not built here: no
    docker; the build command is the file's own)."""
    import tomllib

    text = (Path(__file__).resolve().parents[1] / "docker" / "vllm-peftdeploy.Dockerfile").read_text()
    assert f"ARG VLLM_IMAGE={DEFAULT_VLLM_IMAGE}\nFROM ${{VLLM_IMAGE}}" in text
    assert "pip install --no-cache-dir /tmp/peftdeploy" in text
    assert f"-t {PLUGIN_VLLM_IMAGE} ." in text
    version = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert PLUGIN_VLLM_IMAGE.endswith(f":{DEFAULT_VLLM_IMAGE.rsplit(':', 1)[1]}-peftdeploy{version}")
    assert "COPY pyproject.toml README.md /tmp/peftdeploy/\nCOPY peftdeploy /tmp/peftdeploy/peftdeploy\n" in text
