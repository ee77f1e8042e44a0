"""The NumPy kernels on several threads (backend.for_blocks) compute what one thread computes.

The kernels split their rows, heads or chunks into blocks; small blocks here (functional.BLOCK and
buffer.CHUNK patched down) make every kernel run many blocks on two threads. Products and
elementwise chains of a block are the same operations whichever thread runs them, so those outputs
are equal bit for bit; sums over blocks (bias and LayerNorm parameter gradients) add the block
partials, so they are compared to float64 round-off.
"""

import threading

import numpy
import pytest

from mpmp import backend
from mpmp.config import AdamWConfig
from mpmp.nn import functional as F
from mpmp.optim import adamw, buffer, clip


@pytest.fixture
def rng():
    return numpy.random.default_rng(7)


@pytest.fixture
def threads(monkeypatch):
    """Two kernel threads, and blocks small enough that every kernel below runs many of them."""
    old = backend.set_kernel_threads(2)
    monkeypatch.setattr(F, "BLOCK", 64)
    yield
    backend.set_kernel_threads(old)


def one_thread(fn, *args, **kw):
    old = backend.set_kernel_threads(1)
    try:
        return fn(*args, **kw)
    finally:
        backend.set_kernel_threads(old)


# ---- for_blocks ---------------------------------------------------------------------------------


