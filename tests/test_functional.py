"""Every kernel of mpmp.nn.functional against float64 central finite differences.

The scalar loss is llm.c's `fakeloss`: L = sum(out * dout) for a fixed random dout, so the analytic
backward fed with dout must equal dL/dinput, which is estimated by (L(x + h) - L(x - h)) / 2h one
entry at a time. Arrays are small (a few hundred entries) so the whole file runs in about a second.
"""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy
import pytest
from helpers import numerical_grad, rel_error

from mpmp.nn import functional as F

TOL = 1e-6  # largest accepted relative error


def assert_matches_fd(analytic, loss, x, what=""):
    assert analytic.shape == x.shape, f"{what}: gradient shape {analytic.shape} != input shape {x.shape}"
    err = rel_error(analytic, numerical_grad(loss, x))
    assert err < TOL, f"{what}: relative error {err:.3e} against finite differences"


def fakeloss(out, dout):
    return float((out * dout).sum())


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_backward_matches_finite_differences(rng, with_bias):
    x = rng.standard_normal((2, 3, 4))
    w = rng.standard_normal((4, 5))
    b = rng.standard_normal(5) if with_bias else None
    dout = rng.standard_normal((2, 3, 5))

    def loss():
        return fakeloss(F.linear_forward(x, w, b)[0], dout)

    y, cache = F.linear_forward(x, w, b)
    assert y.shape == (2, 3, 5) and y.dtype == numpy.float64
    dx = F.linear_backward_input(dout, w)
    dw = numpy.zeros_like(w)
    db = numpy.zeros_like(b) if with_bias else None
    F.linear_backward_weight(dout, cache, dw, db)

    assert_matches_fd(dx, loss, x, "dx")
    assert_matches_fd(dw, loss, w, "dw")
    if with_bias:
        assert_matches_fd(db, loss, b, "db")


def test_linear_forward_is_x_at_w_plus_b(rng):
    x, w, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    numpy.testing.assert_allclose(F.linear_forward(x, w, b)[0], x @ w + b, rtol=1e-14)


