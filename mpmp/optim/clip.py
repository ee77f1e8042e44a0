"""Global gradient norm and clipping, counting each distinct parameter once whatever the layout.

Each rank sums the squares of the gradients it *owns for the norm* (norm_mask = 1): split tensors on
every tp rank, replicated tensors (LayerNorm, row-parallel biases, wpe) on tp rank 0 only, the tied
embedding on the first stage only, and under ZeRO only this rank's shard. One all-reduce over the
groups that partition the model (tp x pp, plus dp under ZeRO) gives the squared norm.
"""

import math

from mpmp.backend import array_module, for_blocks, on_helper_thread
from mpmp.optim.buffer import CHUNK


def local_sq_norm(grad, runs, scratch=None) -> float:
    """Sum of squares of grad over the [lo, hi) runs that count, in float64: each cache-sized chunk
    is squared into a float64 scratch buffer and summed there (no model-sized temporaries). The
    chunks spread over the kernel threads; scratch serves the calling thread, the others take their own."""
    xp = array_module(grad)
    scratch = xp.empty(CHUNK, dtype=xp.float64) if scratch is None else scratch
    chunks = [(a, min(a + CHUNK, hi)) for lo, hi in runs for a in range(lo, hi, CHUNK)]

    def squares(i, _):
        a, b = chunks[i]
        t = xp.empty(b - a, dtype=xp.float64) if on_helper_thread() else scratch[: b - a]
        xp.multiply(grad[a:b], grad[a:b], out=t, dtype=xp.float64)
        return t.sum()

    total = 0.0  # stays on the device until the end (one synchronisation on GPUs)
    for part in for_blocks(squares, len(chunks), 1):
        total = total + part
    return float(total)


def all_reduce_norm(local_sq: float, groups) -> float:
    """sqrt of the squared norms summed over the groups that partition the model."""
    from mpmp.backend import xp

    return math.sqrt(float(all_reduce_sq(xp().asarray([local_sq], dtype="float64"), groups)[0]))


def all_reduce_sq(total, groups):
    """A one-element float64 array of squared norms, summed in place over the groups that partition
    the model; returns it."""
    for g in groups:
        g.all_reduce(total)
    return total


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_: max_norm / (norm + 1e-6), never above 1; 0 disables."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
