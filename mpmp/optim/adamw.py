"""AdamW exactly as torch.optim.AdamW (decoupled weight decay, bias correction), on flat buffers.

Parameters live in one contiguous buffer per rank (optim.buffer.FlatParams), so an update is a few
vectorised passes instead of a Python loop over tensors. The passes run over cache-sized chunks with
one scratch buffer: the update is memory-bound, and this keeps it in the CPU's caches. Weight decay
applies where decay_mask is 1 (matrices and embeddings), never to biases or LayerNorm parameters.
"""

import math

from mpmp.backend import array_module, for_blocks, is_device_array, on_helper_thread
from mpmp.config import AdamWConfig
from mpmp.optim.buffer import CHUNK


def runs(mask) -> list[tuple[int, int]]:
    """[lo, hi) runs where a 0/1 mask is 1."""
    import numpy

    m = numpy.asarray(mask.get() if hasattr(mask, "get") else mask) != 0
    edges = numpy.flatnonzero(numpy.diff(numpy.concatenate([[0], m.astype(numpy.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2])]


def adamw_update(
    param, grad, m, v, *, step: int, lr: float, hp: AdamWConfig, decay_runs=(), scratch=None, grad_scale=1.0
):
    """One AdamW step in place on flat arrays (step counts from 1), in torch's order of operations,
    with g = grad * grad_scale (clipping, loss scale) formed chunk by chunk; grad is not modified.
    The chunks are independent and spread over the kernel threads; scratch (2 x CHUNK) serves the
    calling thread, the others take their own."""
    xp = array_module(param)
    if hp.weight_decay:
        keep = 1 - lr * hp.weight_decay
        for lo, hi in decay_runs:
            param[lo:hi] *= keep  # decoupled decay: p <- p (1 - lr wd), before the moments
    consts = (math.sqrt(1 - hp.beta2**step), lr / (1 - hp.beta1**step), grad_scale)

    def chunk(lo, hi):
        mine = scratch is not None and not on_helper_thread()
        t = scratch[:, : hi - lo] if mine else xp.empty((2, hi - lo), dtype=param.dtype)
        _adamw_chunk((param[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi]), t, hp, consts)

    for_blocks(chunk, param.size, CHUNK)


def _adamw_chunk(arrays, t, hp, consts):
    """AdamW on one chunk of (param, grad, m, v), with two rows of scratch t."""
    xp = array_module(t)
    p, g, mc, vc = arrays
    bias2_sqrt, step_size, grad_scale = consts
    if grad_scale != 1.0:
        g = xp.multiply(g, grad_scale, out=t[1])
    xp.subtract(g, mc, out=t[0])  # m <- m + (1 - b1)(g - m)
    t[0] *= 1 - hp.beta1
    mc += t[0]
    xp.multiply(g, g, out=t[0])  # v <- b2 v + (1 - b2) g^2
    t[0] *= 1 - hp.beta2
    vc *= hp.beta2
    vc += t[0]
    xp.sqrt(vc, out=t[0])  # t <- sqrt(v) / sqrt(1 - b2^step) + eps
    t[0] /= bias2_sqrt
    t[0] += hp.eps
    xp.divide(mc, t[0], out=t[0])  # p <- p - lr / (1 - b1^step) * m / t
    t[0] *= step_size
    p -= t[0]


class AdamW:
    """State (m, v) for one flat parameter buffer or a slice of it. On a device the update is the
    fused kernel of mpmp/nn/cuda/optim.py (same arguments), which also takes a device skip flag."""

    def __init__(self, param, decay_mask, hp: AdamWConfig | None = None):
        xp = array_module(param)
        self.param, self.hp = param, hp or AdamWConfig()
        self.decay_runs = runs(decay_mask)
        self.m = xp.zeros_like(param)
        self.v = xp.zeros_like(param)
        self.step_count = 0
        if is_device_array(param):
            from mpmp.nn.cuda.optim import adamw_update as device_update

            self._update, self.scratch = device_update, None
        else:
            self._update = adamw_update
            self.scratch = xp.empty((2, min(CHUNK, max(1, param.size))), dtype=param.dtype)

    def step(self, grad, lr, grad_scale=1.0, *, skip=None):
        """skip (device only): an int32 flag; non-zero leaves everything as it was (fp16 overflow).
        The step is counted all the same: the caller takes it back once it has read the flag."""
        self.step_count += 1
        extra = {} if skip is None else {"skip": skip}
        self._update(
            self.param,
            grad,
            self.m,
            self.v,
            step=self.step_count,
            lr=lr,
            hp=self.hp,
            decay_runs=self.decay_runs,
            scratch=self.scratch,
            grad_scale=grad_scale,
            **extra,
        )

    def state_bytes(self) -> int:
        return self.m.nbytes + self.v.nbytes
