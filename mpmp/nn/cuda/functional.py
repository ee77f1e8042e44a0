"""The kernels of mpmp/nn/functional.py on CUDA, one for one: same names, arguments, return values
and cache tuples, so a layer can call either module (the NumPy one stays the readable reference).

Arrays are CuPy arrays in one storage type per call: float32, float16, or uint16 holding bf16 bit
patterns (CuPy has no bfloat16 dtype). Math runs in fp32 inside the kernels (see *.cu beside this
file); matrix products go to cuBLAS with fp32 accumulation (gemm.py). Gradients of parameters
(dw, db, dweight) are float32 buffers whatever the storage: fp32 accumulation, as the trainer's
fp32 master gradients.

Differences a caller can see, each for a reason:
- cross_entropy_forward returns the loss as a 0-d float64 device array, not a Python float: turning
  it into a float would wait for the GPU. The trainer adds the micro-batches' losses on the device
  and reads the sum once per step.
- layernorm's rstd is float32 whatever the storage (a reduction result, kept in fp32).
- Everything runs on CuPy's current stream and returns before the GPU has finished.

Also here: bias_gelu_forward / bias_gelu_backward (the bias + GELU of the MLP, fused), and add_ /
bias_add_, the in-place additions of activations that must add bf16 values, not their bit patterns.
"""

import math

import numpy

from mpmp.nn.cuda import _loader as L

# the in-place additions of activations: elementwise.py's kernels, under the NumPy module's names
from mpmp.nn.cuda.elementwise import add_, bias_add_  # noqa: F401  (re-exported: part of the mirror)
from mpmp.nn.cuda.gemm import batched_matmul, matmul

# Pure data movement: the array-module-agnostic NumPy code already runs on CuPy arrays of any
# storage (bf16 patterns move like any uint16), so the same functions serve both. Ring attention's
# blockwise kernels (context parallelism: block_mask ... normalize_block_probs) are the same NumPy
# code on CuPy arrays too, fp32 storage only, until fused (FlashAttention-style) twins land; so is
# generation's attention over a KV cache (attention_forward_kv: float32/float16, no bf16 cache).
from mpmp.nn.functional import (  # noqa: F401  (re-exported: part of the mirror)
    DIAGONAL,
    FULL,
    attention_block_backward,
    attention_block_forward,
    attention_blocks_finish,
    attention_delta,
    attention_forward_kv,
    block_mask,
    embedding_forward,
    merge_heads,
    merge_heads_qkv,
    normalize_block_probs,
    split_heads,
    split_heads_grad,
)


def _cp():
    import cupy

    return cupy


def _check_grad(g, what):
    if g.dtype != numpy.float32 or not g.flags.c_contiguous:
        raise TypeError(f"{what} must be a contiguous float32 gradient buffer, not {g.dtype}")


def _elementwise(file, name, n, *args, types):
    L.kernel(file, name, *types)((L.blocks_for(n),), (L.THREADS,), args)


