"""Pure kernels of GPT-2, each forward beside its backward.

Every forward returns `(out, cache)`; the matching backward takes the upstream gradient and that cache.
Nothing here owns state or communicates: the tensor-parallel variants in `parallel.py` wrap these
kernels with collectives. Arrays are NumPy or CuPy; the dtype of the inputs is kept (float32 in
training, float64 in the finite-difference tests).
"""

import math

from mpmp.backend import array_module, for_blocks, is_device_array

# Elements per block of row-wise work: a block and its temporaries stay in a core's L2 cache, so the
# several passes of a kernel over a block read cache, not memory, and blocks spread over the
# rank's kernel threads (backend.for_blocks).
BLOCK = 1 << 15


def _rows(a):
    """a as [rows, last axis] (a view when a is contiguous)."""
    return a.reshape(-1, a.shape[-1])


def _row_blocks(fn, rows: int, cols: int) -> list:
    """fn(lo, hi) over blocks of rows of about BLOCK elements, on the kernel threads."""
    return for_blocks(fn, rows, max(1, BLOCK // max(1, cols)))


def _column_sums(parts, out):
    """out += the sum of per-block column sums (a gradient of a bias or a LayerNorm parameter)."""
    if not parts:
        return
    total = parts[0]
    for part in parts[1:]:
        total += part
    out += total


# ---------------------------------------------------------------------------------------------
# Linear (GPT-2's Conv1D layout: y = x @ W + b, W is [in, out])
# ---------------------------------------------------------------------------------------------


def linear_forward(x, w, b=None):
    """x [..., in] @ w [in, out] (+ b [out]). The cache is the input, needed for dW."""
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ w
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1]), x


def linear_backward_input(dy, w):
    """dx = dy @ W^T: the input-gradient half (B in zero-bubble terms)."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    return (dy2 @ w.T).reshape(*dy.shape[:-1], w.shape[0])


def linear_backward_weight(dy, x, dw, db=None):
    """dW += x^T @ dy and db += sum(dy): the weight-gradient half (W), accumulated in place."""
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dw += x2.T @ dy2
    if db is not None:
        bias_backward(dy, db)


def bias_backward(dy, db):
    """db += dy summed over every position (y = ... + b)."""
    dy2 = _rows(dy)
    _column_sums(_row_blocks(lambda lo, hi: dy2[lo:hi].sum(axis=0), *dy2.shape), db)


# ---------------------------------------------------------------------------------------------
# Embedding lookup
# ---------------------------------------------------------------------------------------------


def embedding_forward(ids, weight):
    """Rows of weight [V, D] at integer ids [...] -> [..., D]."""
    return weight[ids], ids


def embedding_backward(dout, ids, dweight):
    """Scatter-add dout [..., D] into the rows of dweight that ids selected."""
    xp = array_module(dout)
    flat_ids = ids.reshape(-1)
    flat_d = dout.reshape(-1, dout.shape[-1])
    if xp.__name__ == "numpy":
        xp.add.at(dweight, flat_ids, flat_d)
    else:  # cupyx.scatter_add is the CuPy spelling of ufunc.at
        import cupyx

        cupyx.scatter_add(dweight, flat_ids, flat_d)


# ---------------------------------------------------------------------------------------------
# Layer norm (over the last dimension)
# ---------------------------------------------------------------------------------------------


def layernorm_forward(x, w, b, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis. Cache: (xhat, rstd, w)."""
    xp = array_module(x)
    y, xhat = xp.empty_like(x), xp.empty_like(x)
    rstd = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    x2, y2, xhat2, rstd2 = _rows(x), _rows(y), _rows(xhat), _rows(rstd)

    def block(lo, hi):
        _layernorm_rows(x2[lo:hi], w, b, eps, (y2[lo:hi], xhat2[lo:hi], rstd2[lo:hi]))

    _row_blocks(block, *x2.shape)
    return y, (xhat, rstd, w)


