"""The Python side of mpmp/nn/cuda on CPUs, through the strict fake CuPy of tests/cuda_fake.py:
every launch's arguments are checked against the kernel's C++ parameters, the kernels are emulated
in NumPy by parameter name, and cuBLAS is a column-major GEMM on raw pointers. So the mirror's glue
(argument order, shapes, transposes, caches, dtypes) is checked against mpmp/nn/functional.py
here; the CUDA code itself is checked on a GPU by tests/gpu/check_kernels.py.
"""

import math
import threading

import cuda_fake as fake
import numpy
import pytest

from mpmp.backend import to_wire
from mpmp.config import AdamWConfig
from mpmp.nn import functional as F
from mpmp.optim import adamw as np_adamw
from mpmp.optim import clip as np_clip

HP = AdamWConfig(0.9, 0.95, 1e-8, 0.1)

FORMATS = {"fp32": ("float", 1e-5), "fp16": ("__half", 2e-2), "bf16": ("__nv_bfloat16", 6e-2)}


@pytest.fixture
def cp(monkeypatch):
    return fake.install(monkeypatch)


@pytest.fixture
def cuda(cp):
    from mpmp.nn.cuda import elementwise, functional, gemm, optim

    return functional, gemm, optim, elementwise


def stored(x, fmt):
    """x (float64) in the storage of fmt, as a fake device array, and its exact float64 values."""
    x32 = numpy.asarray(x, dtype=numpy.float32)
    if fmt == "bf16":
        a = to_wire(x32, "bf16")
    elif fmt == "fp16":
        a = x32.astype(numpy.float16)
    else:
        a = x32
    return fake.dev(a), fake.as_float(a, FORMATS[fmt][0])


def values(a, fmt):
    return fake.as_float(a, FORMATS[fmt][0])


def close(got, want, fmt, what=""):
    tol = FORMATS[fmt][1]
    want = numpy.asarray(want, dtype=numpy.float64)
    err = numpy.abs(numpy.asarray(got, dtype=numpy.float64) - want).max() / max(numpy.abs(want).max(), 1e-30)
    assert err < tol, f"{what} ({fmt}): relative error {err:.2e} >= {tol}"


# ---- the strict launcher itself ---------------------------------------------------------------------


def test_launch_refuses_arguments_cupy_would_misread(cuda):
    from mpmp.nn.cuda import _loader as L

    k = L.kernel("elementwise.cu", "scale", "float")
    x = fake.dev(numpy.ones(4, numpy.float32))
    k((1,), (32,), (x, x, L.f32(2), L.i64(4)))
    numpy.testing.assert_array_equal(x, 2)
    bad = [
        ((x, x, 2.0, L.i64(4)), "got float"),  # a Python float would travel as a double
        ((x, x, L.f32(2), L.i32(4)), "got int32"),  # long long n passed as 32 bits
        ((x, fake.dev(numpy.ones(4, numpy.float16)), L.f32(2), L.i64(4)), "float16 array"),
        ((x, x, L.f32(2)), "3 arguments for 4"),
        ((x, fake.dev(numpy.ones((4, 2), numpy.float32))[:, 0], L.f32(2), L.i64(4)), "non-contiguous"),
    ]
    for args, message in bad:
        with pytest.raises(AssertionError, match=message):
            k((1,), (32,), args)
    with pytest.raises(KeyError, match="not instantiated"):
        L.kernel("elementwise.cu", "scale", "double")


# ---- GEMM: the row-major mapping -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_matmul_maps_row_major_products_onto_column_major_cublas(cuda, rng, fmt, trans_a, trans_b):
    _, gemm, _, _ = cuda
    m, k, n = 5, 7, 3
    a, av = stored(rng.standard_normal((k, m) if trans_a else (m, k)), fmt)
    b, bv = stored(rng.standard_normal((n, k) if trans_b else (k, n)), fmt)
    want = (av.T if trans_a else av) @ (bv.T if trans_b else bv)
    close(values(gemm.matmul(a, b, trans_a=trans_a, trans_b=trans_b), fmt), want, fmt, "matmul")
    out = fake.dev(numpy.ones((m, n), numpy.float32))
    gemm.matmul(a, b, out=out, trans_a=trans_a, trans_b=trans_b, accumulate=True, alpha=0.5)
    close(out, 1 + 0.5 * want, "fp32" if fmt == "fp32" else fmt, "accumulate into fp32")


