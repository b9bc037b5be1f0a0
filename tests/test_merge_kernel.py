"""The compiled fused merge kernel (peftdeploy/merge/_kernels.c) against its numpy reference.

The kernel does the same IEEE float32 operations in the same order as kernels.reference, without
fused multiply-adds, so the comparisons are bit for bit: for every dtype pair, shapes that leave
vector tiles incomplete (rows not a multiple of 4, columns not a multiple of 32), several terms of
different ranks, NaN/inf/overflow, and ranges cut anywhere (a tensor split across staging buffers
or threads must give the same bytes as in one piece).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from peftdeploy.merge import kernels

PAIRS = [(s, o) for s in ("BF16", "F16", "F32") for o in ("BF16", "F16", "F32")]


@pytest.fixture(scope="module")
def kern():
    if os.environ.get(kernels.KERNEL_ENV, "").lower() == "numpy":
        pytest.skip(f"{kernels.KERNEL_ENV}=numpy")
    k = kernels.load()
    # scripts/setup.sh builds the extension (pip install -e .): a missing kernel here is a build problem
    assert k is not None, "the merge kernel extension is not built or fails its self-test (pip install -e .)"
    return k


def storage(code: str, x: np.ndarray) -> np.ndarray:
    return kernels._from_f32(code, np.asarray(x, np.float32))


def make(rng, rows, cols, sc, ranks, scale=0.02):
    W = storage(sc, rng.standard_normal((rows, cols)) * scale)
    terms = [(rng.standard_normal((rows, r)).astype(np.float32) * 0.1,
              rng.standard_normal((r, cols)).astype(np.float32) * 0.1, float(c))
             for r, c in zip(ranks, (2.0, -0.75, 0.5, 1.25))]
    return W, terms


def run_span(kern, W, sc, oc, terms, cuts=()):
    rows, cols = W.shape
    f = kernels.Factors(terms, rows, cols)
    out = np.zeros(rows * cols, kernels._from_f32(oc, np.zeros(1, np.float32)).dtype)
    bounds = [0, *cuts, rows * cols]
    flat = W.reshape(-1)
    for a, b in zip(bounds, bounds[1:]):
        kern.merge_span(flat[a:], sc, out[a:], oc, f, a, b)
    return out.reshape(rows, cols)


@pytest.mark.parametrize("sc,oc", PAIRS)
@pytest.mark.parametrize("rows,cols,ranks", [(13, 70, (3,)), (4, 32, (16,)), (1, 5, (1,)), (9, 1, (2,)),
                                             (6, 100, (4, 7, 1)), (33, 64, (8, 16))])
def test_kernel_equals_reference_bit_for_bit(kern, sc, oc, rows, cols, ranks):
    if not kern.supports(sc, oc):
        pytest.skip(f"{sc}->{oc} not built (no _Float16 in this compiler)")
    rng = np.random.default_rng(rows * 1000 + cols)
    W, terms = make(rng, rows, cols, sc, ranks)
    want = kernels.reference(W, sc, oc, terms)
    got = run_span(kern, W, sc, oc, terms)
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("sc,oc", [("BF16", "BF16"), ("F32", "F32"), ("F16", "F16"), ("F32", "BF16")])
def test_ranges_cut_anywhere_give_the_same_bytes(kern, sc, oc):
    rng = np.random.default_rng(7)
    rows, cols = 37, 101
    W, terms = make(rng, rows, cols, sc, (5, 3))
    whole = run_span(kern, W, sc, oc, terms)
    n = rows * cols
    for cuts in ([1], [cols], [cols - 1, cols + 1], sorted(rng.choice(n - 1, 40, replace=False) + 1),
                 list(range(7, n, 97))):
        assert run_span(kern, W, sc, oc, terms, cuts).tobytes() == whole.tobytes(), cuts


def test_special_values(kern):
    rng = np.random.default_rng(3)
    rows, cols = 8, 48
    Wf = rng.standard_normal((rows, cols)).astype(np.float32)
    Wf[0, :6] = [np.nan, np.inf, -np.inf, 3.3e38, -3.3e38, 0.0]
    Wf[1, :3] = [1e-40, -1e-40, -0.0]  # subnormals (bf16 keeps them; torch does not flush)
    terms = [(np.full((rows, 1), 1.0, np.float32), np.full((1, cols), 1e37, np.float32), 10.0)]
    for sc, oc in (("F32", "BF16"), ("F32", "F16"), ("BF16", "BF16"), ("F32", "F32")):
        if not kern.supports(sc, oc):
            continue
        W = storage(sc, Wf)
        got = run_span(kern, W, sc, oc, terms)
        assert got.tobytes() == kernels.reference(W, sc, oc, terms).tobytes(), (sc, oc)
    W = storage("F32", Wf)
    tiny = [(np.zeros((rows, 1), np.float32), np.zeros((1, cols), np.float32), 1.0)]
    got = run_span(kern, W, "F32", "BF16", tiny)
    assert np.isnan(kernels._to_f32("BF16", got[0, :1])).all() and got[0, 0] == 0x7FC0
    assert got[1, 0] == storage("BF16", np.array([1e-40]))[0] != 0  # a subnormal survives


def test_bf16_rounding_matches_torch(kern):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g)
    ties = ((x.view(torch.int32) & ~0xFFFF) | 0x8000).view(torch.float32)  # halfway: round to even
    x = torch.cat([x, ties]).reshape(16, -1).contiguous()
    zero = [(np.zeros((16, 1), np.float32), np.zeros((1, x.shape[1]), np.float32), 1.0)]
    got = run_span(kern, x.numpy(), "F32", "BF16", zero)
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, want)


def test_merge_fd_reads_the_file(kern, tmp_path):
    rng = np.random.default_rng(5)
    rows, cols = 50, 77
    W, terms = make(rng, rows, cols, "BF16", (4,))
    p = tmp_path / "w.bin"
    p.write_bytes(b"123" + W.tobytes())  # odd offset
    f = kernels.Factors(terms, rows, cols)
    want = kernels.reference(W, "BF16", "BF16", terms).reshape(-1)
    fd = os.open(p, os.O_RDONLY)
    try:
        for scratch in (2, 64, 1 << 16):  # one element at a time, odd pieces, all at once
            out = np.zeros(rows * cols, np.uint16)
            for a, b in ((0, 1000), (1000, 1001), (1001, rows * cols)):
                kern.merge_fd(fd, 3, "BF16", out[a:], "BF16", f, a, b, scratch_bytes=scratch)
            assert out.tobytes() == want.tobytes(), scratch
        with pytest.raises(OSError):  # the file ends before the weight does
            kern.merge_fd(fd, 3 + 200, "BF16", np.zeros(rows * cols, np.uint16), "BF16", f, 0, rows * cols)
    finally:
        os.close(fd)


def test_bad_arguments_are_refused(kern):
    rows, cols = 4, 8
    W = np.zeros(rows * cols, np.uint16)
    terms = [(np.zeros((rows, 2), np.float32), np.zeros((2, cols), np.float32), 1.0)]
    f = kernels.Factors(terms, rows, cols)
    with pytest.raises(ValueError):
        kern.merge_span(W, "BF16", np.zeros(rows * cols, np.uint16), "BF16", f, 0, rows * cols + 1)
    with pytest.raises(ValueError):  # output too small
        kern.merge_span(W, "BF16", np.zeros(3, np.uint16), "BF16", f, 0, 8)
    with pytest.raises(ValueError):  # weight too small
        kern.merge_span(W[:2], "BF16", np.zeros(8, np.uint16), "BF16", f, 0, 8)
    with pytest.raises(ValueError):  # factor shapes do not make the weight
        kernels.Factors([(np.zeros((rows, 2), np.float32), np.zeros((3, cols), np.float32), 1.0)], rows, cols)


def test_env_switches_to_numpy(monkeypatch):
    monkeypatch.setenv(kernels.KERNEL_ENV, "numpy")
    assert kernels.load() is None