def test_linear_backward_weight_accumulates_into_existing_gradients(rng):
    x, dy = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 5))
    dw0, db0 = rng.standard_normal((4, 5)), rng.standard_normal(5)
    dw, db = dw0.copy(), db0.copy()
    F.linear_backward_weight(dy, x, dw, db)
    numpy.testing.assert_allclose(dw, dw0 + x.reshape(-1, 4).T @ dy.reshape(-1, 5), rtol=1e-13)
    numpy.testing.assert_allclose(db, db0 + dy.reshape(-1, 5).sum(axis=0), rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------


def test_embedding_forward_looks_up_rows(rng):
    weight = rng.standard_normal((7, 3))
    ids = numpy.array([[0, 6, 2], [2, 2, 5]])
    out, cache = F.embedding_forward(ids, weight)
    assert out.shape == (2, 3, 3)
    numpy.testing.assert_array_equal(out, weight[ids])
    numpy.testing.assert_array_equal(cache, ids)


def test_embedding_backward_with_repeated_ids_matches_finite_differences(rng):
    v, d = 5, 3
    ids = numpy.array([[1, 3, 1, 1], [3, 0, 1, 3]])  # repeats within and across rows; 2 and 4 unused
    weight = rng.standard_normal((v, d))
    dout = rng.standard_normal((2, 4, d))

    def loss():
        return fakeloss(F.embedding_forward(ids, weight)[0], dout)

    dweight = numpy.zeros_like(weight)
    F.embedding_backward(dout, F.embedding_forward(ids, weight)[1], dweight)
    assert_matches_fd(dweight, loss, weight, "dweight")
    # Repeated ids must add up, not overwrite; unused rows stay zero.
    numpy.testing.assert_allclose(dweight[1], dout[0, 0] + dout[0, 2] + dout[0, 3] + dout[1, 2], rtol=1e-14)
    numpy.testing.assert_array_equal(dweight[[2, 4]], 0)


# ---------------------------------------------------------------------------------------------
# Layer norm
# ---------------------------------------------------------------------------------------------


def test_layernorm_forward_normalises_the_last_dimension(rng):
    x = rng.standard_normal((2, 3, 6)) * 3 + 1
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    y, _ = F.layernorm_forward(x, w, b, eps=1e-5)
    mean = x.mean(-1, keepdims=True)
    ref = (x - mean) / numpy.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    numpy.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_layernorm_backward_matches_finite_differences(rng):
    x = rng.standard_normal((2, 3, 6)) * 2 + 0.5
    w = 1 + 0.5 * rng.standard_normal(6)
    b = rng.standard_normal(6)
    dout = rng.standard_normal((2, 3, 6))
    x_before = x.copy()

    def loss():
        return fakeloss(F.layernorm_forward(x, w, b)[0], dout)

    _, cache = F.layernorm_forward(x, w, b)
    numpy.testing.assert_array_equal(x, x_before)  # forward must not touch its input
    dw, db = numpy.zeros_like(w), numpy.zeros_like(b)
    dx = F.layernorm_backward(dout, cache, dw, db)

    assert_matches_fd(dx, loss, x, "dx")
    assert_matches_fd(dw, loss, w, "dw")
    assert_matches_fd(db, loss, b, "db")


def test_layernorm_backward_accumulates_weight_and_bias_gradients(rng):
    x, w, b = rng.standard_normal((4, 6)), rng.standard_normal(6), rng.standard_normal(6)
    dout = rng.standard_normal((4, 6))
    _, cache = F.layernorm_forward(x, w, b)
    dw1, db1 = numpy.zeros(6), numpy.zeros(6)
    F.layernorm_backward(dout, cache, dw1, db1)
    dw2, db2 = dw1.copy(), db1.copy()
    F.layernorm_backward(dout, cache, dw2, db2)
    numpy.testing.assert_allclose(dw2, 2 * dw1, rtol=1e-14)
    numpy.testing.assert_allclose(db2, 2 * db1, rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# GELU (tanh approximation)
# ---------------------------------------------------------------------------------------------


def test_gelu_forward_is_the_tanh_approximation(rng):
    x = numpy.linspace(-6, 6, 61)
    ref = 0.5 * x * (1 + numpy.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    numpy.testing.assert_allclose(F.gelu_forward(x.copy())[0], ref, rtol=1e-13, atol=1e-15)


def test_gelu_backward_matches_finite_differences(rng):
    x = rng.uniform(-4, 4, size=(3, 40))
    dout = rng.standard_normal((3, 40))
    x_before = x.copy()

    def loss():
        return fakeloss(F.gelu_forward(x)[0], dout)

    _, cache = F.gelu_forward(x)
    numpy.testing.assert_array_equal(x, x_before)
    assert_matches_fd(F.gelu_backward(dout, cache), loss, x, "dx")


def test_gelu_of_huge_inputs_stays_finite_in_float32():
    """A diverging run's activations: past |x| ~ 1e13, x^3 overflows float32, but GELU has long
    saturated (slope 0 below, 1 above), and the gradient must say so rather than inf * 0 = NaN."""
    x = numpy.array([[-1e18, -1e13, -30.0, 30.0, 1e13, 1e18]], numpy.float32)
    with numpy.errstate(over="ignore"):  # as training runs (train.py): x^2 may overflow on the way
        y, cache = F.gelu_forward(x)
        dx = F.gelu_backward(numpy.full_like(x, 2.0), cache)
    numpy.testing.assert_array_equal(y, [[0, 0, 0, *x[0, 3:]]])
    numpy.testing.assert_array_equal(dx, [[0, 0, 0, 2, 2, 2]])


# ---------------------------------------------------------------------------------------------
# Attention core
# ---------------------------------------------------------------------------------------------

B, NH, T, HD = 2, 2, 5, 3


def _reference_attention(q, k, v):
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    t = q.shape[-2]
    s = numpy.where(numpy.tril(numpy.ones((t, t), dtype=bool)), s, -numpy.inf)
    p = numpy.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_attention_forward_is_causal_scaled_softmax(rng):
    q, k, v = (rng.standard_normal((B, NH, T, HD)) for _ in range(3))
    out, _ = F.attention_forward(q, k, v)
    numpy.testing.assert_allclose(out, _reference_attention(q, k, v), rtol=1e-12, atol=1e-14)
    # Causality: changing the last key and value must leave every earlier position unchanged.
    k2, v2 = k.copy(), v.copy()
    k2[..., -1, :] += 10
    v2[..., -1, :] += 10
    out2, _ = F.attention_forward(q, k2, v2)
    numpy.testing.assert_array_equal(out2[..., :-1, :], out[..., :-1, :])


@pytest.mark.parametrize("keep_probs", [True, False], ids=["keep_probs", "recompute_probs"])
def test_attention_backward_matches_finite_differences(rng, keep_probs):
    q, k, v = (rng.standard_normal((B, NH, T, HD)) for _ in range(3))
    dout = rng.standard_normal((B, NH, T, HD))

    def loss():
        return fakeloss(F.attention_forward(q, k, v)[0], dout)

    _, cache = F.attention_forward(q, k, v, keep_probs=keep_probs)
    assert (cache[3] is None) == (not keep_probs)
    dq, dk, dv = F.attention_backward(dout, cache)
    assert_matches_fd(dq, loss, q, "dq")
    assert_matches_fd(dk, loss, k, "dk")
    assert_matches_fd(dv, loss, v, "dv")


def test_attention_selective_recompute_gives_identical_gradients(rng):
    q, k, v = (rng.standard_normal((B, NH, T, HD)) for _ in range(3))
    dout = rng.standard_normal((B, NH, T, HD))
    out_kept, kept = F.attention_forward(q, k, v, keep_probs=True)
    out_dropped, dropped = F.attention_forward(q, k, v, keep_probs=False)
    numpy.testing.assert_array_equal(out_kept, out_dropped)
    for a, b, name in zip(F.attention_backward(dout, kept), F.attention_backward(dout, dropped), "qkv"):
        numpy.testing.assert_array_equal(a, b, err_msg=f"d{name}")


# ---------------------------------------------------------------------------------------------
# Head layout: split_heads / merge_heads
# ---------------------------------------------------------------------------------------------


def test_split_heads_follows_the_interchange_column_layout(rng):
    """Columns are q, then k, then v; within each, head j owns columns j*hd ... (j+1)*hd."""
    b, t, nh, hd = 2, 4, 3, 2
    d = nh * hd
    qkv = rng.standard_normal((b, t, 3 * d))
    q, k, v = F.split_heads(qkv, nh)
    for which, part in enumerate((q, k, v)):
        assert part.shape == (b, nh, t, hd) and part.flags.c_contiguous
        for j in range(nh):
            lo = which * d + j * hd
            numpy.testing.assert_array_equal(part[:, j], qkv[:, :, lo : lo + hd])


def test_merge_heads_qkv_inverts_split_heads(rng):
    qkv = rng.standard_normal((2, 4, 3 * 6))
    numpy.testing.assert_array_equal(F.merge_heads_qkv(*F.split_heads(qkv, 3)), qkv)


def test_merge_heads_and_split_heads_grad_are_inverse(rng):
    x = rng.standard_normal((2, 3, 4, 5))  # [B, H, T, hd]
    merged = F.merge_heads(x)
    assert merged.shape == (2, 4, 15)
    for j in range(3):
        numpy.testing.assert_array_equal(merged[:, :, j * 5 : (j + 1) * 5], x[:, j])
    back = F.split_heads_grad(merged, 3)
    assert back.flags.c_contiguous
    numpy.testing.assert_array_equal(back, x)
    d = rng.standard_normal((2, 4, 15))
    numpy.testing.assert_array_equal(F.merge_heads(F.split_heads_grad(d, 3)), d)


# ---------------------------------------------------------------------------------------------
# Cross-entropy, whole vocabulary and split over ranks
# ---------------------------------------------------------------------------------------------


def _reference_cross_entropy(logits, targets, scale):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - numpy.log(numpy.exp(shifted).sum(axis=1, keepdims=True))
    return -log_softmax[numpy.arange(len(targets)), targets].sum() * scale


def test_cross_entropy_forward_matches_log_softmax(rng):
    logits = rng.standard_normal((6, 7)) * 3
    targets = rng.integers(0, 7, size=6)
    loss, _ = F.cross_entropy_forward(logits.copy(), targets, 0.25)
    assert isinstance(loss, float)
    assert loss == pytest.approx(_reference_cross_entropy(logits, targets, 0.25), rel=1e-13)


def test_cross_entropy_backward_matches_finite_differences(rng):
    logits = rng.standard_normal((6, 7)) * 2
    targets = rng.integers(0, 7, size=(2, 3))  # targets keep the batch shape; the kernel flattens them
    scale = 1 / 6

    def loss():
        return F.cross_entropy_forward(logits.copy(), targets, scale)[0]

    _, cache = F.cross_entropy_forward(logits.copy(), targets, scale)
    dlogits = F.cross_entropy_backward(cache)
    assert dlogits.dtype == numpy.float64
    assert_matches_fd(dlogits, loss, logits, "dlogits")
    numpy.testing.assert_allclose(dlogits.sum(axis=1), 0, atol=1e-15)  # softmax - onehot sums to zero


class _ThreadGroup:
    """An in-process stand-in for a tp group: one thread per rank, all-reduce over a barrier."""

    OPS = {"max": numpy.maximum, "sum": numpy.add}

    def __init__(self, size):
        self.size = size
        self._slots = [None] * size
        self._barrier = threading.Barrier(size, timeout=10)

    def all_reduce(self, rank, x, op):
        self._slots[rank] = numpy.array(x, copy=True)
        self._barrier.wait()
        out = self._slots[0].copy()
        for other in self._slots[1:]:
            out = self.OPS[op](out, other)
        self._barrier.wait()  # nobody overwrites a slot before everyone has read them all
        return out


def _vocab_parallel_forward(logits_parts, targets, scale, vocab):
    """Each part on its own thread, exactly as each tp rank calls the kernel (Head's vocab_valid)."""
    tp = len(logits_parts)
    v_local = logits_parts[0].shape[1]
    group = _ThreadGroup(tp)

    def rank_forward(r):
        start = r * v_local
        return F.cross_entropy_forward(
            logits_parts[r].copy(),
            targets,
            scale,
            vocab_start=start,
            vocab_valid=max(0, min(v_local, vocab - start)),
            all_reduce_max=lambda a: group.all_reduce(r, a, "max"),
            all_reduce_sum=lambda a: group.all_reduce(r, a, "sum"),
        )

    with ThreadPoolExecutor(tp) as pool:
        return [f.result() for f in [pool.submit(rank_forward, r) for r in range(tp)]]


@pytest.mark.parametrize(
    "vocab, tp",
    [(8, 2), (9, 3), (7, 2), (7, 3), (4, 3)],
    ids=["even-2", "even-3", "padded-2", "padded-3", "whole-part-padding"],
)
def test_vocab_parallel_cross_entropy_matches_the_whole_vocabulary(rng, vocab, tp):
    n, scale = 6, 1 / 6
    v_local = -(-vocab // tp)
    logits = rng.standard_normal((n, vocab)) * 2
    targets = rng.integers(0, vocab, size=n)
    targets[:tp] = numpy.arange(tp) * v_local % vocab  # every part owns at least one target when it can
    full_loss, full_cache = F.cross_entropy_forward(logits.copy(), targets, scale)
    full_grad = F.cross_entropy_backward(full_cache)

    # Padding columns hold huge logits: unmasked, they would take almost all the probability.
    padded = numpy.full((n, v_local * tp), 50.0)
    padded[:, :vocab] = logits
    parts = numpy.split(padded, tp, axis=1)
    results = _vocab_parallel_forward(parts, targets, scale, vocab)

    for r, (loss, _) in enumerate(results):
        assert loss == pytest.approx(full_loss, rel=1e-13), f"rank {r}"
        assert loss == pytest.approx(_reference_cross_entropy(logits, targets, scale), rel=1e-13)
    grad = numpy.concatenate([F.cross_entropy_backward(cache) for _, cache in results], axis=1)
    numpy.testing.assert_array_equal(grad[:, vocab:], 0)  # padding never takes probability
    numpy.testing.assert_allclose(grad[:, :vocab], full_grad, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("tp", [2, 3])
def test_vocab_parallel_cross_entropy_backward_matches_finite_differences(rng, tp):
    n, vocab, scale = 4, 7, 0.5
    v_local = -(-vocab // tp)
    logits = rng.standard_normal((n, vocab))
    targets = rng.integers(0, vocab, size=n)

    def parts_of(x):
        padded = numpy.zeros((n, v_local * tp))
        padded[:, :vocab] = x
        return numpy.split(padded, tp, axis=1)

    def loss():
        return _vocab_parallel_forward(parts_of(logits), targets, scale, vocab)[0][0]

    results = _vocab_parallel_forward(parts_of(logits), targets, scale, vocab)
    grad = numpy.concatenate([F.cross_entropy_backward(cache) for _, cache in results], axis=1)
    assert_matches_fd(grad[:, :vocab], loss, logits, "dlogits")


# ---------------------------------------------------------------------------------------------
# dtype
# ---------------------------------------------------------------------------------------------


def test_kernels_keep_float32(rng):
    f32 = numpy.float32

    def r(*shape):
        return rng.standard_normal(shape).astype(f32)

    x, w, b = r(2, 3, 4), r(4, 4), r(4)
    y, cache = F.linear_forward(x, w, b)
    assert y.dtype == f32 and F.linear_backward_input(y, w).dtype == f32
    y, cache = F.layernorm_forward(x, w[0], b)
    assert y.dtype == f32 and F.layernorm_backward(y, cache, numpy.zeros(4, f32), numpy.zeros(4, f32)).dtype == f32
    y, cache = F.gelu_forward(x)
    assert y.dtype == f32 and F.gelu_backward(y, cache).dtype == f32
    q, k, v = r(1, 2, 3, 2), r(1, 2, 3, 2), r(1, 2, 3, 2)
    y, cache = F.attention_forward(q, k, v)
    assert y.dtype == f32 and all(g.dtype == f32 for g in F.attention_backward(y, cache))
    _, cache = F.cross_entropy_forward(r(3, 5), numpy.array([0, 4, 2]), 1 / 3)
    assert F.cross_entropy_backward(cache).dtype == f32
