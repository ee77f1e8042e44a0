"""Context parallelism: ring attention over the cp group (Liu et al. 2023, "Ring Attention with
Blockwise Transformers for Near-Infinite Context", arXiv 2310.01889; as Megatron-Core's context
parallelism lays it out).

The sequence is cut into 2·cp equal chunks and cp rank r holds chunks r and 2·cp - 1 - r
(comm/grid.context_chunks), so under the causal mask every rank does the same work. Each rank keeps
its queries; the keys and values travel around the ring r -> r + 1, one hop per step, and the hop of
step i + 1 is posted before the blocks of step i are computed (its transfer overlaps that work). The
blocks combine by the online softmax (nn/functional.py: attention_block_forward), so no rank ever
holds more than one block of scores at a time, nor keys and values beyond two chunks' worth.

The communication operators, in the style of tp's f and g (nn/parallel.py):

    pass_kv       post one hop of K|V: send to the next rank, receive from the previous one
    pass_dkv      post one hop of a partial dK|dV, the same way

and the forward/backward pair built on them:

    ring_attention_forward    cp - 1 hops of K|V
    ring_attention_backward   cp - 1 hops of K|V again (nothing of the others' chunks was kept), and
                              cp - 1 hops of partial dK|dV: the gradient of the chunk in hand follows
                              it around the ring, each rank adding its share, and its owner adds its
                              own share last, when it arrives home

Every hop is one batch of a send and a receive (batch_isend_irecv), as NCCL needs on a ring where
every rank sends. Per layer and micro-batch each rank therefore sends (and receives) cp - 1 messages forward and
2(cp - 1) backward, each 2·b·(H/tp)·(S/cp)·hd elements: its K and V chunks (cp - 1) times forward,
again backward, and the matching gradients. With a cp group of size 1 nothing is sent.
"""

import math
from dataclasses import dataclass

from mpmp.backend import array_module
from mpmp.comm.grid import context_chunks
from mpmp.nn import functional as F

KV_TAG, DKV_TAG = 0, 1  # the cp group is its own communicator: these tags tell only K|V from dK|dV
SEQ = -2  # attention tensors are [B, H, T, hd]


# ---------------------------------------------------------------------------------------------
# The cp operators: ring hops, posted early and waited on late
# ---------------------------------------------------------------------------------------------


class Pending:
    """Transfers in flight; wait() completes them and returns the received buffer (or None)."""

    def __init__(self, handles, received=None):
        self.handles, self.received = handles, received

    def wait(self):
        for h in self.handles:
            h.wait()
        return self.received


def ring_neighbours(group) -> tuple[int, int]:
    """(next, previous) group rank on the ring."""
    return (group.rank + 1) % group.size, (group.rank - 1) % group.size


def _hop(send, group, tag) -> Pending:
    """One hop of the ring as one batch: send to the next rank, receive the previous rank's message of
    the same shape (a batch, so NCCL, whose ungrouped sends wait for their receiver, cannot hang on
    a ring where every rank sends first)."""
    nxt, prev = ring_neighbours(group)
    incoming = array_module(send).empty_like(send)
    return Pending(group.batch_isend_irecv([("send", send, nxt, tag), ("recv", incoming, prev, tag)]), incoming)


def pass_kv(kv, group) -> Pending:
    """Send K|V to the next rank and receive the previous rank's; kv must stay unchanged until the
    Pending is waited on."""
    return _hop(kv, group, KV_TAG)


def pass_dkv(dkv, group) -> Pending:
    """Pass a partial dK|dV on to the next rank and receive the one the previous rank passes on; dkv
    must stay unchanged until the Pending is waited on."""
    return _hop(dkv, group, DKV_TAG)


# ---------------------------------------------------------------------------------------------
# Ring attention: forward and backward
# ---------------------------------------------------------------------------------------------


def _halves(x):
    """The two chunks of a rank's local sequence, as views."""
    c = x.shape[SEQ] // 2
    return x[..., :c, :], x[..., c:, :]


@dataclass
class _Blocks:
    """Which (query half, key half) blocks a step computes, and with which mask."""

    step: int
    pairs: list  # [(a, b, mask)]: query half a of this rank against key half b of the chunk in hand


def _blocks(step: int, rank: int, n: int) -> _Blocks:
    """At step i the rank holds the K|V of rank (r - i) mod n: its chunks against ours, by index."""
    mine, theirs = context_chunks(rank, n), context_chunks((rank - step) % n, n)
    pairs = [(a, b, F.block_mask(qa, kb)) for a, qa in enumerate(mine) for b, kb in enumerate(theirs)]
    return _Blocks(step, [(a, b, m) for a, b, m in pairs if m is not None])


def _absorb(stats, q_halves, kv, blocks: _Blocks, kept):
    """Forward of one step: every visible block of the chunk pair in hand into the online softmax."""
    k_halves, v_halves = _halves(kv[0]), _halves(kv[1])
    for a, b, mask in blocks.pairs:
        stats[a], p, m = F.attention_block_forward(q_halves[a], k_halves[b], v_halves[b], stats[a], mask)
        if kept is not None:
            kept[blocks.step, a, b] = (p, m)


