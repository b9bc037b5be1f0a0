"""The vLLM plugin's resolver, cache and registration — fast (no vLLM server, no torch models).

S3 runs against moto's S3 server (started here, port 18391); the hub runs offline from a
huggingface_hub cache filled by the test. The backbone is a tiny Llama config with zero weights.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from peftdeploy.recipe import load_recipe
from peftdeploy.vllm_plugin.cache import AdapterCache
from peftdeploy.vllm_plugin.resolver import (
    AdapterNotFound,
    AdapterRefused,
    CatalogResolver,
    InvalidAdapterName,
    validate_name,
)
from tests.hubcache import TINY_LLAMA, prefill_repo, write_adapter, write_model

BASE = {**TINY_LLAMA, "_name_or_path": "acme/tiny-llama"}
OTHER = {**TINY_LLAMA, "hidden_size": 96, "intermediate_size": 192, "_name_or_path": "other/model"}
MOTO_PORT = 18391


def _sha(p: Path) -> str:
    return hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).hexdigest()


def _recipe(tmp: Path, adapters: list[dict], catalog: list[str] = (), max_lora_rank: int | str = 16) -> Path:
    import yaml

    doc = {"apiVersion": "peftdeploy/v1", "name": "plugin-test",
           "backbone": {"model": "./base"},
           "adapters": adapters,
           "policy": {"mode": "serve", "dynamic_loading": True, "catalog": list(catalog)},
           "serving": {"max_lora_rank": max_lora_rank}}
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "pdcache"))
    write_model(tmp_path / "base", BASE, weights=True)
    ads = tmp_path / "ads"
    write_adapter(ads / "good", BASE, r=8, base_model="acme/tiny-llama")
    write_adapter(ads / "big", BASE, r=64, base_model="acme/tiny-llama")
    write_adapter(ads / "dora", BASE, r=8, base_model="acme/tiny-llama", use_dora=True)
    write_adapter(ads / "wrongbase", OTHER, r=8, base_model="other/model")
    write_adapter(ads / "pickled", BASE, r=8, base_model="acme/tiny-llama", pickle=True)
    write_adapter(tmp_path / "catalog" / "extra", BASE, r=4, base_model="acme/tiny-llama")
    (tmp_path / "catalog" / "notanadapter").mkdir()
    adapters = [{"name": n, "source": f"./ads/{n}"} for n in ("good", "big", "dora", "wrongbase", "pickled")]
    adapters.append({"name": "pinned", "source": "./ads/good", "sha256": _sha(ads / "good")})
    adapters.append({"name": "badsha", "source": "./ads/good", "sha256": "0" * 64})
    loaded = load_recipe(_recipe(tmp_path, adapters, catalog=["./catalog"]))
    core = CatalogResolver(loaded, cache=AdapterCache(tmp_path / "cache"), model_path=str(tmp_path / "base"),
                           negative_ttl=0)
    return tmp_path, core


# -- names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["good", "a", "billing-v2", "x.y_z-1", "0" * 128])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["../etc/passwd", "..", "a/b", "/abs", "a..b", "Upper", "", ".hidden", "-x",
                                  "x" * 129, "good\n", "a b", "a\\b", "%2e%2e", "hf://x/y", "~root"])
def test_invalid_names_are_unknown(name, world):
    with pytest.raises(InvalidAdapterName) as ei:
        validate_name(name)
    assert ei.value.status == 404 and "not a valid adapter name" in ei.value.message
    _tmp, core = world
    with pytest.raises(AdapterNotFound):
        core.resolve(name)


def test_traversal_cannot_escape_catalog_dir(world):
    tmp, core = world
    # a real adapter directory one level above the catalog dir is not reachable by name
    with pytest.raises(AdapterNotFound):
        core.resolve("../ads/good")


# -- recipe + catalog ------------------------------------------------------------------------------
def test_resolves_recipe_adapter_in_place(world):
    tmp, core = world
    res = core.resolve("good")
    assert res.path == (tmp / "ads" / "good").resolve() and res.rank == 8 and res.cache_key is None
    assert res.origin == "adapters[0]"
    assert core.resolve("pinned").path == res.path  # sha256 verified


def test_resolves_from_local_catalog_dir(world):
    tmp, core = world
    res = core.resolve("extra")
    assert res.path == (tmp / "catalog" / "extra").resolve() and res.origin == "catalog[0]"


def test_unknown_is_404_with_names(world):
    _tmp, core = world
    for name in ("nope", "notanadapter"):
        with pytest.raises(AdapterNotFound) as ei:
            core.resolve(name)
        assert ei.value.status == 404
        assert f"`{name}` does not exist" in ei.value.message and "good" in ei.value.message


@pytest.mark.parametrize("name,code,words", [
    ("big", "rank-exceeds-max", ["rank 64", "max_lora_rank 16"]),
    ("dora", "dora", ["DoRA"]),
    ("wrongbase", "shape-mismatch", ["does not fit the backbone"]),
    ("pickled", "adapter-source-refused", ["pickle"]),
    ("badsha", "adapter-source-refused", ["sha256"]),
])
def test_incompatible_refused_with_reason(world, name, code, words):
    _tmp, core = world
    with pytest.raises(AdapterRefused) as ei:
        core.resolve(name)
    e = ei.value
    assert e.status == 422 and e.code == code, e.message
    for w in words:
        assert w in e.client_message()
    assert e.fix


def test_rank_limit_is_the_servers(world):
    _tmp, core = world
    assert core.resolve("big", max_lora_rank=64).rank == 64  # a server started with --max-lora-rank 64
    with pytest.raises(AdapterRefused):
        core.resolve("good", max_lora_rank=4)


def test_refusals_are_remembered_briefly(world):
    _tmp, core = world
    core.negative_ttl = 60
    with pytest.raises(AdapterRefused) as first:
        core.resolve("dora")
    with pytest.raises(AdapterRefused) as second:
        core.resolve("dora")
    assert second.value is first.value


# -- cache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill,config", [(np.nan, {}), (np.inf, {}), (0.0, {"lora_alpha": float("nan")}),
                                         (0.0, {"lora_alpha": 0})])
def test_non_finite_adapter_refused(world, fill, config):
    """A lora_B of NaN/inf (or a NaN / zero lora_alpha) is refused with 422 before vLLM loads it (issue 16):
    loaded, it turned every answer of its batch into ''."""
    from safetensors.numpy import load_file, save_file

    tmp, core = world
    d = write_adapter(tmp / "catalog" / "poison", BASE, r=8, base_model="acme/tiny-llama", **config)
    st = d / "adapter_model.safetensors"
    t = load_file(str(st))
    save_file({k: (np.full(v.shape, fill, v.dtype) if "lora_B" in k else v) for k, v in t.items()}, str(st))
    with pytest.raises(AdapterRefused) as ei:
        core.resolve("poison")
    assert ei.value.status == 422
    assert ("NaN/inf" in ei.value.message) or ("lora_alpha" in ei.value.message), ei.value.message


def _fill(size: int, counter: list[int] | None = None, delay: float = 0.0):
    def fill(d: Path) -> None:
        if counter is not None:
            counter.append(1)
        time.sleep(delay)
        (d / "adapter_model.safetensors").write_bytes(b"x" * size)
        (d / "adapter_config.json").write_text("{}")
    return fill


def test_cache_lru_and_size_bound(tmp_path):
    c = AdapterCache(tmp_path / "c", max_bytes=3500)
    for k in ("a", "b", "c"):
        c.get_or_create(k, _fill(1000))
        time.sleep(0.02)
    assert {e.key for e in c.entries()} == {"a", "b", "c"}
    os.utime(c.path("a") / ".peftdeploy-cache.json")  # "a" used most recently
    c.get("a")
    time.sleep(0.02)
    c.get_or_create("d", _fill(1000))  # 4 x ~1002 > 3500: evict the least recently used ("b")
    keys = {e.key for e in c.entries()}
    assert keys == {"a", "c", "d"}, keys
    assert c.total_bytes() <= 3500 and c.stats["evictions"] == 1
    assert not c.path("b").exists()
    # pinned entries are never evicted (a running vLLM server holds their path)
    c.pin("c")
    c.get_or_create("e", _fill(1000))
    keys = {e.key for e in c.entries()}
    assert "c" in keys and "e" in keys and "a" not in keys, keys
    c.unpin("c")
    assert not c.is_pinned("c")


def test_cache_pin_of_dead_process_is_ignored(tmp_path):
    c = AdapterCache(tmp_path / "c", max_bytes=1500)
    c.get_or_create("old", _fill(1000))
    (c.path("old") / ".pins").mkdir()
    (c.path("old") / ".pins" / "999999999").touch()  # no such pid
    assert not c.is_pinned("old")
    c.get_or_create("new", _fill(1000))
    assert [e.key for e in c.entries()] == ["new"]


def test_cache_concurrent_fill_once(tmp_path):
    c = AdapterCache(tmp_path / "c")
    calls: list[int] = []
    out: list[Path] = []
    threads = [threading.Thread(target=lambda: out.append(c.get_or_create("k", _fill(10, calls, 0.3))))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(out)) == 1 and len(out) == 8


def test_cache_failed_fill_leaves_nothing(tmp_path):
    c = AdapterCache(tmp_path / "c")

    def bad(d: Path) -> None:
        (d / "half").write_text("x")
        raise RuntimeError("network down")

    with pytest.raises(RuntimeError):
        c.get_or_create("k", bad)
    assert c.entries() == [] and not [p for p in c.root.iterdir() if p.name.startswith(".tmp")]


# -- hub (offline, pre-filled huggingface_hub cache) ---------------------------------------------
@pytest.fixture()
def hub(world, monkeypatch: pytest.MonkeyPatch):
    tmp, _core = world
    hub_cache = tmp / "hub"
    src = write_adapter(tmp / "hubsrc" / "support", BASE, r=8, base_model="acme/tiny-llama")
    prefill_repo(hub_cache, "acme/support-lora", src)
    big = write_adapter(tmp / "hubsrc" / "huge", BASE, r=32, base_model="acme/tiny-llama")
    prefill_repo(hub_cache, "acme/huge-lora", big)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapters = [{"name": "pinned-hub", "source": "hf://acme/support-lora", "sha256": _sha(src)},
                {"name": "badsha-hub", "source": "hf://acme/support-lora", "sha256": "1" * 64}]
    loaded = load_recipe(_recipe(tmp, adapters, catalog=["hf://acme/{name}-lora"]))
    core = CatalogResolver(loaded, cache=AdapterCache(tmp / "cache", max_bytes=10 << 20),
                           model_path=str(tmp / "base"), negative_ttl=0)
    return tmp, core, src


def test_hub_offline_catalog_pattern(hub):
    tmp, core, src = hub
    res = core.resolve("support")
    assert res.origin == "catalog[0]" and res.cache_key and res.path.parent == tmp / "cache"
    assert _sha(res.path) == _sha(src) and (res.path / "adapter_config.json").is_file()
    assert core.resolve("pinned-hub").path.is_dir()
    with pytest.raises(AdapterRefused, match="sha256"):
        core.resolve("badsha-hub")
    with pytest.raises(AdapterRefused, match="rank-exceeds-max"):
        core.resolve("huge")
    with pytest.raises(AdapterNotFound):
        core.resolve("absent")  # acme/absent-lora is not in the cache (offline): unknown


def test_hub_concurrent_first_requests_fetch_once(hub, monkeypatch):
    _tmp, core, _src = hub
    import peftdeploy.sources as sources

    real = sources.resolve_adapter_source
    calls: list[str] = []

    def slow(*a, **kw):
        calls.append(a[0])
        time.sleep(0.3)
        return real(*a, **kw)

    monkeypatch.setattr(sources, "resolve_adapter_source", slow)
    results: list = []
    errors: list = []

    def go():
        try:
            results.append(core.resolve("support"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8 and len({r.path for r in results}) == 1
    assert calls == ["hf://acme/support-lora"]


# -- S3 (moto server) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_s3_source_and_catalog(world, moto_s3):
    import boto3
    import fsspec

    fsspec.config.conf.pop("s3", None)
    tmp, _ = world
    s3 = boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="loras")
    src = write_adapter(tmp / "s3src" / "tone", BASE, r=8, base_model="acme/tiny-llama")
    dora = write_adapter(tmp / "s3src" / "shiny", BASE, r=8, base_model="acme/tiny-llama", use_dora=True)
    for d in (src, dora):
        for f in d.iterdir():
            s3.upload_file(str(f), "loras", f"team/{d.name}/{f.name}")
    adapters = [{"name": "tone-pinned", "source": "s3://loras/team/tone", "sha256": _sha(src)},
                {"name": "tone-badsha", "source": "s3://loras/team/tone", "sha256": "2" * 64}]
    loaded = load_recipe(_recipe(tmp, adapters, catalog=["s3://loras/team/"]))
    cache = AdapterCache(tmp / "s3cache", max_bytes=10 << 20)
    core = CatalogResolver(loaded, cache=cache, model_path=str(tmp / "base"), negative_ttl=0)
    fsspec.filesystem("s3", skip_instance_cache=True)  # fresh client for this endpoint

    res = core.resolve("tone-pinned", pin=True)
    assert res.cache_key and _sha(res.path) == _sha(src)
    assert cache.is_pinned(res.cache_key)
    # the s3 staging copy of sources.py is gone: the bounded cache holds the only copy
    assert not (tmp / "pdcache" / "s3" / "loras" / "team" / "tone").exists()
    with pytest.raises(AdapterRefused) as ei:
        core.resolve("tone-badsha")
    assert "sha256" in ei.value.message and ei.value.status == 422
    assert [e.key for e in cache.entries()] == [res.cache_key]  # nothing cached for the refused one
    assert core.resolve("tone").origin == "catalog[0]"  # from the s3 prefix
    with pytest.raises(AdapterRefused, match="DoRA"):
        core.resolve("shiny")
    with pytest.raises(AdapterNotFound):
        core.resolve("missing")


# -- vLLM side ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_mod():
    from peftdeploy.vllm_compat import ensure_vllm_cpu_compat

    if ensure_vllm_cpu_compat() == "absent":
        pytest.skip("vLLM is not installed")
    import vllm.lora.resolver  # noqa: F401

    return vllm


def test_exceptions_map_to_client_statuses(world, vllm_mod):
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    from peftdeploy.vllm_plugin.resolver import FetchFailed, LoRANotEnabled, to_vllm_exception

    _tmp, core = world
    got = {}
    for name in ("nope", "../x", "dora"):
        try:
            core.resolve(name)
        except Exception as e:  # noqa: BLE001
            got[name] = create_error_response(to_vllm_exception(e))
    assert got["nope"].error.code == 404 and "does not exist" in got["nope"].error.message
    assert got["../x"].error.code == 404
    assert got["dora"].error.code == 422 and "DoRA" in got["dora"].error.message
    assert create_error_response(to_vllm_exception(LoRANotEnabled("x"))).error.code == 400
    assert create_error_response(to_vllm_exception(FetchFailed("x"))).error.code == 503


def test_vllm_resolver_returns_lora_request_or_raises(world, vllm_mod):
    from vllm.exceptions import VLLMNotFoundError, VLLMUnprocessableEntityError

    from peftdeploy.vllm_plugin.resolver import make_vllm_resolver

    tmp, core = world
    r = make_vllm_resolver(core, registered_name="peftdeploy-test")
    req = asyncio.run(r.resolve_lora(str(tmp / "base"), "good"))
    assert req.lora_name == "good" and Path(req.lora_path) == (tmp / "ads" / "good").resolve()
    assert req.lora_int_id > 0
    with pytest.raises(VLLMNotFoundError):
        asyncio.run(r.resolve_lora(str(tmp / "base"), "nope"))
    with pytest.raises(VLLMUnprocessableEntityError, match="rank 64"):
        asyncio.run(r.resolve_lora(str(tmp / "base"), "big"))


def test_register_is_safe_and_idempotent(world, vllm_mod, monkeypatch, caplog):
    from vllm.lora.resolver import LoRAResolverRegistry

    import peftdeploy.vllm_plugin as plugin

    tmp, _core = world
    reg = LoRAResolverRegistry.resolvers
    saved = dict(reg)
    state = dict(plugin._state)
    try:
        reg.pop("peftdeploy", None)
        # unset: a no-op
        monkeypatch.delenv("PEFTDEPLOY_RECIPE", raising=False)
        plugin._state.update(registered=False)
        plugin.register()
        assert "peftdeploy" not in reg
        # a broken recipe: logged, nothing registered, no exception
        bad = tmp / "bad.yaml"
        bad.write_text("apiVersion: peftdeploy/v1\nname: BAD NAME\nbackbone: {model: ./base}\n")
        monkeypatch.setenv("PEFTDEPLOY_RECIPE", str(bad))
        plugin._state.update(registered=False)
        plugin.register()
        assert "peftdeploy" not in reg
        # a good one: registered once, however often vLLM calls register()
        monkeypatch.setenv("PEFTDEPLOY_RECIPE", str(tmp / "recipe.yaml"))
        plugin._state.update(registered=False)
        plugin.register()
        first = reg["peftdeploy"]
        plugin.register()
        assert reg["peftdeploy"] is first
        # dynamic_loading: false registers nothing
        reg.pop("peftdeploy")
        off = tmp / "off.yaml"
        off.write_text((tmp / "recipe.yaml").read_text().replace("dynamic_loading: true", "dynamic_loading: false"))
        monkeypatch.setenv("PEFTDEPLOY_RECIPE", str(off))
        plugin._state.update(registered=False)
        plugin.register()
        assert "peftdeploy" not in reg
    finally:
        reg.clear()
        reg.update(saved)
        plugin._state.clear()
        plugin._state.update(state)


def test_cpu_fix_base_tokens_get_no_adapter() -> None:
    """vLLM's CPU shrink op gathers weights[-1] (the last slot) for no-adapter tokens; the fix zeroes them."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from peftdeploy.vllm_compat import ensure_vllm_cpu_compat
        ensure_vllm_cpu_compat()
        import vllm.lora.ops.torch_ops.lora_ops as ops
        x = torch.randn(4, 8); A = torch.randn(2, 1, 3, 8); y = torch.zeros(4, 3)
        idx = torch.tensor([0, -1, 1, -1])
        ops.bgmv_shrink(x, A, y, idx, 1.0)
        assert y[1].abs().sum() > 0, "vLLM fixed the -1 gather upstream: drop cpu_fix"
        from peftdeploy.vllm_plugin import cpu_fix
        assert cpu_fix.apply() and cpu_fix.apply()  # idempotent
        ref = torch.einsum("bi,boi->bo", x, A[idx.clamp(min=0)].squeeze(1))
        y.zero_(); ops.bgmv_shrink(x, A, y, idx, 1.0)
        assert torch.equal(y[1], torch.zeros(3)) and torch.equal(y[3], torch.zeros(3))
        assert torch.allclose(y[0], ref[0]) and torch.allclose(y[2], ref[2])
        y.zero_(); ops.sgmv_shrink(x, A, y, None, torch.tensor([1, 1, 1, 1]), idx, 4, 1, 4, 1.0)
        assert torch.equal(y[1], torch.zeros(3)) and torch.allclose(y[2], ref[2])
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_eviction_log_counts_real_evictions_only():
    """The plugin's INFO lines about vLLM's LoRA caches, driven by vLLM's own AdapterLRUCache: a full CPU cache
    and a full set of slots are evictions; vLLM clearing its warm-up dummy adapters at every start
    (remove_all_adapters), an explicit unload (remove_adapter) and a slot freed because its adapter left the
    CPU cache are not (lease 8's 64-adapter run logged 96 "evictions" at start-up, none of them real)."""
    import logging

    pytest.importorskip("vllm")
    from vllm.lora.model_manager import AdapterLRUCache

    from peftdeploy.vllm_plugin import _EvictionLog

    handler = _EvictionLog()
    lg = logging.getLogger("vllm.lora.model_manager")
    old_level = lg.level
    lg.setLevel(logging.DEBUG)
    lg.addHandler(handler)
    try:
        active = AdapterLRUCache(2, lambda k: None)
        active.deactivate_fn.__name__ = "_deactivate_adapter"

        def deactivate_adapter(k):
            if k in active:
                active.pop(k)

        cpu = AdapterLRUCache(3, deactivate_adapter)

        def activate_adapter(k):  # vLLM's LRUCacheLoRAModelManager.activate_adapter on full slots
            if k not in active and len(active) >= 2:
                active.remove_oldest()
            active[k] = k

        def remove_oldest_adapter():  # the worker making room in a full CPU cache
            cpu.remove_oldest()

        def remove_adapter(k):  # an explicit unload
            deactivate_adapter(k)
            cpu.pop(k, None)

        def remove_all_adapters():  # after the warm-up's dummy adapters, at every start
            cpu.clear()
            active.clear()

        for k in (1, 2):
            cpu[k] = k
            activate_adapter(k)
        remove_all_adapters()
        assert handler.counts == {"cpu": 0, "gpu": 0}
        for k in (1, 2, 3):
            cpu[k] = k
            activate_adapter(k)  # 3: slot pressure, 1 leaves the slots
        assert handler.counts == {"cpu": 0, "gpu": 1}
        remove_oldest_adapter()  # 1 leaves the CPU cache (not active any more)
        remove_oldest_adapter()  # 2 leaves the CPU cache and, with it, its slot: one eviction, not two
        assert handler.counts == {"cpu": 2, "gpu": 1}
        remove_adapter(3)
        assert handler.counts == {"cpu": 2, "gpu": 1}
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old_level)
