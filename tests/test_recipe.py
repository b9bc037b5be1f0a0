"""Recipe loading: the contract of shared/recipe-v1.md, errors with file:line, exit 2, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from peftdeploy.cli import main
from peftdeploy.errors import RecipeError
from peftdeploy.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
apiVersion: peftdeploy/v1
name: good
backbone:
  model: ./model
  dtype: bfloat16
adapters:
  - name: billing
    source: ./billing
policy:
  mode: serve
serving:
  port: 8000
"""

# (id, recipe text, line the error must name, substring the message must contain)
# Line numbers are 1-based and asserted exactly.
BAD: list[tuple[str, str, int, str]] = [
    ("unknown-top-key", GOOD + "colour: blue\n", 13, "unknown key 'colour'"),
    ("unknown-backbone-key", GOOD.replace("  dtype: bfloat16\n", "  dtyp: bfloat16\n"), 5, "did you mean 'dtype'"),
    ("unknown-adapter-key", GOOD.replace("    source: ./billing\n", "    source: ./billing\n    scale: 2\n"), 9, "unknown key 'scale'"),
    ("unknown-serving-key", GOOD + "  prot: 1\n", 13, "did you mean 'port'"),
    ("unknown-policy-key", GOOD.replace("  mode: serve\n", "  mode: serve\n  merged: true\n"), 11, "unknown key 'merged'"),
    ("missing-apiversion", GOOD.replace("apiVersion: peftdeploy/v1\n", ""), 1, "missing required key 'apiVersion'"),
    ("missing-name", GOOD.replace("name: good\n", ""), 1, "missing required key 'name'"),
    ("missing-backbone", "apiVersion: peftdeploy/v1\nname: x\n", 1, "missing required key 'backbone'"),
    ("missing-model", GOOD.replace("  model: ./model\n", ""), 3, "missing required key 'model'"),
    ("missing-adapter-source", GOOD.replace("    source: ./billing\n", ""), 7, "missing required key 'source'"),
    ("missing-adapter-name", GOOD.replace("  - name: billing\n    source", "  - source"), 7, "missing required key 'name'"),
    ("bad-apiversion", GOOD.replace("peftdeploy/v1", "peftdeploy/v2"), 1, "supported: peftdeploy/v1"),
    ("bad-apiversion-type", GOOD.replace("apiVersion: peftdeploy/v1", "apiVersion: 1"), 1, "apiVersion"),
    ("bad-name-upper", GOOD.replace("name: good", "name: Good"), 2, "name"),
    ("bad-name-underscore", GOOD.replace("name: good", "name: my_recipe"), 2, "name"),
    ("bad-adapter-name", GOOD.replace("name: billing", "name: Billing!"), 7, "adapters[0].name"),
    ("bad-adapter-name-slash", GOOD.replace("name: billing", "name: ../etc"), 7, "adapters[0].name"),
    ("duplicate-adapter-names", GOOD + "adapters_extra: 1\n" if False else GOOD.replace(
        "    source: ./billing\n", "    source: ./billing\n  - name: billing\n    source: ./b2\n"), 9, "duplicate adapter name"),
    ("bad-dtype", GOOD.replace("dtype: bfloat16", "dtype: fp16"), 5, "dtype"),
    ("bad-scheme", GOOD + "quantization:\n  scheme: int3\n", 14, "scheme"),
    ("bad-kv-dtype", GOOD + "quantization:\n  kv_cache_dtype: int8\n", 14, "kv_cache_dtype"),
    ("bad-mode", GOOD.replace("mode: serve", "mode: deploy"), 10, "mode"),
    ("port-string", GOOD.replace("port: 8000", "port: eighty"), 12, "serving.port"),
    ("port-range", GOOD.replace("port: 8000", "port: 70000"), 12, "less than or equal to 65535"),
    ("port-zero", GOOD.replace("port: 8000", "port: 0"), 12, "greater than or equal to 1"),
    ("gpu-util-range", GOOD + "  gpu_memory_utilization: 1.5\n", 13, "gpu_memory_utilization"),
    ("max-loras-zero", GOOD + "  max_loras: 0\n", 13, "max_loras"),
    ("max-loras-word", GOOD + "  max_loras: many\n", 13, "max_loras"),
    ("max-lora-rank-neg", GOOD + "  max_lora_rank: -8\n", 13, "max_lora_rank"),
    ("tp-zero", GOOD + "  tensor_parallel_size: 0\n", 13, "tensor_parallel_size"),
    ("cpu-loras-below-loras", GOOD + "  max_loras: 4\n  max_cpu_loras: 2\n", 14, "max_cpu_loras"),
    ("max-model-len-type", GOOD.replace("  dtype: bfloat16\n", "  max_model_len: long\n"), 5, "max_model_len"),
    ("trust-remote-code-type", GOOD.replace("  dtype: bfloat16\n", "  trust_remote_code: maybe\n"), 5, "trust_remote_code"),
    ("weight-type", GOOD.replace("    source: ./billing\n", "    source: ./billing\n    weight: heavy\n"), 9, "weight"),
    ("sha256-bad", GOOD.replace("    source: ./billing\n", "    source: ./billing\n    sha256: abc123\n"), 9, "sha256"),
    ("adapters-not-list", GOOD.replace("adapters:\n  - name: billing\n    source: ./billing\n", "adapters: billing\n"), 6, "adapters"),
    ("backbone-not-mapping", GOOD.replace("backbone:\n  model: ./model\n  dtype: bfloat16\n", "backbone: ./model\n"), 3, "backbone"),
    ("merge-unknown-adapter", GOOD.replace("  mode: serve\n", "  mode: merge\n  merge:\n    adapters: [billing, refunds]\n"), 12, "'refunds'"),
    ("merge-without-adapters", GOOD.replace("adapters:\n  - name: billing\n    source: ./billing\n", "").replace("mode: serve", "mode: merge"), 7, "at least one adapter"),
    ("merge-awq-without-base", GOOD.replace("mode: serve", "mode: merge") + "quantization:\n  scheme: awq\n", 10, "merge_base"),
    ("traffic-unknown", GOOD.replace("  mode: serve\n", "  mode: serve\n  traffic: {billing: 0.9, nobody: 0.1}\n"), 11, "unknown adapter 'nobody'"),
    ("traffic-negative", GOOD.replace("  mode: serve\n", "  mode: serve\n  traffic: {billing: -1}\n"), 11, "traffic"),
    ("extra-args-dash", GOOD + "  extra_args: {--enforce-eager: true}\n", 13, "extra_args"),
    ("bad-lora-kernels", GOOD + "  lora_kernels: triton\n", 13, "'auto', 'peftdeploy' or 'vllm'"),
    ("lora-kernels-type", GOOD + "  lora_kernels: [peftdeploy]\n", 13, "serving.lora_kernels"),
    ("literal-api-key", GOOD + "  api_key: sk-123456\n", 13, "environment"),
    ("unset-env", GOOD + "  api_key: ${PD_TEST_SURELY_UNSET}\n", 13, "PD_TEST_SURELY_UNSET"),
    ("secret-literal-default", GOOD + "  api_key: ${PD_TEST_KEY_UNSET:-changeme}\n", 13, "default written in the recipe"),
    ("unset-env-in-model", GOOD.replace("./model", "${PD_TEST_MODEL_UNSET}/m"), 4, "PD_TEST_MODEL_UNSET"),
    ("bad-env-syntax", GOOD.replace("./model", "${1BAD}"), 4, "bad variable reference"),
    ("invalid-yaml-indent", GOOD.replace("  dtype: bfloat16", " dtype: bfloat16"), 5, "invalid YAML"),
    ("invalid-yaml-tab", GOOD.replace("  dtype: bfloat16", "\tdtype: bfloat16"), 5, "invalid YAML"),
    ("invalid-yaml-unclosed", GOOD.replace("port: 8000", "port: [8000"), 12, "invalid YAML"),
    ("duplicate-key", GOOD + "name: other\n", 13, "duplicate key 'name'"),
    ("top-level-list", "- apiVersion: peftdeploy/v1\n- name: x\n", 1, "top level"),
    ("top-level-scalar", "just a string\n", 1, "top level"),
    ("empty-file", "", 1, "empty"),
    ("yaml-merge-key", GOOD + "base: &b {port: 1}\nserving2:\n  <<: *b\n", 15, "merge keys"),
]


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_recipe_loads(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD)
    loaded = load_recipe(p)
    r = loaded.recipe
    assert r.name == "good"
    assert r.backbone.model == str(tmp_path / "model")  # relative to the recipe file
    assert r.adapters[0].source == str(tmp_path / "billing")
    assert loaded.location("adapters", 0, "source").line == 8
    assert len(r.compute_hash()) == 64