def _layernorm_rows(x, w, b, eps, out):
    """layernorm_forward over a block of rows, into out = (y, xhat, rstd)."""
    xp = array_module(x)
    y, xhat, rstd = out
    xp.subtract(x, x.mean(axis=-1, keepdims=True), out=xhat)  # xc = x - mean
    var = _row_dot(xhat, xhat)
    var *= x.dtype.type(1 / x.shape[-1])  # mean(xc^2), one pass with no [rows, d] temporary
    var += eps
    xp.divide(1.0, xp.sqrt(var, out=var), out=rstd)  # rstd = 1 / sqrt(var + eps)
    xhat *= rstd  # xhat = (x - mean) * rstd
    xp.multiply(xhat, w, out=y)
    y += b  # y = xhat * w + b


def layernorm_backward(dy, cache, dw, db):
    """Returns dx; accumulates dw, db. dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w."""
    xhat, rstd, w = cache
    xp = array_module(dy)
    dx = xp.empty(xhat.shape, dtype=dy.dtype)
    dy2, xhat2, rstd2, dx2 = _rows(dy), _rows(xhat), _rows(rstd), _rows(dx)

    def block(lo, hi):
        return _layernorm_grad_rows(dy2[lo:hi], xhat2[lo:hi], rstd2[lo:hi], w, dx2[lo:hi])

    parts = _row_blocks(block, *dy2.shape)
    _column_sums([dw_part for dw_part, _ in parts], dw)
    _column_sums([db_part for _, db_part in parts], db)
    return dx


def _layernorm_grad_rows(dy, xhat, rstd, w, g):
    """layernorm_backward over a block of rows: dx into g; returns this block's (dw, db) sums."""
    xp = array_module(dy)
    xp.multiply(dy, xhat, out=g)
    parts = g.sum(axis=0), dy.sum(axis=0)  # dw = sum(dy * xhat), db = sum(dy)
    xp.multiply(dy, w, out=g)  # g = dy * w
    mean_gx = _row_dot(g, xhat)
    mean_gx *= dy.dtype.type(1 / dy.shape[-1])  # mean(g * xhat), one pass
    g -= g.mean(axis=-1, keepdims=True)  # g - mean(g)
    gx = xp.multiply(xhat, mean_gx)
    g -= gx  # ... - xhat * mean(g * xhat)
    g *= rstd  # ... * rstd = dx
    return parts


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation (GPT-2's "gelu_new")
# ---------------------------------------------------------------------------------------------

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    """y = 0.5 x (1 + tanh(c (x + a x^3))) = x s, s = 0.5 (1 + tanh(...)) (the sigmoid of twice the
    tanh's argument). Cache: (x, s): the backward is shortest in s."""
    xp = array_module(x)
    y, s = xp.empty_like(x), xp.empty_like(x)
    x2, y2, s2 = _rows(x), _rows(y), _rows(s)
    _row_blocks(lambda lo, hi: _gelu_rows(x2[lo:hi], y2[lo:hi], s2[lo:hi]), *x2.shape)
    return y, (x, s)


def _gelu_rows(x, y, s):
    """gelu_forward over a block of rows, into y and s."""
    xp = array_module(x)
    xp.multiply(x, x, out=s)
    s *= x.dtype.type(_GELU_A)
    s += 1
    s *= x
    s *= x.dtype.type(_GELU_C)  # inner = c (x + a x^3)
    xp.tanh(s, out=s)
    s += 1
    s *= 0.5  # s = 0.5 (1 + tanh(inner))
    xp.multiply(x, s, out=y)  # y = x s


def gelu_backward(dy, cache):
    """d/dx x s = s + x s (1 - s) 2c (1 + 3a x^2), since s is the sigmoid of 2 inner and
    d inner / dx = c (1 + 3a x^2)."""
    x, s = cache
    dx = array_module(x).empty_like(x)
    dy2, x2, s2, dx2 = _rows(dy), _rows(x), _rows(s), _rows(dx)
    _row_blocks(lambda lo, hi: _gelu_grad_rows(dy2[lo:hi], x2[lo:hi], s2[lo:hi], dx2[lo:hi]), *x2.shape)
    return dx


def _gelu_grad_rows(dy, x, s, dx):
    """gelu_backward over a block of rows, into dx."""
    xp = array_module(x)
    xp.multiply(x, x, out=dx)
    dx *= x.dtype.type(6 * _GELU_A * _GELU_C)
    dx += x.dtype.type(2 * _GELU_C)  # 2c (1 + 3a x^2)
    ds = xp.subtract(1, s)
    ds *= s  # s (1 - s)
    dx *= ds  # before the factor x: where s saturates (s (1 - s) = 0) a huge x gives 0, not inf * 0
    dx *= x
    dx += s  # s + x s (1 - s) 2c (1 + 3a x^2)
    dx *= dy  # chain rule


def bias_gelu_forward(h, b):
    """y = gelu(h + b) over h [..., C], b [C]: a linear layer's bias and the GELU after it, one step
    on the CUDA side. h is overwritten with x = h + b. The cache is gelu_forward's, (x, s); the CUDA
    twin keeps only (x,) and recomputes the tanh."""
    h += b
    return gelu_forward(h)


def bias_gelu_backward(dy, cache, db):
    """Returns dh = dy * gelu'(x); accumulates db += dh summed over every position (each block's
    column sums taken while it is in cache)."""
    x, s = cache
    dh = array_module(x).empty_like(x)
    dy2, x2, s2, dh2 = _rows(dy), _rows(x), _rows(s), _rows(dh)

    def block(lo, hi):
        _gelu_grad_rows(dy2[lo:hi], x2[lo:hi], s2[lo:hi], dh2[lo:hi])
        return dh2[lo:hi].sum(axis=0)

    _column_sums(_row_blocks(block, *x2.shape), db)
    return dh


# ---------------------------------------------------------------------------------------------
# Causal multi-head attention core: softmax(q k^T / sqrt(hd) + mask) v
# ---------------------------------------------------------------------------------------------

_masks = {}


def _causal_mask(xp, t, dtype):
    key = (xp.__name__, t, dtype)
    if key not in _masks:
        m = xp.triu(xp.full((t, t), -xp.inf, dtype=dtype), k=1)
        _masks[key] = m
    return _masks[key]


def _attention_probs(qs, k):
    """softmax(qs k^T + causal mask) over the last axis, qs already scaled by 1/sqrt(hd)."""
    return _causal_softmax_(qs @ k.swapaxes(-1, -2))


def _causal_softmax_(s):
    """The scores s [..., T, T] -> their causal softmax, in place."""
    s += _causal_mask(array_module(s), s.shape[-2], s.dtype)  # -inf above the diagonal
    return _softmax_(s)


def _softmax_(s):
    """The (masked) scores s -> softmax over the last axis, in place."""
    s -= s.max(axis=-1, keepdims=True)  # the row max subtracted: exp never overflows
    array_module(s).exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)  # p = exp(s) / sum exp(s)
    return s


