"""Tensor parallelism, Megatron style (arXiv 1909.08053 §3), and sequence parallelism (arXiv 2205.05198).

The conjugate operators are plain functions in forward/backward pairs, named as in Megatron:

    f   copy_to_tp             forward identity              backward all-reduce
    g   reduce_from_tp         forward all-reduce            backward identity
    SP  gather_from_sp         forward all-gather (seq)      backward reduce-scatter (seq)
    SP  reduce_scatter_to_sp   forward reduce-scatter (seq)  backward all-gather (seq)

(Megatron's gather/scatter along the hidden axis have no use here: the vocab-parallel cross-entropy
never gathers the logits.)

With a tp group of size 1 every operator is the identity, so the layers below are the dense layers.
"""

import numpy

from mpmp.backend import array_module, is_device_array
from mpmp.nn.kernels import kernels
from mpmp.nn.layers import Parameter, defer

SEQ_AXIS = 1  # activations are [batch, sequence, hidden]

# ---------------------------------------------------------------------------------------------
# Megatron's operators
# ---------------------------------------------------------------------------------------------


def copy_to_tp(x, group):
    """f forward: every tp rank needs the whole input."""
    return x


def copy_to_tp_backward(dx, group):
    """f backward: each rank computed a partial input gradient; sum them."""
    return group.all_reduce(dx)


def reduce_from_tp(x, group):
    """g forward: sum the partial outputs of a row-parallel product (in place)."""
    return group.all_reduce(x)


def reduce_from_tp_backward(dx, group):
    return dx


def gather_from_sp(x, group):
    """SP: sequence shards -> the whole sequence, before a column-parallel linear."""
    return group.all_gather(x, axis=SEQ_AXIS)


def gather_from_sp_backward(dx, group):
    return group.reduce_scatter(dx, axis=SEQ_AXIS)


def reduce_scatter_to_sp(x, group):
    """SP: partial outputs of a row-parallel linear -> summed sequence shards."""
    return group.reduce_scatter(x, axis=SEQ_AXIS)


def reduce_scatter_to_sp_backward(dx, group):
    return group.all_gather(dx, axis=SEQ_AXIS)


# ---------------------------------------------------------------------------------------------
# Sharding of full (interchange) tensors over tp ranks
# ---------------------------------------------------------------------------------------------
# split:  None     replicated
#         "col"    last axis in tp blocks (column-parallel weight [in, out] and its bias [out])
#         "row"    first axis in tp blocks (row-parallel weight [in, out])
#         "qkv"    last axis is [q | k | v], each split by heads: rank r owns heads r*H/tp...
#         "vocab"  first axis (vocabulary) padded to a multiple of tp, then in tp blocks


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp


def shard(full, split, rank: int, size: int):
    """This rank's part of a full tensor."""
    xp = array_module(full)
    if split is None or size == 1 and split != "vocab":
        return xp.array(full, copy=True)
    if split == "col":
        return xp.ascontiguousarray(xp.split(full, size, axis=-1)[rank])
    if split == "row":
        return xp.ascontiguousarray(xp.split(full, size, axis=0)[rank])
    if split == "qkv":
        lead = full.shape[:-1]
        three = full.reshape(*lead, 3, full.shape[-1] // 3)
        part = xp.split(three, size, axis=-1)[rank]
        return xp.ascontiguousarray(part.reshape(*lead, -1))
    if split == "vocab":
        v = full.shape[0]
        vp = padded_vocab(v, size)
        padded = xp.zeros((vp,) + full.shape[1:], dtype=full.dtype)
        padded[:v] = full
        return xp.ascontiguousarray(xp.split(padded, size, axis=0)[rank])
    raise ValueError(f"unknown split {split!r}")


def unshard(parts, split, full_shape):
    """Inverse of shard: the full tensor from every rank's part (in tp-rank order)."""
    if split is None:
        return numpy.array(parts[0], copy=True)
    if split == "col":
        return numpy.concatenate(parts, axis=-1)
    if split == "row":
        return numpy.concatenate(parts, axis=0)
    if split == "qkv":
        lead = full_shape[:-1]
        threes = [p.reshape(*lead, 3, -1) for p in parts]
        return numpy.concatenate(threes, axis=-1).reshape(full_shape)
    if split == "vocab":
        return numpy.concatenate(parts, axis=0)[: full_shape[0]]
    raise ValueError(f"unknown split {split!r}")


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class _ParallelLinear:
    """A weight and an optional bias over a tp group (under SP, sequence-sharded activations)."""

    def __init__(self, weight: Parameter, bias: Parameter | None, group, sequence_parallel=False):
        self.weight, self.bias, self.group, self.sp = weight, bias, group, sequence_parallel
        self.F = kernels()

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]


