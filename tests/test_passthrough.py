"""`peftdeploy up RECIPE -- <vllm serve flags>` (issue 17): passed through after the planned flags, checked
against the installed vLLM's own parser (0.32 here; 0.26's sources from tests/vllm026.py), the frozen list only
as a fallback, every message naming the vLLM version it checked against."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftdeploy.errors import LaunchError
from peftdeploy.launch import passthrough as pt
from peftdeploy.plan.engine_args import MANAGED_ARGS

ROOT = Path(__file__).resolve().parents[1]


def test_frozen_fallback_names_its_version() -> None:
    t = pt.frozen_table()
    assert t.source == "frozen" and t.vllm_version == "0.32.0"
    assert pt.check(["--enable-prefix-caching", "--max-num-batched-tokens", "4096", "--seed=3"], managed=MANAGED_ARGS,
                    table=t) == ["--enable-prefix-caching", "--max-num-batched-tokens", "4096", "--seed=3"]
    with pytest.raises(LaunchError) as e:
        pt.check(["--enable-prefix-cachin"], managed=MANAGED_ARGS, table=t)
    assert "vLLM 0.32.0" in e.value.message and "frozen list" in e.value.message
    assert "--enable-prefix-caching" in e.value.fix
    with pytest.raises(LaunchError) as e:
        pt.check(["--max-loras", "4"], managed=MANAGED_ARGS, table=t)
    assert "planned by peftdeploy" in e.value.message and "serving.max_loras" in e.value.fix
    with pytest.raises(LaunchError, match="needs a value"):
        pt.check(["--max-num-batched-tokens"], managed=MANAGED_ARGS, table=t)
    with pytest.raises(LaunchError, match="not one of vLLM 0.32.0's choices"):
        pt.check(["--all2all-backend", "nope"], managed=MANAGED_ARGS, table=t)


def test_up_dry_run_appends_them_after_the_planned_flags(demo_recipe_tiny: Path, monkeypatch) -> None:
    from peftdeploy.commands.serve_cmds import up_cmd

    monkeypatch.setattr(pt, "option_table", pt.frozen_table)
    r = CliRunner().invoke(up_cmd, [str(demo_recipe_tiny), "--dry-run", "--device", "cpu", "--",
                                    "--enable-prefix-caching", "--max-num-batched-tokens", "4096"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("--enable-prefix-caching --max-num-batched-tokens 4096")
    r = CliRunner().invoke(up_cmd, [str(demo_recipe_tiny), "--dry-run", "--device", "cpu", "--", "--max-lora", "2"])
    assert r.exit_code == 2 and "not a `vllm serve` flag of vLLM 0.32.0" in r.output and "Traceback" not in r.output


@pytest.fixture()
def demo_recipe_tiny(tmp_path: Path) -> Path:
    from hubcache import TINY_LLAMA, write_adapter, write_model

    write_model(tmp_path / "base", TINY_LLAMA, weights=True)
    write_adapter(tmp_path / "ad", TINY_LLAMA, r=8, base_model=None)
    p = tmp_path / "r.yaml"
    p.write_text("apiVersion: peftdeploy/v1\nname: pt\nbackbone: {model: ./base}\n"
                 "adapters: [{name: a, source: ./ad}]\npolicy: {mode: serve}\n")
    return p


CHILD = r'''
import json, sys
if sys.argv[1] == "0.26":  # vLLM 0.26 finds no platform from its bare sources: the CPU one
    import vllm.platforms as P
    from vllm.platforms.cpu import CpuPlatform
    P._current_platform = CpuPlatform()
from peftdeploy.errors import LaunchError
from peftdeploy.launch import passthrough as pt
from peftdeploy.plan.engine_args import MANAGED_ARGS
t = pt.option_table()
out = {"source": t.source, "version": t.vllm_version}
for name, args in (("ok", ["--enable-prefix-caching", "--max-num-batched-tokens", "4096"]),
                   ("typo", ["--enable-prefix-cachin"]), ("bad-int", ["--max-num-batched-tokens", "lots"])):
    try:
        out[name] = pt.check(args, managed=MANAGED_ARGS, table=t)
    except LaunchError as e:
        out[name] = e.message
print("RESULT " + json.dumps(out))
'''


def _child(version: str, pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "VLLM_NO_USAGE_STATS": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD, version], env=env, capture_output=True, text=True, timeout=300)
    res = next((json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert res is not None, p.stdout[-2000:] + p.stderr[-4000:]
    return res


@pytest.mark.slow  # imports vLLM (~20 s)
def test_installed_vllm_parser_is_used() -> None:
    pytest.importorskip("vllm")
    res = _child("0.32", str(ROOT))
    assert res["source"] == "installed" and res["version"].startswith("0.32"), res
    assert res["ok"] == ["--enable-prefix-caching", "--max-num-batched-tokens", "4096"]
    assert "the installed vLLM 0.32" in res["typo"] and "`vllm serve` parser" in res["typo"]
    # the installed parser's own type refuses the value (the frozen list knows no types)
    assert "--max-num-batched-tokens lots" in res["bad-int"] and "installed vLLM 0.32" in res["bad-int"]


@pytest.mark.slow  # imports vLLM 0.26's sources (~25 s)
def test_vllm_026_parser_names_026() -> None:
    from tests import vllm026

    tree = vllm026.tree()
    if tree is None:
        pytest.skip(f"no vLLM 0.26 site in {vllm026.GPU}")
    res = _child("0.26", f"{tree}{os.pathsep}{ROOT}")
    assert res["source"] == "installed" and res["version"] == "0.26.0", res
    assert "the installed vLLM 0.26.0's `vllm serve` parser" in res["typo"]
    assert res["ok"] == ["--enable-prefix-caching", "--max-num-batched-tokens", "4096"]