def test_at_least_40_bad_cases() -> None:
    assert len(BAD) >= 40
    assert len({c[0] for c in BAD}) == len(BAD)


@pytest.mark.parametrize("case_id,text,line,needle", BAD, ids=[c[0] for c in BAD])
def test_bad_recipe_error_names_file_line_field(tmp_path: Path, case_id: str, text: str, line: int, needle: str) -> None:
    p = _write(tmp_path, text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PD_TEST_")}
    with pytest.raises(RecipeError) as ei:
        load_recipe(p, env=env)
    rendered = ei.value.render()
    first = getattr(ei.value, "errors", [ei.value])[0]
    assert first.location is not None and first.location.file is not None
    assert Path(first.location.file).resolve() == p.resolve()
    assert first.location.line == line, rendered
    assert needle in rendered, rendered
    # one or two lines per error, and never a traceback
    assert len(rendered.splitlines()) <= 2 * len(getattr(ei.value, "errors", [ei.value]))
    assert "Traceback" not in rendered


@pytest.mark.parametrize("case_id,text,line,needle", BAD[::7], ids=[c[0] for c in BAD[::7]])
def test_cli_validate_exit_2_no_traceback(tmp_path: Path, case_id: str, text: str, line: int, needle: str) -> None:
    p = _write(tmp_path, text)
    res = CliRunner().invoke(main, ["validate", str(p)])
    assert res.exit_code == 2
    out = res.output
    assert "Traceback" not in out
    assert f"recipe.yaml:{line}" in out, out


def test_lora_kernels_field(tmp_path: Path) -> None:
    assert load_recipe(_write(tmp_path, GOOD)).recipe.serving.lora_kernels == "auto"
    for v in ("peftdeploy", "vllm", "auto"):
        assert load_recipe(_write(tmp_path, GOOD + f"  lora_kernels: {v}\n")).recipe.serving.lora_kernels == v
    with pytest.raises(RecipeError) as ei:
        load_recipe(_write(tmp_path, GOOD + "  lora_kernels: Peftdeploy\n"))
    e = ei.value
    assert e.location.line == 13 and e.location.path == "serving.lora_kernels"
    assert e.fix == "use one of: 'auto', 'peftdeploy' or 'vllm'"
    # the default is not part of the recipe hash: existing recipes keep theirs
    h = load_recipe(_write(tmp_path, GOOD)).recipe.compute_hash()
    assert load_recipe(_write(tmp_path, GOOD + "  lora_kernels: auto\n")).recipe.compute_hash() == h
    schema = json.loads(CliRunner().invoke(main, ["schema"]).output)
    prop = schema["$defs"]["Serving"]["properties"]["lora_kernels"]
    assert prop["enum"] == ["auto", "peftdeploy", "vllm"] and prop["default"] == "auto" and prop["description"]


def test_fix_is_suggested_for_typo(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD.replace("  dtype: bfloat16\n", "  revison: abc\n"))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert ei.value.fix and "did you mean 'revision'" in ei.value.fix
    assert ei.value.location.path == "backbone.revison"
    assert ei.value.location.column == 3


# ---------------------------------------------------------------- extends
def test_extends_deep_merge_child_wins_lists_replace(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    _write(tmp_path / "base", textwrap.dedent("""\
        apiVersion: peftdeploy/v1
        name: base
        backbone:
          model: ./weights
          dtype: bfloat16
          max_model_len: 4096
        adapters:
          - name: a
            source: ./a
        serving:
          port: 9000
          max_loras: 2
        """), "base.yaml")
    child = _write(tmp_path, textwrap.dedent("""\
        extends: ./base/base.yaml
        name: child
        backbone:
          max_model_len: 8192
        adapters:
          - name: b
            source: ./b
        serving:
          port: 9100
        """), "child.yaml")
    loaded = load_recipe(child)
    r = loaded.recipe
    assert r.name == "child"
    assert r.backbone.dtype == "bfloat16" and r.backbone.max_model_len == 8192
    # relative paths resolve against the file that wrote them
    assert r.backbone.model == str(tmp_path / "base" / "weights")
    assert [a.name for a in r.adapters] == ["b"]  # lists replace
    assert r.adapters[0].source == str(tmp_path / "b")
    assert r.serving.port == 9100 and r.serving.max_loras == 2
    assert [f.name for f in loaded.files] == ["base.yaml", "child.yaml"]
    # positions point into the file that wrote the value
    assert Path(loaded.location("backbone", "dtype").file).name == "base.yaml"
    assert loaded.location("backbone", "dtype").line == 5


def test_extends_error_in_parent_points_into_parent(tmp_path: Path) -> None:
    _write(tmp_path, "apiVersion: peftdeploy/v1\nname: base\nbackbone:\n  model: ./m\n  dtype: fp9\n", "base.yaml")
    child = _write(tmp_path, "extends: base.yaml\nname: child\n", "child.yaml")
    with pytest.raises(RecipeError) as ei:
        load_recipe(child)
    assert Path(ei.value.location.file).name == "base.yaml"
    assert ei.value.location.line == 5


def test_extends_cycle(tmp_path: Path) -> None:
    _write(tmp_path, "extends: b.yaml\nname: a\n", "a.yaml")
    _write(tmp_path, "extends: c.yaml\nname: b\n", "b.yaml")
    _write(tmp_path, "extends: a.yaml\nname: c\n", "c.yaml")
    with pytest.raises(RecipeError) as ei:
        load_recipe(tmp_path / "a.yaml")
    assert "cycle" in ei.value.message
    assert ei.value.location.line == 1 and Path(ei.value.location.file).name == "c.yaml"


def test_extends_self(tmp_path: Path) -> None:
    p = _write(tmp_path, "extends: ./recipe.yaml\nname: a\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(p)


def test_extends_missing_parent(tmp_path: Path) -> None:
    p = _write(tmp_path, "name: a\nextends: ./nope.yaml\n")
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert "does not exist" in ei.value.message and ei.value.location.line == 2


def test_extends_not_a_string(tmp_path: Path) -> None:
    p = _write(tmp_path, "extends: [a, b]\nname: a\n")
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert ei.value.location.line == 1


def test_missing_file() -> None:
    res = CliRunner().invoke(main, ["validate", "/nonexistent/recipe.yaml"])
    assert res.exit_code == 2 and "not found" in res.output


# ---------------------------------------------------------------- env + secrets
def test_env_interpolation_and_default(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD.replace("port: 8000", "port: ${PD_PORT:-8123}").replace("./model", "${PD_MODELS}/llama"))
    r = load_recipe(p, env={"PD_MODELS": "/srv/models"}).recipe
    assert r.serving.port == 8123
    assert r.backbone.model == "/srv/models/llama"


SECRET = "sk-very-secret-value-4711"


def test_secret_never_shown(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD + "  api_key: ${PD_API_KEY}\n")
    env = {**os.environ, "PD_API_KEY": SECRET}
    loaded = load_recipe(p, env=env)
    assert loaded.recipe.serving.api_key.is_set
    assert loaded.recipe.serving.api_key.value.get_secret_value() == SECRET
    assert SECRET not in json.dumps(loaded.recipe.public_dict())
    assert SECRET not in repr(loaded.recipe)
    assert SECRET not in loaded.recipe.model_dump_json()
    assert loaded.recipe.public_dict()["serving"]["api_key"] == "${PD_API_KEY}"
    for args in (["validate", str(p), "--show"], ["validate", str(p), "--show", "--json"], ["validate", str(p)]):
        res = CliRunner().invoke(main, args, env={"PD_API_KEY": SECRET})
        assert res.exit_code == 0, res.output
        assert SECRET not in res.output
    res = CliRunner().invoke(main, ["validate", str(p), "--show"], env={"PD_API_KEY": SECRET})
    assert "${PD_API_KEY}" in res.output


def test_hash_ignores_secret_value(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD + "  api_key: ${PD_API_KEY}\n")
    h1 = load_recipe(p, env={"PD_API_KEY": "one"}).recipe.compute_hash()
    h2 = load_recipe(p, env={"PD_API_KEY": "two"}).recipe.compute_hash()
    assert h1 == h2


# ---------------------------------------------------------------- shipped recipes + schema
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_validate(path: Path) -> None:
    res = CliRunner().invoke(main, ["validate", str(path)])
    assert res.exit_code == 0, res.output


def test_schema_validates_shipped_recipes_and_rejects_bad() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    res = CliRunner().invoke(main, ["schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    assert len(SHIPPED) >= 4
    for path in SHIPPED:
        doc = yaml.safe_load(path.read_text())
        errs = list(v.iter_errors(doc))
        assert not errs, (path, [e.message for e in errs])
    assert list(v.iter_errors(yaml.safe_load(GOOD + "colour: blue\n")))
    # a recipe that extends a parent may leave nested required keys to it; one that doesn't may not
    partial = {"apiVersion": "peftdeploy/v1", "name": "x", "backbone": {"dtype": "bfloat16"}}
    assert list(v.iter_errors(partial))
    assert not list(v.iter_errors({**partial, "extends": "./base.yaml"}))
    assert list(v.iter_errors({**partial, "extends": "./base.yaml", "backbone": {"colour": 1}}))
    assert list(v.iter_errors(yaml.safe_load(GOOD.replace("mode: serve", "mode: deploy"))))


def test_committed_schema_file_is_current() -> None:
    res = CliRunner().invoke(main, ["schema"])
    committed = (ROOT / "peftdeploy" / "data" / "recipe.schema.json").read_text()
    assert json.loads(committed) == json.loads(res.output), "run: peftdeploy schema --out peftdeploy/data/recipe.schema.json"


def test_cli_fast_and_light() -> None:
    code = ("import sys, time; t=time.time(); from peftdeploy.cli import main\n"
            "from click.testing import CliRunner; CliRunner().invoke(main, ['--help'])\n"
            "assert 'torch' not in sys.modules and 'vllm' not in sys.modules, 'heavy import'\n"
            "print(time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 1.0


def test_version() -> None:
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and "0.1.0" in res.output


# ------------------------------------------------------------------------------------------------
# hostile files (issue 16, items 6 and 9): bounded, exit 2 in well under a second, no traceback
# ------------------------------------------------------------------------------------------------
def _bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for k in range(1, 9):
        lines.append(f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]")
    return GOOD + "\n".join(lines) + "\n"


HOSTILE = {
    "alias-bomb": (_bomb, "aliases"),
    "huge-file": (lambda: GOOD + "#" * (2 << 20) + "\n", "larger than 1 MiB"),
    "deep-nesting": (lambda: GOOD + "x: " + "[" * 500 + "]" * 500 + "\n", "nest"),
    "long-integer": (lambda: GOOD.replace("port: 8000", "port: " + "9" * 5001), "out of range"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_recipe_is_refused_fast(tmp_path: Path, case: str) -> None:
    import time

    make, needle = HOSTILE[case]
    p = _write(tmp_path, make())
    t = time.perf_counter()
    res = CliRunner().invoke(main, ["validate", str(p)])
    dt = time.perf_counter() - t
    assert isinstance(res.exception, SystemExit) and res.exit_code == 2, (res.exception, res.output[-2000:])
    assert needle in res.output and dt < 1.0, (dt, res.output[-500:])


def test_validate_dev_zero_is_bounded() -> None:
    res = CliRunner().invoke(main, ["validate", "/dev/zero"])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 2 and "larger than" in res.output


def test_nested_default(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD.replace("./model", "${PD_TEST_A:-${PD_TEST_B:-./fallback}}/m"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PD_TEST_")}
    assert load_recipe(p, env=env).recipe.backbone.model == str(tmp_path / "fallback" / "m")
    assert load_recipe(p, env={**env, "PD_TEST_B": "/b"}).recipe.backbone.model == "/b/m"
    assert load_recipe(p, env={**env, "PD_TEST_A": "/a"}).recipe.backbone.model == "/a/m"


@pytest.mark.parametrize("target,needle", [(".", "directory"), ("https://example.com/base.yaml", "not a URL"),
                                           ("/etc/passwd", "not a .yaml recipe")])
def test_extends_targets_are_named_precisely(tmp_path: Path, target: str, needle: str) -> None:
    p = _write(tmp_path, GOOD.replace("name: good\n", f"name: good\nextends: {target}\n"))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    text = ei.value.render()
    assert needle in text and "root:" not in text, text