def test_matmul_takes_transposed_views_and_transposed_outputs_without_copies(cuda, rng):
    _, gemm, _, _ = cuda
    a, av = stored(rng.standard_normal((4, 6)), "fp32")
    w, wv = stored(rng.standard_normal((5, 6)), "fp32")  # used as w.T, like the tied output head
    close(gemm.matmul(a, w.T), av @ wv.T, "fp32")
    grad = fake.dev(numpy.zeros((5, 6), numpy.float32))
    dy, dyv = stored(rng.standard_normal((4, 5)), "fp32")
    gemm.matmul(a, dy, out=grad.T, trans_a=True, accumulate=True)  # dW^T += x^T dy into a transposed view
    close(grad.T, av.T @ dyv, "fp32")


@pytest.mark.parametrize("fmt", FORMATS)
def test_batched_matmul_over_heads(cuda, rng, fmt):
    _, gemm, _, _ = cuda
    q, qv = stored(rng.standard_normal((2, 3, 4, 5)), fmt)
    k, kv = stored(rng.standard_normal((2, 3, 4, 5)), fmt)
    s = gemm.batched_matmul(q, k, trans_b=True, out_dtype=numpy.float32)
    close(s, qv @ kv.swapaxes(-1, -2), fmt, "q k^T")
    close(values(gemm.batched_matmul(q, k, trans_a=True, alpha=2.0), fmt), 2 * qv.swapaxes(-1, -2) @ kv, fmt)


def test_matmul_refuses_mismatched_operands(cuda):
    _, gemm, _, _ = cuda
    a = fake.dev(numpy.ones((2, 3), numpy.float32))
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm.matmul(a, a)
    with pytest.raises(TypeError, match="one storage type"):
        gemm.matmul(a, fake.dev(numpy.ones((3, 2), numpy.float16)))


# ---- the mirror of functional.py -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_matches_numpy(cuda, rng, fmt):
    CF = cuda[0]
    x, xv = stored(rng.standard_normal((2, 3, 4)), fmt)
    w, wv = stored(rng.standard_normal((4, 5)), fmt)
    b, bv = stored(rng.standard_normal(5), fmt)
    y, cache = CF.linear_forward(x, w, b)
    close(values(y, fmt), F.linear_forward(xv, wv, bv)[0], fmt, "y")
    assert cache is x
    dy, dyv = stored(rng.standard_normal((2, 3, 5)), fmt)
    close(values(CF.linear_backward_input(dy, w), fmt), F.linear_backward_input(dyv, wv), fmt, "dx")
    dw, db = fake.dev(numpy.ones((4, 5), numpy.float32)), fake.dev(numpy.ones(5, numpy.float32))
    CF.linear_backward_weight(dy, x, dw, db)
    dw_ref, db_ref = numpy.ones((4, 5)), numpy.ones(5)
    F.linear_backward_weight(dyv, xv, dw_ref, db_ref)
    close(dw, dw_ref, fmt, "dw")
    close(db, db_ref, fmt, "db")


@pytest.mark.parametrize("fmt", FORMATS)
def test_layernorm_matches_numpy(cuda, rng, fmt):
    CF = cuda[0]
    x, xv = stored(rng.standard_normal((3, 70, 40)) * 2 + 1, fmt)  # 210 rows: several parts of rows
    w, wv = stored(1 + 0.1 * rng.standard_normal(40), fmt)
    b, bv = stored(0.1 * rng.standard_normal(40), fmt)
    y, cache = CF.layernorm_forward(x, w, b)
    y_ref, cache_ref = F.layernorm_forward(xv, wv, bv)
    close(values(y, fmt), y_ref, fmt, "y")
    assert cache[1].shape == cache_ref[1].shape and cache[2] is w
    dy, dyv = stored(rng.standard_normal(x.shape), fmt)
    dw, db = fake.dev(numpy.zeros(40, numpy.float32)), fake.dev(numpy.zeros(40, numpy.float32))
    dw_ref, db_ref = numpy.zeros(40), numpy.zeros(40)
    close(
        values(CF.layernorm_backward(dy, cache, dw, db), fmt), F.layernorm_backward(dyv, cache_ref, dw_ref, db_ref), fmt
    )
    close(dw, dw_ref, fmt, "dw")
    close(db, db_ref, fmt, "db")