def ring_attention_forward(q, k, v, group, *, keep_probs=True):
    """Causal attention of this cp rank's queries q [B, H, T, hd] against the whole sequence, whose
    keys and values k, v [B, H, T, hd] are spread over the group (T = S/cp: chunks r and 2cp-1-r).

    keep_probs=True keeps each computed block's probabilities for backward ((2cp + 1) blocks of
    [B, H, T/2, T/2]: the attention term of activation memory falls as 1/cp); False is selective
    recomputation: backward rebuilds them block by block from the saved log-sum-exp.
    Returns (out, cache).
    """
    xp = array_module(q)
    if q.shape[SEQ] % 2:
        raise ValueError(f"ring attention needs two equal chunks per rank, not a local sequence of {q.shape[SEQ]}")
    n, r = group.size, group.rank
    qs = q * q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    kv = xp.stack((k, v))  # one message per hop
    q_halves, stats, kept = _halves(qs), [None, None], {} if keep_probs else None
    held = kv
    for i in range(n):
        hop = pass_kv(held, group) if i < n - 1 else None  # the next chunk travels meanwhile
        _absorb(stats, q_halves, held, _blocks(i, r, n), kept)
        if hop is not None:
            held = hop.wait()
    (o0, lse0), (o1, lse1) = F.attention_blocks_finish(stats[0]), F.attention_blocks_finish(stats[1])
    out, lse = xp.concatenate((o0, o1), axis=SEQ), xp.concatenate((lse0, lse1), axis=SEQ)
    if kept is not None:
        lse_halves = (lse0, lse1)
        kept = {key: F.normalize_block_probs(p, m, lse_halves[key[1]]) for key, (p, m) in kept.items()}
    return out, (qs, kv, out, lse, kept)


@dataclass
class _Queries:
    """What backward needs of this rank's queries, split into its two chunks."""

    qs: tuple
    dout: tuple
    delta: tuple
    lse: tuple
    dqs: tuple  # gradient accumulators (views of one array)


def _block_grads(queries: _Queries, kv, blocks: _Blocks, kept):
    """Backward of one step: accumulates into queries.dqs; returns this rank's share of the dK|dV of
    the chunk pair in hand."""
    xp = array_module(kv)
    dkv = xp.zeros_like(kv)
    k_halves, v_halves = _halves(kv[0]), _halves(kv[1])
    dk_halves, dv_halves = _halves(dkv[0]), _halves(dkv[1])
    for a, b, mask in blocks.pairs:
        p = None if kept is None else kept[blocks.step, a, b]
        dq, dk, dv = F.attention_block_backward(
            queries.dout[a], queries.delta[a], queries.qs[a], k_halves[b], v_halves[b], queries.lse[a], mask=mask, p=p
        )
        queries.dqs[a][...] += dq
        dk_halves[b][...] += dk
        dv_halves[b][...] += dv
    return dkv


def ring_attention_backward(dout, cache, group):
    """Returns dq, dk, dv [B, H, T, hd] for this rank's chunks.

    Step i holds the K|V of rank r - i again and computes this rank's share of its gradient. The
    share of step 0 (our own chunks) waits; from step 1 on, the share is added to the partial that
    the previous rank passed on (none at step 1: that rank owns the chunk and adds its share last)
    and passed to the next rank, while the previous rank's next partial comes in. After cp - 1 hops
    the partial of our own chunks arrives from the previous rank, complete but for our share.
    """
    qs, kv, out, lse, kept = cache
    xp = array_module(qs)
    n, r = group.size, group.rank
    dqs = xp.zeros_like(qs)
    delta = F.attention_delta(dout, out)
    queries = _Queries(*(_halves(x) for x in (qs, dout, delta, lse, dqs)))
    held, partials, own = kv, None, None
    for i in range(n):
        hop = pass_kv(held, group) if i < n - 1 else None  # the next K|V travels meanwhile
        dkv = _block_grads(queries, held, _blocks(i, r, n), kept)
        if i == 0:
            own = dkv
        else:
            if partials is not None:  # posted a step ago, with the partial we passed on then
                dkv += partials.wait()
            partials = pass_dkv(dkv, group)  # at the last step, what comes in is our own chunks'
        if hop is not None:
            held = hop.wait()
    if partials is not None:
        own += partials.wait()
    dqs *= qs.dtype.type(1.0 / math.sqrt(qs.shape[-1]))
    return dqs, own[0], own[1]


class RingAttention:
    """The attention core of a context-parallel layer (nn/layers.Attention's `core`): the forward and
    backward above over a cp group."""

    def __init__(self, group, keep_probs=True):
        self.group, self.keep_probs = group, keep_probs

    def forward(self, q, k, v):
        return ring_attention_forward(q, k, v, self.group, keep_probs=self.keep_probs)

    def backward(self, dout, cache):
        return ring_attention_backward(dout, cache, self.group)
