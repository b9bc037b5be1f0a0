"""Hostile and broken inputs (issue 16): every one is a clean error (exit 2, file and fix, no traceback)
from `plan` and from `merge`, and nothing non-finite reaches served or merged weights."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner

from hubcache import TINY_LLAMA, write_adapter, write_model
from peftdeploy.cli import main

pytest.importorskip("safetensors")


def _world(tmp: Path, mode: str = "merge", weight: str | None = None) -> Path:
    write_model(tmp / "m", TINY_LLAMA, weights=True)
    write_adapter(tmp / "a", TINY_LLAMA, r=8, base_model="org/tiny")
    extra = f", weight: {weight}" if weight is not None else ""
    p = tmp / "r.yaml"
    p.write_text("apiVersion: peftdeploy/v1\nname: t\nbackbone: {model: ./m}\n"
                 f"adapters:\n  - {{name: a, source: ./a{extra}}}\npolicy: {{mode: {mode}}}\n")
    return p


def _cli(*args: str) -> Any:
    res = CliRunner().invoke(main, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"traceback from {args}: {res.exception!r}\n{res.output}")
    return res


def _plan_or_merge_fails_cleanly(command: str, recipe: Path) -> Any:
    res = _cli(command, str(recipe), *(["--device", "cpu"] if command == "plan" else []))
    assert res.exit_code == 2, res.output
    return res


def _edit_config(tmp: Path, fn: Callable[[dict], Any]) -> None:
    p = tmp / "a" / "adapter_config.json"
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


def _set(key: str, value: Any) -> Callable[[dict], dict]:
    return lambda c: {**c, key: value}


BAD_CONFIGS = {
    "alpha-nan": (_set("lora_alpha", math.nan), "lora_alpha"),
    "alpha-inf": (_set("lora_alpha", math.inf), "lora_alpha"),
    "alpha-1e308": (_set("lora_alpha", 1e308), "lora_alpha"),
    "alpha-zero": (_set("lora_alpha", 0), "lora_alpha"),
    "alpha-negative": (_set("lora_alpha", -8), "lora_alpha"),
    "alpha-string": (_set("lora_alpha", "sixteen"), "lora_alpha"),
    "r-zero": (_set("r", 0), " r "),
    "r-negative": (_set("r", -8), " r "),
    "r-1e12": (_set("r", 10 ** 12), " r "),
    "r-string": (_set("r", "eight"), " r "),
    "r-float": (_set("r", 8.5), " r "),
    "alpha-pattern-nan": (_set("alpha_pattern", {"q_proj": math.nan}), "alpha_pattern"),
    "rank-pattern-zero": (_set("rank_pattern", {"q_proj": 0}), "rank_pattern"),
    "config-is-list": (lambda c: [c], "not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["plan", "merge"])
def test_bad_adapter_config_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
                                             command: str) -> None:
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "cache"))
    p = _world(tmp_path)
    fn, needle = BAD_CONFIGS[case]
    _edit_config(tmp_path, fn)
    res = _plan_or_merge_fails_cleanly(command, p)
    assert needle in res.output.replace("'r'", " r ").replace(": r is", ":  r is") and "adapter_config.json" in res.output
    assert "fix:" in res.output
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.parametrize("weight", ["1e308", "-1e308", ".nan", ".inf", "0"])
def test_recipe_weight_must_be_finite_and_bounded(tmp_path: Path, weight: str) -> None:
    p = _world(tmp_path, weight=weight)
    res = _cli("validate", str(p))
    assert res.exit_code == 2 and "adapters[0].weight" in res.output and "r.yaml:5" in res.output, res.output


@pytest.mark.parametrize("kernel", ["fused", "numpy"])
def test_merge_refuses_non_finite_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """Finite adapter values whose product overflows float32: the merge stops, nothing is left."""
    from safetensors.numpy import load_file, save_file

    from peftdeploy.errors import MergeError
    from peftdeploy.merge import AdapterInput, kernels, merge_model

    if kernel == "numpy":
        monkeypatch.setenv(kernels.KERNEL_ENV, "numpy")
    elif kernels.load() is None:
        pytest.skip("merge kernel extension not built")
    _world(tmp_path)
    st = tmp_path / "a" / "adapter_model.safetensors"
    t = {k: np.full(v.shape, 1e20, np.float32) for k, v in load_file(str(st)).items()}
    save_file(t, str(st))
    with pytest.raises(MergeError, match="NaN/inf"):
        merge_model(tmp_path / "m", [AdapterInput("a", tmp_path / "a", 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# safetensors headers: one validator for plan (inspect) and merge (shard_read)
# ------------------------------------------------------------------------------------------------
def _rewrite_header(st: Path, fn: Callable[[dict], Any], *, truncate: int = 0) -> None:
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    new = json.dumps(fn(hdr)).encode()
    new += b" " * (-len(new) % 8)
    data = raw[8 + n:]
    st.write_bytes(struct.pack("<Q", len(new)) + new + (data[:-truncate] if truncate else data))


def _first(h: dict) -> str:
    return sorted(k for k in h if k != "__metadata__")[0]


def _entry(key: str, value: Any) -> Callable[[dict], dict]:
    def fn(h: dict) -> dict:
        h[_first(h)][key] = value
        return h
    return fn


def _overlap(h: dict) -> dict:
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    same = [k for k in names if h[k]["shape"] == h[names[0]]["shape"]]
    h[same[1]]["data_offsets"] = list(h[same[0]]["data_offsets"])
    return h


def _out_of_range(h: dict) -> dict:
    k = _first(h)
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = [b + 10 ** 9, e + 10 ** 9]
    return h


BAD_HEADERS: dict[str, tuple[Callable[[dict], Any], int]] = {
    "header-list": (lambda h: [h], 0),
    "dtype-F99": (_entry("dtype", "F99"), 0),
    "dtype-I32": (_entry("dtype", "I32"), 0),
    "offsets-strings": (lambda h: _entry("data_offsets", [str(x) for x in h[_first(h)]["data_offsets"]])(h), 0),
    "offsets-floats": (lambda h: _entry("data_offsets", [float(x) for x in h[_first(h)]["data_offsets"]])(h), 0),
    "offsets-overlap": (_overlap, 0),
    "offsets-out-of-range": (_out_of_range, 0),
    "shape-string": (_entry("shape", "abc"), 0),
    "metadata-list": (lambda h: {**h, "__metadata__": ["pt"]}, 0),
    "truncated": (lambda h: h, 16),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
@pytest.mark.parametrize("command", ["plan", "merge"])
def test_bad_safetensors_header_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
                                                 command: str) -> None:
    monkeypatch.setenv("PEFTDEPLOY_CACHE", str(tmp_path / "cache"))
    p = _world(tmp_path)
    fn, cut = BAD_HEADERS[case]
    _rewrite_header(tmp_path / "a" / "adapter_model.safetensors", fn, truncate=cut)
    res = _plan_or_merge_fails_cleanly(command, p)
    assert "adapter_model.safetensors" in res.output and "fix:" in res.output, res.output


# ------------------------------------------------------------------------------------------------
# the merge / quantize cache verifies what it serves
# ------------------------------------------------------------------------------------------------
def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-64])


def _flip_keep_mtime(p: Path) -> None:
    st = p.stat()
    _flip(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


TAMPER = {
    "flip-shard": ("model.safetensors", _flip),
    "truncate-shard": ("model.safetensors", _truncate),
    "delete-shard": ("model.safetensors", lambda p: p.unlink()),
    "delete-config": ("config.json", lambda p: p.unlink()),
    "edit-config": ("config.json", lambda p: p.write_text(p.read_text().replace("4", "5", 1))),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_damaged_cache_entry_is_merged_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd, case: str) -> None:
    from peftdeploy.merge import AdapterInput, merge_cached

    _world(tmp_path)
    ads = [AdapterInput("a", tmp_path / "a", 1.0)]
    first = merge_cached(tmp_path / "m", ads, cache_root=tmp_path / "c", progress=False)
    good = {p.name: p.read_bytes() for p in first.path.iterdir() if p.is_file()}
    assert merge_cached(tmp_path / "m", ads, cache_root=tmp_path / "c", progress=False).cache_hit
    name, fn = TAMPER[case]
    fn(first.path / name)
    again = merge_cached(tmp_path / "m", ads, cache_root=tmp_path / "c", progress=False)
    assert not again.cache_hit and again.path == first.path
    assert "failed verification" in capfd.readouterr().err
    assert {p.name: p.read_bytes() for p in again.path.iterdir() if p.is_file()}.keys() == good.keys()
    assert (again.path / name).read_bytes() == good[name]


def test_tamper_with_mtime_kept_needs_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same size, same mtime: only the full check (merge --verify / PEFTDEPLOY_VERIFY_CACHE=1) sees it."""
    from peftdeploy.merge import AdapterInput, merge_cached

    _world(tmp_path)
    ads = [AdapterInput("a", tmp_path / "a", 1.0)]
    first = merge_cached(tmp_path / "m", ads, cache_root=tmp_path / "c", progress=False)
    _flip_keep_mtime(first.path / "model.safetensors")
    assert merge_cached(tmp_path / "m", ads, cache_root=tmp_path / "c", progress=False).cache_hit
    assert not merge_cached(tmp_path / "m", ads, cache_root=tmp_path / "c", progress=False, verify=True).cache_hit