@pytest.mark.parametrize("fmt", FORMATS)
def test_gelu_and_bias_gelu_match_numpy(cuda, rng, fmt):
    CF = cuda[0]
    h, hv = stored(rng.standard_normal((6, 8)) * 2, fmt)
    y, cache = CF.gelu_forward(h)
    y_ref, cache_ref = F.gelu_forward(hv)
    close(values(y, fmt), y_ref, fmt, "gelu")
    dy, dyv = stored(rng.standard_normal((6, 8)), fmt)
    close(values(CF.gelu_backward(dy, cache), fmt), F.gelu_backward(dyv, cache_ref), fmt, "gelu backward")
    b, bv = stored(rng.standard_normal(8), fmt)
    y, cache = CF.bias_gelu_forward(h, b)
    x_ref = hv + bv
    close(values(y, fmt), F.gelu_forward(x_ref)[0], fmt, "bias_gelu")
    close(values(cache[0], fmt), x_ref, fmt, "h + b written into h")
    db = fake.dev(numpy.zeros(8, numpy.float32))
    dh = CF.bias_gelu_backward(dy, cache, db)
    dh_ref = F.gelu_backward(dyv, F.gelu_forward(x_ref)[1])
    close(values(dh, fmt), dh_ref, fmt, "bias_gelu backward")
    close(db, dh_ref.sum(axis=0), fmt, "db")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep_probs", [True, False])
def test_attention_matches_numpy(cuda, rng, fmt, keep_probs):
    CF = cuda[0]
    q, qv = stored(rng.standard_normal((2, 3, 5, 4)), fmt)
    k, kv = stored(rng.standard_normal((2, 3, 5, 4)), fmt)
    v, vv = stored(rng.standard_normal((2, 3, 5, 4)), fmt)
    out, cache = CF.attention_forward(q, k, v, keep_probs=keep_probs)
    out_ref, cache_ref = F.attention_forward(qv, kv, vv)
    close(values(out, fmt), out_ref, fmt, "out")
    assert (cache[3] is None) == (not keep_probs)
    do, dov = stored(rng.standard_normal(out.shape), fmt)
    for got, want, name in zip(CF.attention_backward(do, cache), F.attention_backward(dov, cache_ref), "qkv"):
        close(values(got, fmt), want, fmt, f"d{name}")


class _TwoRanks:
    """All-reduce between two threads standing for two tensor-parallel ranks."""

    def __init__(self):
        self.barrier, self.slots = threading.Barrier(2, timeout=30), [None, None]

    def all_reduce(self, rank, op):
        def reduce(a):
            self.slots[rank] = numpy.array(a)
            self.barrier.wait()
            result = op(self.slots[0], self.slots[1])
            self.barrier.wait()
            return fake.dev(result)

        return reduce


@pytest.mark.parametrize("fmt", FORMATS)
def test_vocab_parallel_cross_entropy_matches_numpy(cuda, rng, fmt):
    """Two ranks split 11 columns (padded to 12), as the model's vocab-parallel head does."""
    CF = cuda[0]
    n, vocab, v_local = 6, 11, 6
    full, fullv = stored(rng.standard_normal((n, vocab)) * 3, fmt)
    targets = rng.integers(0, vocab, n)
    ref_loss, ref_cache = F.cross_entropy_forward(fullv.copy(), targets, 0.5)
    ref_grad = F.cross_entropy_backward(ref_cache)
    padded = numpy.zeros((n, 2 * v_local), full.dtype)
    padded[:, :vocab] = numpy.asarray(full)
    pair, results = _TwoRanks(), [None, None]

    def rank(r):
        start = r * v_local
        logits = fake.dev(padded[:, start : start + v_local])
        loss, cache = CF.cross_entropy_forward(
            logits,
            fake.dev(targets),
            0.5,
            vocab_start=start,
            vocab_valid=max(0, min(v_local, vocab - start)),
            all_reduce_max=pair.all_reduce(r, numpy.maximum),
            all_reduce_sum=pair.all_reduce(r, numpy.add),
        )
        results[r] = (float(loss), values(CF.cross_entropy_backward(cache), fmt))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0][0] == pytest.approx(results[1][0]) and results[0][0] == pytest.approx(
        ref_loss, rel=FORMATS[fmt][1]
    )
    grads = numpy.concatenate([results[0][1], results[1][1]], axis=1)
    close(grads[:, :vocab], ref_grad, fmt, "dlogits")
    assert numpy.all(grads[:, vocab:] == 0), "the padding column took probability"


