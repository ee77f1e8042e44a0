"""What each unit's forward and backward compute: matrix products, elementwise traffic, kernel calls.

Two inventories, chosen by the profile's `kernels`:
  numpy  every pass mpmp's NumPy kernels make (nn/functional.py, nn/layers.py, nn/parallel.py,
         model/gpt.py), one entry per NumPy call, with the elements it writes and how many arrays of
         that size it touches;
  fused  one read and one write per fused elementwise region (LayerNorm, scale-mask-softmax, bias-GELU,
         residual add), as Megatron's kernels do (arXiv 2104.04473 §4.2); no dropout, as mpmp has none.

An op is ("gemm", m, k, n, batch), ("ew", elements, bytes per element, calls) (a kernel reading and
writing that many bytes per element of its output, `calls` times), ("exp", elements) (NumPy's exp or
tanh, which run at their own rate) or ("scatter", elements) (np.add.at, the embedding gradient). The
three passes of a unit are F (forward), B (input gradient: what a split backward runs first) and W
(weight gradients).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One rank's view of a micro-batch: b sequences of s tokens, hidden d, heads over tp ranks."""

    b: int
    s: int
    d: int
    heads: int
    tp: int
    sp: bool
    vocab_local: int
    recompute: str
    numpy: bool  # the NumPy inventory, else fused
    rounding: bool  # NumPy emulation of bf16/fp16: every module output and gradient is rounded
    e: int  # bytes of an activation element (2 for native bf16/fp16, else 4)
    dropout: bool = False  # Megatron's GPT: on the attention probabilities and both residual branches

    def ew(self, n, touches=3, calls=1, itemsize=None):
        """calls elementwise kernels over n elements, each touching `touches` arrays of that size."""
        return ("ew", n, touches * (itemsize or self.e), calls)

    @property
    def tokens(self):
        return self.b * self.s

    @property
    def local(self):  # tokens in the LayerNorm/residual regions: sharded by sequence under SP
        return self.tokens // self.tp if self.sp else self.tokens

    @property
    def dl(self):  # hidden columns of one tp rank
        return self.d // self.tp

    @property
    def probs(self):  # attention probabilities of one rank
        return self.b * (self.heads // self.tp) * self.s * self.s


@dataclass(frozen=True)
class Passes:
    F: tuple
    B: tuple
    W: tuple


def layernorm(n_rows, d, x: Shape, backward=False):
    if not x.numpy:
        return [x.ew(n_rows * d, 3 if backward else 2)]
    if backward:  # 10 passes over [n, d] (weight grads included), small ones over d
        return [x.ew(n_rows * d, 3, 10), x.ew(d, 2, 2)]
    return [x.ew(n_rows * d, 3, 6), x.ew(n_rows, 2, 3)]  # mean, centre, var (a row dot), scale, affine (2)


def _round(n, x: Shape):
    return [x.ew(n, 2, 5)] if x.numpy and x.rounding else []


def attention_core(x: Shape, backward=False):
    """softmax(q k^T / sqrt(hd)) v over this rank's heads; backward = dq, dk, dv (and the selective
    recomputation of the probabilities)."""
    bh, s, hd = x.b * (x.heads // x.tp), x.s, x.d // x.heads
    scores = [("gemm", s, hd, s, bh)]
    # NumPy: + mask, row max, - max, exp, row sum, / sum; fused: one scale-mask-softmax kernel
    softmax = [x.ew(x.probs, 3, 5), ("exp", x.probs)] if x.numpy else [x.ew(x.probs, 2)]
    qkv = x.tokens * x.dl
    if not backward:
        scale = [x.ew(qkv, 2)] if x.numpy else []
        return scale + scores + softmax + [("gemm", s, s, hd, bh)]
    again = scores + softmax if x.recompute == "selective" else []
    grad = [x.ew(x.probs, 3, 4)] if x.numpy else [x.ew(x.probs, 3)]
    scale = [x.ew(qkv, 2)] if x.numpy else []
    return again + [("gemm", s, s, hd, bh), ("gemm", s, hd, s, bh)] + grad + [("gemm", s, s, hd, bh)] * 2 + scale


def _dropout(x: Shape):
    """Applying (forward) or back-propagating (backward) Megatron's three dropouts: the probabilities
    are read and written once more, and a one-byte mask per element is written or read."""
    if not x.dropout:
        return []
    return [x.ew(x.probs, 2), ("ew", x.probs, 1, 1), ("ew", x.local * x.d, 1, 2)]


def _linear(m, k, n, x: Shape, bias=True):
    """(F, B, W) of y = x W + b: the product; its bias add; dX; dW (accumulated) and db."""
    bias_f = [x.ew(m * n, 2)] if bias and x.numpy else []
    bias_w = [x.ew(m * n, 1)] if bias else []
    acc = [x.ew(k * n, 3)] if x.numpy else []
    return ([("gemm", m, k, n, 1)] + bias_f, [("gemm", m, n, k, 1)], [("gemm", k, m, n, 1)] + acc + bias_w)


def block(x: Shape) -> Passes:
    """A transformer block: ln_1, c_attn, attention, c_proj, residual, ln_2, c_fc, GELU, c_proj, residual."""
    t, tl, d, dl = x.tokens, x.local, x.d, x.dl
    qkv, proj, fc, fc2 = (
        _linear(t, d, 3 * dl, x),
        _linear(t, dl, d, x),
        _linear(t, d, 4 * dl, x),
        _linear(t, 4 * dl, d, x),
    )
    # NumPy copies heads apart (split_heads: three copies) and back (merge_heads: one); the gradients
    # the other way round. Megatron's layout avoids both.
    split, merge = ([x.ew(t * dl, 2, 3)], [x.ew(t * dl, 2)]) if x.numpy else ([], [])
    gelu_f = [x.ew(4 * t * dl, 3, 8), ("exp", 4 * t * dl)] if x.numpy else [x.ew(4 * t * dl, 2)]
    gelu_b = [x.ew(4 * t * dl, 3, 9)] if x.numpy else [x.ew(4 * t * dl, 3)]
    residual = [x.ew(tl * d, 3)]
    forward = (
        layernorm(tl, d, x)
        + qkv[0]
        + split
        + attention_core(x)
        + merge
        + proj[0]
        + residual
        + layernorm(tl, d, x)
        + fc[0]
        + gelu_f
        + fc2[0]
        + residual
        + _round(tl * d, x)
        + _dropout(x)
    )
    backward = (
        fc2[1]
        + gelu_b
        + fc[1]
        + layernorm(tl, d, x, True)
        + residual
        + proj[1]
        + merge
        + attention_core(x, True)
        + split
        + qkv[1]
        + layernorm(tl, d, x, True)
        + residual
        + _round(tl * d, x)
        + _dropout(x)
    )
    if x.recompute == "full":
        backward = forward + backward
    return Passes(tuple(forward), tuple(backward), tuple(fc2[2] + fc[2] + proj[2] + qkv[2]))


def embedding(x: Shape) -> Passes:
    """Token lookup in this rank's vocabulary rows (masked outside it), plus positions."""
    t, tl, d = x.tokens, x.local, x.d
    if not x.numpy:
        return Passes((x.ew(t * d, 2), x.ew(tl * d, 3)), (), (("scatter", t * d), x.ew(tl * d, 1)))
    masks = [x.ew(t, 2, 5)]  # local ids, the outside mask, where
    zero = [x.ew(t * d, 2)] if x.tp > 1 else []
    forward = masks + [x.ew(t * d, 2)] + zero + [x.ew(tl * d, 3)] + _round(tl * d, x)
    backward = zero * 2
    return Passes(tuple(forward), tuple(backward), (("scatter", t * d), x.ew(tl * d, 1), x.ew(x.s * d, 3)))


def head(x: Shape) -> Passes:
    """ln_f, the tied output layer (logits over this rank's vocabulary) and the cross-entropy."""
    t, tl, d, v = x.tokens, x.local, x.d, x.vocab_local
    logits = _linear(t, d, v, x, bias=False)
    if x.numpy:  # max, subtract, exp, sum (forward); divide, scale (backward)
        ce_f, ce_b = [x.ew(t * v, 3, 3), ("exp", t * v), x.ew(t, 2, 8)], [x.ew(t * v, 3, 2), x.ew(t, 2, 2)]
    else:  # fp32 cross-entropy: read the logits twice, write the exponentials; one pass back
        ce_f, ce_b = [x.ew(2 * t * v, 3, itemsize=4)], [x.ew(2 * t * v, 2, itemsize=4)]
    forward = layernorm(tl, d, x) + logits[0] + ce_f
    backward = ce_b + logits[1] + layernorm(tl, d, x, True) + _round(tl * d, x)
    return Passes(tuple(forward), tuple(backward), tuple(logits[2]))


def optimizer(numel: int, mixed: bool, numpy_kernels: bool) -> tuple:
    """AdamW over a rank's flat buffer (optim/adamw.py, in 64K-element chunks), the gradient norm and
    zeroing the gradients; under bf16/fp16 also copying the fp32 masters back and rounding them."""
    if not numpy_kernels:  # one fused pass: read p, g, m, v, write p, m, v (+ 16-bit copy), norm, zero
        return (("ew", numel, 4 * (9 + (1 if mixed else 0)), 1),)
    chunk = min(1 << 16, numel)
    chunks = max(1, -(-numel // chunk))
    # per chunk: the 15 passes of adamw_update, and the norm's float64 square and sum
    ops = [("ew", numel, 8, 2), ("ew", chunk, 12, 15 * chunks), ("ew", chunk, 16, 2 * chunks)]
    return tuple(ops + ([("ew", numel, 8, 6)] if mixed else []))  # zero_grad, decay; masters, rounding