def _head_blocks(fn, b: int, h: int, t: int):
    """fn(i, h0, h1) for sequence i and a group of its heads [h0, h1), over the kernel threads; the
    groups are as large as fit BLOCK * 4 scores [T, T] (the scores of a group stay in L2)."""
    group = max([g for g in range(1, h + 1) if h % g == 0 and g * t * t <= 4 * BLOCK] or [1])
    for_blocks(lambda lo, hi: fn(lo // h, lo % h, lo % h + hi - lo), b * h, group)


def attention_forward(q, k, v, keep_probs=True):
    """q, k, v [B, H, T, hd] -> out [B, H, T, hd].

    The scale 1/sqrt(hd) is applied to q (hd columns) rather than to the scores (T columns).
    keep_probs=False is selective recomputation (arXiv 2205.05198 §5): the [B, H, T, T] probabilities,
    the largest activation of a layer, are rebuilt from q and k in backward instead of kept.
    Groups of heads run on the kernel threads, each from its scores to its output while they are in
    cache. out is a view of a [B, T, H, hd] array, so merge_heads needs no copy.
    """
    xp = array_module(q)
    b, h, t, hd = q.shape
    qs = xp.empty(q.shape, dtype=q.dtype)
    out = xp.empty((b, t, h, hd), dtype=q.dtype).transpose(0, 2, 1, 3)
    p = xp.empty((b, h, t, t), dtype=q.dtype) if keep_probs else None
    scale = q.dtype.type(1.0 / math.sqrt(hd))

    def heads(i, h0, h1):
        qs_g, k_g = qs[i, h0:h1], k[i, h0:h1]
        xp.multiply(q[i, h0:h1], scale, out=qs_g)
        p_g = xp.matmul(qs_g, k_g.swapaxes(-1, -2), out=None if p is None else p[i, h0:h1])
        xp.matmul(_causal_softmax_(p_g), v[i, h0:h1], out=out[i, h0:h1])

    _head_blocks(heads, b, h, t)
    return out, (qs, k, v, p)


def attention_backward(dout, cache):
    """Returns dq, dk, dv for the upstream gradient dout [B, H, T, hd]: views of one [B, T, 3, H, hd]
    array, the layout merge_heads_qkv returns without a copy."""
    qs, k, v, p = cache
    xp = array_module(qs)
    b, h, t, hd = qs.shape
    dqkv = xp.empty((b, t, 3, h, hd), dtype=qs.dtype)
    dq, dk, dv = (dqkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
    scale = qs.dtype.type(1.0 / math.sqrt(hd))

    def heads(i, h0, h1):
        qs_g, k_g, v_g, do_g = qs[i, h0:h1], k[i, h0:h1], v[i, h0:h1], dout[i, h0:h1]
        p_g = _attention_probs(qs_g, k_g) if p is None else p[i, h0:h1]
        xp.matmul(p_g.swapaxes(-1, -2), do_g, out=dv[i, h0:h1])
        ds = _softmax_backward_(xp.matmul(do_g, v_g.swapaxes(-1, -2)), p_g)
        xp.multiply(xp.matmul(ds, k_g, out=dq[i, h0:h1]), scale, out=dq[i, h0:h1])
        xp.matmul(ds.swapaxes(-1, -2), qs_g, out=dk[i, h0:h1])

    _head_blocks(heads, b, h, t)
    return dq, dk, dv


def _softmax_backward_(dp, p):
    """ds = p * (dp - sum(dp * p)) over the last axis, in place over dp: the row sums in one pass
    (a dot product per row, no [T, T] temporary)."""
    dp -= _row_dot(dp, p)
    dp *= p  # ds
    return dp


def _row_dot(a, b):
    """sum(a * b) over the last axis, keeping it: [..., 1]."""
    xp = array_module(a)
    if hasattr(xp, "vecdot"):
        return xp.vecdot(a, b)[..., None]
    return (a * b).sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Blockwise causal attention with the online softmax: the kernels of ring attention
# (Liu et al. 2023, "Ring Attention with Blockwise Transformers", arXiv 2310.01889; the rescaling and
# the saved log-sum-exp as in FlashAttention-2, arXiv 2307.08691 §3.1). A query chunk meets the key
# chunks one block at a time; its running row max m, row sum l and output numerator o absorb each
# block, so no [T, T] score matrix exists at once. nn/ring.py moves the key/value chunks.
# ---------------------------------------------------------------------------------------------

FULL, DIAGONAL = "full", "diagonal"


def block_mask(q_chunk: int, k_chunk: int) -> str | None:
    """The causal mask between two equal-length chunks of one sequence, by their chunk indices: every
    key of an earlier chunk is visible (FULL), of the same chunk the lower triangle (DIAGONAL), of a
    later chunk none (None: the block is skipped)."""
    if k_chunk < q_chunk:
        return FULL
    return DIAGONAL if k_chunk == q_chunk else None


def attention_block_forward(qs, k, v, stats, mask):
    """Absorb one (query chunk, key chunk) block into the query chunk's online softmax.

    qs [B, H, c, hd] (scaled by 1/sqrt(hd)), k, v [B, H, c', hd]; stats = (o, m, l) of the blocks so
    far (None before the first): output numerator [B, H, c, hd], row max and row sum [B, H, c, 1],
    updated in place. Returns (stats, p, m): the block's exp(s - m), and the max it is relative to
    (probabilities once multiplied by exp(m - lse): normalize_block_probs).
    """
    xp = array_module(qs)
    s = qs @ k.swapaxes(-1, -2)
    if mask == DIAGONAL:
        s += _causal_mask(xp, s.shape[-1], s.dtype)
    m_new = s.max(axis=-1, keepdims=True)
    if stats is not None:
        o, m, l = stats
        m_new = xp.maximum(m, m_new)  # never -inf: every block's rows see at least one key
    s -= m_new
    p = xp.exp(s, out=s)  # p = exp(s - m_new)
    if stats is None:
        return (p @ v, m_new, p.sum(axis=-1, keepdims=True)), p, m_new
    corr = xp.exp(m - m_new)  # rescales what was summed relative to the old max
    l *= corr
    l += p.sum(axis=-1, keepdims=True)  # l = l·corr + rowsum(p)
    o *= corr
    o += p @ v  # o = o·corr + p v
    return (o, m_new, l), p, m_new


def attention_blocks_finish(stats):
    """(out, lse) of a query chunk from its final stats: out = o / l, lse = m + log l (the
    log-sum-exp of its scores, all backward needs to rebuild any block's probabilities)."""
    xp = array_module(stats[0])
    o, m, l = stats
    return o / l, m + xp.log(l)


def normalize_block_probs(p, m, lse):
    """A kept block's exp(s - m) -> its softmax probabilities exp(s - lse), in place."""
    xp = array_module(p)
    p *= xp.exp(m - lse)
    return p


def attention_delta(dout, out):
    """FlashAttention-2's D = rowsum(dout * out) [B, H, c, 1]: the softmax backward's sum(dp * p) of a
    query row over all its blocks, from quantities the query's rank holds."""
    return _row_dot(dout, out)


def attention_block_backward(dout, delta, qs, k, v, lse, *, mask, p=None):
    """Gradients of one block: (dqs, dk, dv), dqs with respect to the scaled queries (multiply by
    1/sqrt(hd) once, after summing over blocks). p: the block's kept probabilities, or None to rebuild
    them from qs, k and lse (selective recomputation, never the whole [T, T] at once)."""
    xp = array_module(qs)
    if p is None:
        p = qs @ k.swapaxes(-1, -2)
        if mask == DIAGONAL:
            p += _causal_mask(xp, p.shape[-1], p.dtype)
        p -= lse
        xp.exp(p, out=p)  # p = exp(s - lse)
    dv = p.swapaxes(-1, -2) @ dout
    ds = dout @ v.swapaxes(-1, -2)  # dp
    ds -= delta
    ds *= p  # ds = p * (dp - D)
    return ds @ k, ds.swapaxes(-1, -2) @ qs, dv


def attention_forward_kv(q, k, v):
    """Attention of the newest t positions over every position so far, for generation with a KV cache.

    q [B, H, t, hd]; k, v [B, H, T, hd] with T >= t (the cached positions, then the new ones). Query i
    sits at position T - t + i and sees keys 0 .. T - t + i: the causal mask shifted by the cache's
    length. No backward (inference only). With t == T it computes exactly attention_forward's numbers.
    """
    xp = array_module(q)
    t, big_t = q.shape[-2], k.shape[-2]
    qs = q * q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    s = qs @ k.swapaxes(-1, -2)  # [B, H, t, T]
    if t > 1:  # one new query (a decode step) sees every key: no mask
        s += _causal_mask(xp, t, q.dtype) if t == big_t else _offset_causal_mask(xp, t, big_t, q.dtype)
    return _softmax_(s) @ v


def _offset_causal_mask(xp, t, big_t, dtype):
    """[t, T]: -inf where key j lies after query i's position T - t + i."""
    return xp.triu(xp.full((t, big_t), -xp.inf, dtype=dtype), k=big_t - t + 1)


def split_heads(qkv, n_heads):
    """[B, T, 3*H*hd] (q, then k, then v columns) -> contiguous q, k, v of [B, H, T, hd]."""
    xp = array_module(qkv)
    b, t, three_d = qkv.shape
    hd = three_d // (3 * n_heads)
    parts = qkv.reshape(b, t, 3, n_heads, hd).transpose(2, 0, 3, 1, 4)
    return tuple(xp.ascontiguousarray(parts[i]) for i in range(3))


def merge_heads_qkv(dq, dk, dv):
    """Inverse of split_heads for the gradients: three [B, H, T, hd] -> [B, T, 3*H*hd]. No copy when
    they are already the three parts of one such array (as attention_backward returns them)."""
    xp = array_module(dq)
    b, h, t, hd = dq.shape
    whole = dq.base
    if whole is not None and whole is dk.base and whole is dv.base and whole.shape == (b, t, 3, h, hd):
        parts = tuple(whole[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        if all(_same_view(a, part) for a, part in zip((dq, dk, dv), parts)):
            return whole.reshape(b, t, 3 * h * hd)
    out = xp.empty((b, t, 3, h, hd), dtype=dq.dtype)
    out[:, :, 0] = dq.transpose(0, 2, 1, 3)
    out[:, :, 1] = dk.transpose(0, 2, 1, 3)
    out[:, :, 2] = dv.transpose(0, 2, 1, 3)
    return out.reshape(b, t, 3 * h * hd)


def _same_view(a, b) -> bool:
    """Whether two arrays are the same elements of the same memory in the same layout."""
    address = (lambda x: x.data.ptr) if is_device_array(a) else (lambda x: x.__array_interface__["data"][0])
    return a.strides == b.strides and a.shape == b.shape and address(a) == address(b)


def merge_heads(x):
    """[B, H, T, hd] -> [B, T, H*hd] (no copy when x is a transposed [B, T, H, hd] array, as
    attention_forward returns it)."""
    b, h, t, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * hd)


def split_heads_grad(d, n_heads):
    """Inverse of merge_heads for the gradient: [B, T, H*hd] -> contiguous [B, H, T, hd]."""
    xp = array_module(d)
    b, t, dh = d.shape
    return xp.ascontiguousarray(d.reshape(b, t, n_heads, dh // n_heads).transpose(0, 2, 1, 3))


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy, optionally over a vocabulary split across ranks
# ---------------------------------------------------------------------------------------------


def _identity(x):
    return x


def cross_entropy_forward(
    logits, targets, scale, *, vocab_start=0, vocab_valid=None, all_reduce_max=_identity, all_reduce_sum=_identity
):
    """scale * sum over rows of -log softmax(logits)[target]; logits [N, V_local] are overwritten.

    With a vocabulary split over ranks (Megatron's vocab-parallel cross-entropy, arXiv 1909.08053 §3),
    this rank holds columns [vocab_start, vocab_start + V_local); the row max, the target logit and
    the sum of exponentials are combined over ranks by the two all-reduce callables. Columns at or
    beyond vocab_valid (padding of a vocabulary not divisible by tp) are masked to -inf so they
    never take probability. Returns (loss, cache); loss is a Python float.
    """
    xp = array_module(logits)
    n, v_local = logits.shape
    if vocab_valid is not None and vocab_valid < v_local:
        logits[:, vocab_valid:] = -xp.inf
    row_max = all_reduce_max(logits.max(axis=1))
    logits -= row_max[:, None]
    local_t = targets.reshape(-1) - vocab_start
    own = (local_t >= 0) & (local_t < v_local)
    safe_t = xp.where(own, local_t, 0)
    rows = xp.arange(n)
    target_logit = xp.where(own, logits[rows, safe_t], 0).astype(logits.dtype)
    xp.exp(logits, out=logits)
    sum_exp = logits.sum(axis=1)
    both = all_reduce_sum(xp.stack([target_logit, sum_exp]))
    target_logit, sum_exp = both[0], both[1]
    per_row = xp.log(sum_exp) - target_logit
    loss = float(per_row.sum(dtype=xp.float64)) * scale
    return loss, (logits, sum_exp, rows, safe_t, own, scale)


def cross_entropy_backward(cache):
    """d loss / d logits = scale * (softmax - onehot(target)); reuses the exponentials in place."""
    exp_logits, sum_exp, rows, safe_t, own, scale = cache
    dlogits = exp_logits
    dlogits /= sum_exp[:, None]  # softmax
    dlogits[rows[own], safe_t[own]] -= 1  # - onehot(target), on the rank that owns the target
    dlogits *= dlogits.dtype.type(scale)
    return dlogits


# ---------------------------------------------------------------------------------------------
# In-place additions on activations. Plain operators here; on bf16 storage (uint16 bit patterns)
# the CUDA twins add the values, where `+=` would add the patterns as integers.
# ---------------------------------------------------------------------------------------------


def add_(a, b):
    """a += b in place (same shape); returns a."""
    a += b
    return a


def bias_add_(y, b):
    """y [..., C] += b [C] in place; returns y."""
    y += b
    return y