def test_embedding_backward_adds_repeated_rows(cuda, rng):
    CF = cuda[0]
    ids = fake.dev(numpy.array([[1, 3, 1], [0, 1, 3]]))
    dout, doutv = stored(rng.standard_normal((2, 3, 4)), "bf16")
    dweight = fake.dev(numpy.zeros((5, 4), numpy.float32))
    CF.embedding_backward(dout, ids, dweight)
    ref = numpy.zeros((5, 4))
    F.embedding_backward(doutv, numpy.asarray(ids), ref)
    close(dweight, ref, "fp32")
    got, _ = CF.embedding_forward(ids, fake.dev(numpy.arange(20, dtype=numpy.uint16).reshape(5, 4)))
    numpy.testing.assert_array_equal(got[0, 1], [12, 13, 14, 15])


# ---- elementwise and the optimizer -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_cast_add_scale(cuda, rng, fmt):
    ew = cuda[3]
    x, xv = stored(rng.standard_normal(10), "fp32")
    storage = ew.STORAGE[fmt]
    y = ew.cast(x, storage)
    assert y.dtype == storage
    close(values(y, fmt), xv, fmt, "cast")
    close(ew.cast(y, numpy.float32), values(y, fmt), "fp32", "cast back")
    z = ew.add_(ew.cast(x, storage), y)
    close(values(z, fmt), 2 * xv, fmt, "add_")
    close(values(ew.scale(y, 3.0), fmt), 3 * xv, fmt, "scale")
    m = ew.cast(fake.dev(numpy.zeros((2, 10), numpy.float32)), storage)
    close(values(ew.bias_add_(m, y), fmt), numpy.tile(xv, (2, 1)), fmt, "bias_add_")


@pytest.mark.parametrize("device_scale", [False, True])
def test_adamw_matches_numpy(cuda, rng, device_scale):
    _, _, optim, _ = cuda
    n, runs = 300, [(10, 50), (120, 300)]
    p0, g, m0, v0 = (rng.standard_normal(n).astype(numpy.float32) for _ in range(4))
    v0 = numpy.abs(v0)
    ref = [a.copy() for a in (p0, m0, v0)]
    np_adamw.adamw_update(ref[0], g, ref[1], ref[2], step=3, lr=1e-2, hp=HP, decay_runs=runs, grad_scale=0.25)
    p, m, v = (fake.dev(a.copy()) for a in (p0, m0, v0))
    scale = fake.dev(numpy.float32([0.25])) if device_scale else 0.25
    optim.adamw_update(p, fake.dev(g), m, v, step=3, lr=1e-2, hp=HP, decay_runs=runs, grad_scale=scale)
    for got, want in zip((p, m, v), ref):
        numpy.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    before = numpy.array(p)
    optim.adamw_update(p, fake.dev(g), m, v, step=4, lr=1e-2, hp=HP, decay_runs=runs, skip=fake.dev(numpy.int32([1])))
    numpy.testing.assert_array_equal(p, before)


def test_unscale_and_check_raises_the_flag_only_for_non_finite(cuda):
    _, _, optim, _ = cuda
    g = fake.dev(numpy.float32([2, 4, 8]))
    flag = optim.unscale_and_check(g, 0.5)
    numpy.testing.assert_array_equal(g, [1, 2, 4])
    assert flag[0] == 0
    optim.unscale_and_check(fake.dev(numpy.float32([1, numpy.inf])), 0.5, flag)
    assert flag[0] == 1


def test_local_sq_norm_matches_numpy(cuda, rng):
    _, _, optim, _ = cuda
    g = rng.standard_normal(1000).astype(numpy.float32)
    runs = [(0, 100), (400, 1000)]
    got = optim.local_sq_norm(fake.dev(g), runs)
    # the device sums squares in float64; the host, float32 dot products per chunk (round-off ~1e-8)
    assert got.shape == () and float(got) == pytest.approx(np_clip.local_sq_norm(g, runs), rel=1e-6)
    assert math.isfinite(float(got))