def test_for_blocks_covers_the_range_in_order_and_uses_the_helper_thread(threads):
    seen = set()

    def block(lo, hi):
        seen.add(threading.get_ident())
        return lo, hi

    assert backend.for_blocks(block, 10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert backend.for_blocks(block, 0, 3) == []
    for _ in range(50):  # the helper takes a block at least once when the blocks take a while
        backend.for_blocks(lambda lo, hi: block(lo, hi) and numpy.ones(200_000).sum(), 8, 1)
    assert len(seen) == 2


def test_for_blocks_raises_a_block_error_in_the_caller(threads):
    def block(lo, hi):
        if lo == 5:
            raise ValueError("block 5")
        return lo

    with pytest.raises(ValueError, match="block 5"):
        backend.for_blocks(block, 8, 1)


def test_for_blocks_runs_nested_calls_inline(threads):
    inner = backend.for_blocks(lambda lo, hi: backend.for_blocks(lambda a, b: (a, b), 4, 2), 4, 1)
    assert inner == [[(0, 2), (2, 4)]] * 4


def test_helper_threads_keep_the_callers_numpy_error_state(threads):
    """The trainer silences overflow warnings (numpy.seterr) in its thread; NumPy keeps that state per
    context, so the helpers run in a copy of the caller's context."""
    x = numpy.full((64, 64), 1e30, dtype=numpy.float32)
    with numpy.errstate(over="raise"):
        with pytest.raises(FloatingPointError):
            backend.for_blocks(lambda lo, hi: x[lo:hi] * x[lo:hi], 64, 1)
    with numpy.errstate(over="ignore"):
        backend.for_blocks(lambda lo, hi: x[lo:hi] * x[lo:hi], 64, 1)


def test_openblas_is_back_to_its_threads_after_a_parallel_region(threads):
    calls = backend._openblas_threads_calls()
    if not calls:
        pytest.skip("NumPy's BLAS is not OpenBLAS")
    before = calls[0]()
    seen = backend.for_blocks(lambda lo, hi: calls[0](), 4, 1)
    assert set(seen) == {1} and calls[0]() == before


# ---- kernels: two threads and many blocks == one thread -------------------------------------------


def test_gelu_and_bias_gelu_on_threads_equal_one_thread(threads, rng):
    h = rng.standard_normal((3, 10, 24)).astype(numpy.float32)
    b, dy = rng.standard_normal(24).astype(numpy.float32), rng.standard_normal(h.shape).astype(numpy.float32)
    y, cache = F.bias_gelu_forward(h.copy(), b)
    y1, cache1 = one_thread(F.bias_gelu_forward, h.copy(), b)
    numpy.testing.assert_array_equal(y, y1)
    db, db1 = numpy.zeros(24, numpy.float32), numpy.zeros(24, numpy.float32)
    numpy.testing.assert_array_equal(
        F.bias_gelu_backward(dy, cache, db), one_thread(F.bias_gelu_backward, dy, cache1, db1)
    )
    numpy.testing.assert_allclose(db, db1, rtol=1e-5, atol=1e-5)


def test_layernorm_on_threads_equals_one_thread(threads, rng):
    x = rng.standard_normal((4, 9, 16))
    w, b, dy = rng.standard_normal(16), rng.standard_normal(16), rng.standard_normal(x.shape)
    y, cache = F.layernorm_forward(x, w, b)
    y1, cache1 = one_thread(F.layernorm_forward, x, w, b)
    numpy.testing.assert_array_equal(y, y1)
    grads, grads1 = (numpy.zeros(16), numpy.zeros(16)), (numpy.zeros(16), numpy.zeros(16))
    numpy.testing.assert_array_equal(
        F.layernorm_backward(dy, cache, *grads), one_thread(F.layernorm_backward, dy, cache1, *grads1)
    )
    for g, g1 in zip(grads, grads1):
        numpy.testing.assert_allclose(g, g1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("keep_probs", [True, False])
def test_attention_on_threads_equals_one_thread(threads, rng, keep_probs):
    q, k, v, dout = (rng.standard_normal((2, 6, 5, 4)) for _ in range(4))
    out, cache = F.attention_forward(q, k, v, keep_probs=keep_probs)
    out1, cache1 = one_thread(F.attention_forward, q, k, v, keep_probs=keep_probs)
    numpy.testing.assert_array_equal(out, out1)
    for g, g1 in zip(F.attention_backward(dout, cache), one_thread(F.attention_backward, dout, cache1)):
        numpy.testing.assert_array_equal(g, g1)


def test_bias_backward_on_threads_adds_every_row(threads, rng):
    dy = rng.standard_normal((7, 11, 5))
    db = numpy.ones(5)
    F.bias_backward(dy, db)
    numpy.testing.assert_allclose(db, 1 + dy.reshape(-1, 5).sum(axis=0), rtol=1e-12)


def test_adamw_and_the_norm_on_threads_equal_one_thread(threads, rng, monkeypatch):
    monkeypatch.setattr(buffer, "CHUNK", 100)
    monkeypatch.setattr(adamw, "CHUNK", 100)
    monkeypatch.setattr(clip, "CHUNK", 100)
    p, g = rng.standard_normal(1234).astype(numpy.float32), rng.standard_normal(1234).astype(numpy.float32)
    runs = [(0, 500), (700, 1234)]
    states = [[p.copy(), numpy.zeros_like(p), numpy.zeros_like(p)] for _ in range(2)]
    hp = AdamWConfig(weight_decay=0.1)
    for step in (1, 2):
        adamw.adamw_update(
            *states[0][:1], g, *states[0][1:], step=step, lr=1e-2, hp=hp, decay_runs=runs, grad_scale=0.5
        )
        one_thread(
            adamw.adamw_update,
            *states[1][:1],
            g,
            *states[1][1:],
            step=step,
            lr=1e-2,
            hp=hp,
            decay_runs=runs,
            grad_scale=0.5,
        )
    for a, b in zip(*states):
        numpy.testing.assert_array_equal(a, b)
    assert clip.local_sq_norm(g, runs) == one_thread(clip.local_sq_norm, g, runs)


# ---- heads without copies -------------------------------------------------------------------------


def test_attention_output_merges_without_a_copy(rng):
    q, k, v = F.split_heads(rng.standard_normal((2, 5, 3 * 12)), 3)
    out, cache = F.attention_forward(q, k, v)
    merged = F.merge_heads(out)
    assert numpy.shares_memory(merged, out)
    numpy.testing.assert_array_equal(merged, F.merge_heads(numpy.ascontiguousarray(out)))
    dqkv = F.merge_heads_qkv(*F.attention_backward(rng.standard_normal(out.shape), cache))
    assert dqkv.shape == (2, 5, 36)


def test_merge_heads_qkv_takes_the_gradients_of_attention_backward_as_they_are(rng):
    q, k, v = F.split_heads(rng.standard_normal((2, 5, 3 * 12)), 3)
    _, cache = F.attention_forward(q, k, v)
    grads = F.attention_backward(rng.standard_normal(q.shape), cache)
    merged = F.merge_heads_qkv(*grads)
    assert all(numpy.shares_memory(merged, g) for g in grads)
    numpy.testing.assert_array_equal(merged, F.merge_heads_qkv(*(numpy.ascontiguousarray(g) for g in grads)))
    # three views of one array in another order are copied into the right places
    swapped = F.merge_heads_qkv(grads[1], grads[0], grads[2])
    numpy.testing.assert_array_equal(F.split_heads(swapped, 3)[0], grads[1])


def test_kernel_threads_are_opt_in_and_a_bad_count_is_refused():
    from mpmp._setup import kernel_threads
    from mpmp.errors import ConfigError

    assert kernel_threads({}) == 1
    assert kernel_threads({"MPMP_KERNEL_THREADS": "3"}) == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match="MPMP_KERNEL_THREADS"):
            kernel_threads({"MPMP_KERNEL_THREADS": bad})