class ColumnParallelLinear(_ParallelLinear):
    """y_r = x @ W[:, cols_r] + b[cols_r]: the input enters through f (or the SP all-gather).

    transpose=True stores the weight as [out, in] (the tied output head uses wte [V, D] directly).
    with_bias=False leaves the bias to the caller (the MLP adds it inside its GELU kernel).
    """

    def __init__(self, weight: Parameter, bias: Parameter | None, group, sequence_parallel=False, transpose=False):
        super().__init__(weight, bias, group, sequence_parallel)
        self.transpose = transpose

    def _w(self):
        return self.weight.data.T if self.transpose else self.weight.data

    def forward(self, x, *, with_bias=True):
        x_in = gather_from_sp(x, self.group) if self.sp else copy_to_tp(x, self.group)
        b = self.bias.data if with_bias and self.bias is not None else None
        return self.F.linear_forward(x_in, self._w(), b)

    def backward(self, dy, x_in, wgrad=None, *, with_bias=True):
        dx_in = self.F.linear_backward_input(dy, self._w())
        dw = self.weight.grad.T if self.transpose else self.weight.grad
        db = self.bias.grad if with_bias and self.bias is not None else None
        defer(wgrad, self.F.linear_backward_weight, dy, x_in, dw, db)
        return gather_from_sp_backward(dx_in, self.group) if self.sp else copy_to_tp_backward(dx_in, self.group)


class RowParallelLinear(_ParallelLinear):
    """y = g(x_r @ W[rows_r, :]) + b: partial products summed by g (or the SP reduce-scatter); the bias
    is added once, after the sum."""

    def forward(self, x):
        y, _ = self.F.linear_forward(x, self.weight.data)
        y = reduce_scatter_to_sp(y, self.group) if self.sp else reduce_from_tp(y, self.group)
        if self.bias is not None:
            y = self.F.bias_add_(y, self.bias.data)
        return y, x

    def backward(self, dy, x, wgrad=None):
        F = self.F
        if self.bias is not None:
            defer(wgrad, F.bias_backward, dy, self.bias.grad)
        dy_in = reduce_scatter_to_sp_backward(dy, self.group) if self.sp else reduce_from_tp_backward(dy, self.group)
        dx = F.linear_backward_input(dy_in, self.weight.data)
        defer(wgrad, F.linear_backward_weight, dy_in, x, self.weight.grad, None)
        return dx


class VocabParallelEmbedding:
    """Each tp rank holds rows [start, start + V/tp) of the (padded) vocabulary; a token outside that
    range looks up zeros, and the partial results are summed by g (or reduce-scattered under SP)."""

    def __init__(self, weight: Parameter, group, sequence_parallel=False):
        self.weight, self.group, self.sp = weight, group, sequence_parallel
        self.vocab_start = group.rank * weight.data.shape[0]
        self.F = kernels()

    def parameters(self):
        return [self.weight]

    def forward(self, ids):
        xp = array_module(self.weight.data)
        v_local = self.weight.data.shape[0]
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= v_local)
        local = xp.where(outside, 0, local)
        out, _ = self.F.embedding_forward(local, self.weight.data)
        if self.group.size > 1:
            _zero_rows(out, outside)
        out = reduce_scatter_to_sp(out, self.group) if self.sp else reduce_from_tp(out, self.group)
        return out, (local, outside)

    def backward(self, dy, cache, wgrad=None):
        local, outside = cache
        d = reduce_scatter_to_sp_backward(dy, self.group) if self.sp else dy
        if self.group.size > 1:
            d = d.copy() if d is dy else d
            _zero_rows(d, outside)
        defer(wgrad, self.F.embedding_backward, d, local, self.weight.grad)
        return None


def _zero_rows(a, mask):
    """a[mask] = 0 for a [..., D] and a boolean mask [...]. On a device, a multiplication by the
    inverted mask instead: boolean indexing counts the mask on the host (a synchronisation), while
    x * 0 = 0 holds for floats and for bf16 bit patterns alike."""
    if is_device_array(a):
        a *= ~mask[..., None]
    else:
        a[mask] = 0


def vocab_parallel_cross_entropy(logits, targets, scale, group, *, vocab_start, vocab_valid, F):
    """Forward of the cross-entropy over a vocabulary split across tp ranks: two all-reduces (the row
    max; the target logit stacked with the sum of exponentials). F: the caller's kernel module.
    Returns (loss, cache)."""
    return F.cross_entropy_forward(
        logits,
        targets,
        scale,
        vocab_start=vocab_start,
        vocab_valid=vocab_valid,
        # the loss stays fp32 under mixed precision (Megatron computes it in fp32 too)
        all_reduce_max=lambda a: group.all_reduce(a, "max", exact=True),
        all_reduce_sum=lambda a: group.all_reduce(a, "sum", exact=True),
    )