def test_damaged_quantized_entry_is_rebuilt(tmp_path: Path) -> None:
    from peftdeploy.merge import AdapterInput, merge_cached
    from peftdeploy.quantize.cache import lookup_quantized, quantize_cached_result

    _world(tmp_path)
    merged = merge_cached(tmp_path / "m", [AdapterInput("a", tmp_path / "a", 1.0)], cache_root=tmp_path / "c",
                          progress=False).path
    q = quantize_cached_result(merged, "int8", cache_root=tmp_path / "q")
    assert lookup_quantized(merged, "int8", cache_root=tmp_path / "q") == q.path
    shard = next(q.path.glob("*.safetensors"))
    _flip(shard)
    assert lookup_quantized(merged, "int8", cache_root=tmp_path / "q") is None
    assert not quantize_cached_result(merged, "int8", cache_root=tmp_path / "q").cache_hit


def test_quantize_on_a_full_disk_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from peftdeploy.errors import MergeError
    from peftdeploy.merge import AdapterInput, merge_cached
    from peftdeploy.quantize import cache as qcache

    _world(tmp_path)
    merged = merge_cached(tmp_path / "m", [AdapterInput("a", tmp_path / "a", 1.0)], cache_root=tmp_path / "c",
                          progress=False).path
    real = qcache.quantize_model

    def full(src, out, *a, **kw):
        real(src, out, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qcache, "quantize_model", full)
    with pytest.raises(MergeError, match="filled up") as ei:
        qcache.quantize_cached_result(merged, "int8", cache_root=tmp_path / "q")
    assert ei.value.fix and not [p for p in (tmp_path / "q").iterdir() if not p.name.endswith(".lock")]