def _column_sums(partial_kernel, out_grads, rows, cols, *inputs, t):
    """out_grads[i] += column sums of a [rows, cols] quantity, deterministic in two kernels: parts of
    the rows give partial sums (partial_kernel), which column_sum_finish adds in order."""
    cp = _cp()
    parts = max(1, min(128, -(-rows // 128)))
    partial = cp.empty((len(out_grads), parts, cols), dtype=cp.float32)
    grid = (-(-cols // 32), parts)
    L.kernel(*partial_kernel, t)(grid, (32, 32), (partial, *inputs, L.i32(rows), L.i32(cols)))
    finish = L.kernel("linear.cu", "column_sum_finish")
    for i, g in enumerate(out_grads):
        finish((-(-cols // L.THREADS),), (L.THREADS,), (g, partial[i], L.i32(parts), L.i32(cols)))


# ---------------------------------------------------------------------------------------------
# Linear (GPT-2's Conv1D layout: y = x @ W + b, W is [in, out])
# ---------------------------------------------------------------------------------------------


def linear_forward(x, w, b=None):
    """x [..., in] @ w [in, out] (+ b [out]). The cache is the input, needed for dW."""
    x2 = x.reshape(-1, x.shape[-1])
    y = matmul(x2, w)
    if b is not None:
        _elementwise("linear.cu", "bias_add", y.size, y, b, L.i64(y.size), L.i32(y.shape[1]), types=(L.ctype(y),))
    return y.reshape(*x.shape[:-1], w.shape[1]), x


def linear_backward_input(dy, w):
    """dx = dy @ W^T: the input-gradient half (B in zero-bubble terms)."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    return matmul(dy2, w, trans_b=True).reshape(*dy.shape[:-1], w.shape[0])


def linear_backward_weight(dy, x, dw, db=None):
    """dW += x^T @ dy and db += sum(dy): the weight-gradient half (W), accumulated in place in fp32."""
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    _check_grad(dw if dw.flags.c_contiguous else dw.T, "dw")
    matmul(x2, dy2, out=dw, trans_a=True, accumulate=True)
    if db is not None:
        bias_backward(dy, db)


def bias_backward(dy, db):
    """db += dy summed over every position, in fp32 (deterministic two-stage column sums)."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    _check_grad(db, "db")
    _column_sums(("linear.cu", "bias_grad_partial"), [db], *dy2.shape, dy2, t=L.ctype(dy2))


# ---------------------------------------------------------------------------------------------
# Embedding lookup (the forward, a gather, is the NumPy function itself: see the imports)
# ---------------------------------------------------------------------------------------------


def embedding_backward(dout, ids, dweight):
    """Scatter-add dout [..., D] into the rows of dweight that ids selected (atomics: repeated ids
    add in no fixed order)."""
    _check_grad(dweight, "dweight")
    cp = _cp()
    d = dout.shape[-1]
    flat_ids = cp.ascontiguousarray(ids.reshape(-1), dtype=cp.int64)
    flat_d = cp.ascontiguousarray(dout.reshape(-1, d))
    n = flat_ids.size
    L.kernel("embedding.cu", "embedding_backward", L.ctype(flat_d))(
        (L.rows_grid(n),), (L.THREADS,), (dweight, flat_d, flat_ids, L.i64(n), L.i32(d))
    )


# ---------------------------------------------------------------------------------------------
# Layer norm (over the last dimension)
# ---------------------------------------------------------------------------------------------


def layernorm_forward(x, w, b, eps=1e-5):
    cp = _cp()
    x = cp.ascontiguousarray(x)
    d = x.shape[-1]
    rows = x.size // d
    y, xhat = cp.empty_like(x), cp.empty_like(x)
    rstd = cp.empty(x.shape[:-1] + (1,), dtype=cp.float32)
    L.kernel("layernorm.cu", "layernorm_forward", L.ctype(x))(
        (L.rows_grid(rows),), (L.THREADS,), (y, xhat, rstd, x, w, b, L.i32(rows), L.i32(d), L.f32(eps))
    )
    return y, (xhat, rstd, w)


def layernorm_backward(dy, cache, dw, db):
    """Returns dx; accumulates dw, db. dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w."""
    xhat, rstd, w = cache
    cp = _cp()
    dy = cp.ascontiguousarray(dy)
    d = dy.shape[-1]
    rows = dy.size // d
    t = L.ctype(dy)
    dx = cp.empty_like(dy)
    L.kernel("layernorm.cu", "layernorm_backward_input", t)(
        (L.rows_grid(rows),), (L.THREADS,), (dx, dy, xhat, rstd, w, L.i32(rows), L.i32(d))
    )
    _check_grad(dw, "dw")
    _check_grad(db, "db")
    _column_sums(("layernorm.cu", "layernorm_param_grad_partial"), [dw, db], rows, d, dy, xhat, t=t)
    return dx


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation (GPT-2's "gelu_new"), and fused with the bias before it
# ---------------------------------------------------------------------------------------------


def gelu_forward(x):
    cp = _cp()
    x = cp.ascontiguousarray(x)
    y, t = cp.empty_like(x), cp.empty_like(x)
    _elementwise("gelu.cu", "gelu_forward", x.size, y, t, x, L.i64(x.size), types=(L.ctype(x),))
    return y, (x, t)


def gelu_backward(dy, cache):
    """d/dx 0.5x(1+t) = 0.5(1+t) + 0.5x(1-t^2) c (1 + 3a x^2)."""
    x, t = cache
    cp = _cp()
    dy = cp.ascontiguousarray(dy)
    dx = cp.empty_like(dy)
    _elementwise("gelu.cu", "gelu_backward", dx.size, dx, dy, x, t, L.i64(dx.size), types=(L.ctype(dy),))
    return dx


def bias_gelu_forward(h, b):
    """y = gelu(h + b) over h [..., C], b [C]. h is overwritten with x = h + b (rounded to the storage
    type), which is the whole cache: (x,). The backward recomputes tanh from x."""
    if not h.flags.c_contiguous:
        raise ValueError("bias_gelu_forward writes h + b into h, which must be contiguous")
    y = _cp().empty_like(h)
    _elementwise(
        "gelu.cu", "bias_gelu_forward", h.size, y, h, b, L.i64(h.size), L.i32(h.shape[-1]), types=(L.ctype(h),)
    )
    return y, (h,)


def bias_gelu_backward(dy, cache, db):
    """Returns dh = dy * gelu'(x); accumulates db += sum over rows of dh (float32)."""
    (x,) = cache
    cp = _cp()
    dy = cp.ascontiguousarray(dy)
    dh = cp.empty_like(dy)
    t = L.ctype(dy)
    _elementwise("gelu.cu", "bias_gelu_backward", dh.size, dh, dy, x, L.i64(dh.size), types=(t,))
    _check_grad(db, "db")
    cols = dh.shape[-1]
    _column_sums(("linear.cu", "bias_grad_partial"), [db], dh.size // cols, cols, dh, t=t)
    return dh


# ---------------------------------------------------------------------------------------------
# Causal multi-head attention core: softmax(q k^T / sqrt(hd) + mask) v
# ---------------------------------------------------------------------------------------------


def _attention_probs(qs, k):
    """softmax(qs k^T + causal mask) over the last axis in the storage type; the scores in fp32."""
    cp = _cp()
    s = batched_matmul(qs, k, trans_b=True, out_dtype=cp.float32)
    p = s if qs.dtype == cp.float32 else cp.empty(s.shape, dtype=qs.dtype)  # in place when fp32
    t = s.shape[-1]
    rows = s.size // t
    L.kernel("softmax.cu", "causal_softmax_forward", L.ctype(p))(
        (L.rows_grid(rows),), (L.THREADS,), (p, s, L.i64(rows), L.i32(t))
    )
    return p


def _scaled(x, alpha):
    cp = _cp()
    x = cp.ascontiguousarray(x)
    out = cp.empty_like(x)
    _elementwise("elementwise.cu", "scale", x.size, out, x, L.f32(alpha), L.i64(x.size), types=(L.ctype(x),))
    return out


def attention_forward(q, k, v, keep_probs=True):
    """q, k, v [B, H, T, hd] -> out [B, H, T, hd].

    The scale 1/sqrt(hd) is applied to q. keep_probs=False is selective recomputation (arXiv
    2205.05198 §5): the probabilities are rebuilt from q and k in backward instead of kept. The
    [B, H, T, T] scores are materialised (fp32, transient) and only the causal half is used: a fused
    FlashAttention kernel would avoid both.
    """
    cp = _cp()
    qs = _scaled(q, 1.0 / math.sqrt(q.shape[-1]))
    k, v = cp.ascontiguousarray(k), cp.ascontiguousarray(v)
    p = _attention_probs(qs, k)
    out = batched_matmul(p, v)
    return out, (qs, k, v, p if keep_probs else None)


def attention_backward(dout, cache):
    """Returns dq, dk, dv for the upstream gradient dout [B, H, T, hd]."""
    qs, k, v, p = cache
    cp = _cp()
    if p is None:
        p = _attention_probs(qs, k)
    dout = cp.ascontiguousarray(dout)
    dv = batched_matmul(p, dout, trans_a=True)
    dp = batched_matmul(dout, v, trans_b=True, out_dtype=cp.float32)
    # softmax backward: ds = p * (dp - sum(dp * p)), in place over dp when fp32
    ds = dp if p.dtype == cp.float32 else cp.empty(dp.shape, dtype=p.dtype)
    t = dp.shape[-1]
    rows = dp.size // t
    L.kernel("softmax.cu", "causal_softmax_backward", L.ctype(p))(
        (L.rows_grid(rows),), (L.THREADS,), (ds, p, dp, L.i64(rows), L.i32(t))
    )
    dq = batched_matmul(ds, k, alpha=1.0 / math.sqrt(qs.shape[-1]))
    dk = batched_matmul(ds, qs, trans_a=True)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy, optionally over a vocabulary split across ranks
# ---------------------------------------------------------------------------------------------


def _identity(x):
    return x


def cross_entropy_forward(
    logits, targets, scale, *, vocab_start=0, vocab_valid=None, all_reduce_max=_identity, all_reduce_sum=_identity
):
    """scale * sum over rows of -log softmax(logits)[target]; logits [N, V_local] are overwritten
    with exp(logits - max), as on the NumPy side. The two all-reduce callables combine the row max,
    then (target logit, sum of exponentials) stacked as one [2, N] float32 array, over the ranks that
    split the vocabulary. Returns (loss, cache); loss is a 0-d float64 device array."""
    cp = _cp()
    if not logits.flags.c_contiguous:
        raise ValueError("cross_entropy_forward overwrites logits, which must be contiguous")
    n, v_local = logits.shape
    valid = v_local if vocab_valid is None else min(vocab_valid, v_local)
    t = L.ctype(logits)
    row_max = cp.empty(n, dtype=cp.float32)
    L.kernel("cross_entropy.cu", "cross_entropy_row_max", t)(
        (n,), (L.THREADS,), (row_max, logits, L.i32(v_local), L.i32(valid))
    )
    row_max = all_reduce_max(row_max)
    both = cp.empty((2, n), dtype=cp.float32)
    safe_t, own = cp.empty(n, dtype=cp.int32), cp.empty(n, dtype=cp.bool_)
    flat_t = cp.ascontiguousarray(targets.reshape(-1), dtype=cp.int64)
    L.kernel("cross_entropy.cu", "cross_entropy_exp_sum", t)(
        (n,),
        (L.THREADS,),
        (logits, both, safe_t, own, row_max, flat_t, L.i64(vocab_start), L.i32(n), L.i32(v_local), L.i32(valid)),
    )
    both = all_reduce_sum(both)
    target_logit, sum_exp = both[0], both[1]
    per_row = cp.log(sum_exp) - target_logit
    loss = per_row.sum(dtype=cp.float64) * scale  # stays on the device: no synchronisation here
    return loss, (logits, sum_exp, cp.arange(n), safe_t, own, scale)


def cross_entropy_backward(cache):
    """d loss / d logits = scale * (softmax - onehot(target)); reuses the exponentials in place."""
    exp_logits, sum_exp, rows, safe_t, own, scale = cache
    n, v_local = exp_logits.shape
    sum_exp = _cp().ascontiguousarray(sum_exp)
    L.kernel("cross_entropy.cu", "cross_entropy_backward", L.ctype(exp_logits))(
        (n,), (L.THREADS,), (exp_logits, sum_exp, safe_t, own, L.f32(scale), L.i32(v_local))
    )
    return exp_logits