@pytest.mark.parametrize("explicit_output", [True, False])
def test_killed_merge_leftovers_are_removed(tmp_path: Path, explicit_output: bool) -> None:
    """A killed merge's .tmp-<key>-<pid> (another key: a previous recipe) goes with the next merge, with an
    explicit output dir too; a live process's is kept."""
    import subprocess
    import sys

    from peftdeploy.merge import AdapterInput, merge_cached

    _world(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = tmp_path / ("outs" if explicit_output else "c")
    parent.mkdir()
    stale = parent / f".tmp-{'ab' * 32}-{dead.pid}"
    live = parent / f".tmp-{'cd' * 32}-{os.getppid()}"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    merge_cached(tmp_path / "m", [AdapterInput("a", tmp_path / "a", 1.0)], cache_root=tmp_path / "c",
                 output=parent / "merged" if explicit_output else None, progress=False)
    assert not stale.exists()
    assert live.exists() or not explicit_output  # the cache root also frees tmp dirs whose key lock is free


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_plan_refuses_non_finite_adapter(tmp_path: Path, fill: float) -> None:
    """Served unmerged (mode serve), a NaN/inf adapter would reach vLLM as it is: plan refuses it."""
    from safetensors.numpy import load_file, save_file

    p = _world(tmp_path, mode="serve")
    st = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(str(st))
    save_file({k: (np.full(v.shape, fill, v.dtype) if "lora_B" in k else v) for k, v in t.items()}, str(st))
    res = _cli("plan", str(p), "--device", "cpu")
    assert res.exit_code == 2 and "non-finite" in res.output and "NaN/inf" in res.output, res.output


def test_shards_are_hashed_while_written_and_match_the_files(tmp_path: Path) -> None:
    """The merge hashes each shard from its staging buffers on the writer thread (O_DIRECT leaves no page
    cache to re-read): the digest equals the file's, the last block's padding excluded, whatever the
    block boundaries; the manifest keeps it and a full verify passes."""
    from peftdeploy.merge import manifest, shard_write

    rng = np.random.default_rng(0)
    payload = [rng.integers(0, 255, n, dtype=np.uint8) for n in (5000, 70_001, 12_345)]
    tensors = [shard_write.OutTensor(f"t{i}", "U8", (len(p),)) for i, p in enumerate(payload)]
    wq = shard_write.WriteQueue(8192, 3)
    d = tmp_path / "direct"
    d.mkdir()
    w = shard_write.ShardWriter(d / "s.safetensors", tensors, direct=True, queue=wq, hasher=manifest.stream_hasher())
    for t, p in zip(tensors, payload):
        w.write_bytes(t.name, memoryview(p))
    w.close()
    wq.close()
    if not w.direct:
        pytest.skip(f"{d}: the filesystem refuses O_DIRECT")
    got = w.digest()
    assert got == manifest.file_digest(d / "s.safetensors") and got.startswith("blake3:")
    m = manifest.build(d, skip="none", known={"s.safetensors": got})
    assert manifest.verify(d, m, full=True) is None
    # an entry written with SHA-256 digests (bare hex, or sha256:) still verifies, and a changed byte does not
    legacy = {k: [v[0], manifest.file_digest(d / k, "sha256").split(":", 1)[1], v[2]] for k, v in m.items()}
    assert manifest.verify(d, legacy, full=True) is None
    data = bytearray((d / "s.safetensors").read_bytes())
    data[-1] ^= 1
    (d / "s.safetensors").write_bytes(bytes(data))
    assert "changed (blake3" in manifest.verify(d, m, full=True)
