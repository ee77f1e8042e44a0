"""Picking the next token over a vocabulary split across tensor-parallel ranks.

The head's logits stay split as the vocab-parallel output projection leaves them: each tp rank holds
the columns [start, start + V/tp). Rather than gathering whole rows of V logits, each rank sends
only its best candidates and every rank picks the same winner from the gathered candidates:

- greedy (temperature 0): each rank's (max, index): one all-gather of B x 2 numbers; ties go to the
  lowest index, as numpy.argmax over the whole row would.
- sampling: the Gumbel-max trick (argmax of logits/T + g, g ~ Gumbel(0, 1), is a draw from
  softmax(logits/T)) turns a draw into the same argmax. The noise of a row is drawn from a generator
  seeded by (seed, prompt, step) over the whole vocabulary, each rank keeping its own columns, so
  the same seed gives the same tokens on every layout.
- top-k (Hugging Face's TopKLogitsWarper: keep logits >= the k-th largest): each rank's k largest,
  one all-gather of B x k, the k-th largest of the union is the threshold.
- top-p (TopPLogitsWarper: keep the most probable tokens until their probability reaches p): each
  rank's c largest and the log-sum-exp of its columns, one all-gather of B x (c + 1); the first c of
  the merged candidates are the global top c, exact. A row whose nucleus reaches beyond them falls
  back to gathering its whole logits row (the only case that moves V numbers).

HF applies temperature, then top-k, then top-p; so does this. Tokens tied at a threshold are all kept.
Every collective runs in the ledger scope "sample" of the tp group.
"""

from dataclasses import dataclass

import numpy

from mpmp.backend import array_module, to_numpy
from mpmp.comm import ledger

TOP_P_CANDIDATES = 64  # per rank and row: a nucleus within the global top 64 needs no whole row


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY_SAMPLING = Sampling()


@dataclass(frozen=True)
class VocabShard:
    """This rank's columns of the vocabulary: [start, start + size); `vocab` is the unpadded V."""

    start: int
    size: int
    vocab: int


def next_tokens(logits, *, shard: VocabShard, group, sampling: Sampling, prompts, step: int) -> numpy.ndarray:
    """The next token of each row [B] (int64, the same on every tp rank) from this rank's logits
    [B, V/tp]. prompts: each row's global prompt index; step: tokens generated so far (the noise of a
    draw depends on both, never on the layout)."""
    xp = array_module(logits)
    with ledger.get().scope("sample"):
        x = logits.astype(xp.float64)
        if not sampling.greedy:
            x /= sampling.temperature
            if sampling.top_k:
                _mask_below(x, _top_k_threshold(x, sampling.top_k, group))
            if sampling.top_p < 1:
                _mask_below(x, _top_p_threshold(x, sampling.top_p, group))
            x += xp.asarray(gumbel_noise(prompts, step, sampling.seed, shard))
        return _vocab_parallel_argmax(x, shard.start, group)


def gumbel_noise(prompts, step: int, seed: int, shard: VocabShard) -> numpy.ndarray:
    """[B, V/tp] Gumbel(0, 1) noise: row i is columns [start, start + size) of the V draws of the
    generator seeded (seed, prompts[i], step); padding columns get 0 (their logits are -inf)."""
    out = numpy.zeros((len(prompts), shard.size))
    with numpy.errstate(divide="ignore"):  # u = 0 gives -inf noise: that column is never chosen
        for i, prompt in enumerate(prompts):
            u = numpy.random.default_rng([seed, int(prompt), step]).random(shard.vocab)
            part = -numpy.log(-numpy.log(u[shard.start : shard.start + shard.size]))
            out[i, : part.size] = part
    return out


def _vocab_parallel_argmax(x, start: int, group) -> numpy.ndarray:
    """argmax over the whole row from each rank's (max, global index): one all-gather of [B, 2]."""
    xp = array_module(x)
    local = x.argmax(axis=1)
    best = x[xp.arange(x.shape[0]), local]
    mine = numpy.stack([to_numpy(best), to_numpy(local).astype(numpy.float64) + start], axis=1)
    every = group.all_gather(mine[None])  # [tp, B, 2], in rank order = in vocabulary order
    winner = every[:, :, 0].argmax(axis=0)  # the first rank with the maximum: the lowest index on ties
    return every[winner, numpy.arange(every.shape[1]), 1].astype(numpy.int64)


def _mask_below(x, threshold):
    """Logits below their row's threshold [B] take no probability."""
    xp = array_module(x)
    x[x < xp.asarray(threshold)[:, None]] = -xp.inf


def _local_top(x, c: int) -> numpy.ndarray:
    """This rank's c largest logits of each row, descending, padded with -inf to c columns [B, c]."""
    xp = array_module(x)
    n = min(c, x.shape[1])
    top = xp.sort(xp.partition(x, x.shape[1] - n, axis=1)[:, -n:], axis=1)[:, ::-1]
    out = numpy.full((x.shape[0], c), -numpy.inf)
    out[:, :n] = to_numpy(top)
    return out


def _merged(every) -> numpy.ndarray:
    """[tp, B, c] candidates -> [B, tp*c] sorted descending."""
    rows = every.transpose(1, 0, 2).reshape(every.shape[1], -1)
    return -numpy.sort(-rows, axis=1)


def _top_k_threshold(x, k: int, group) -> numpy.ndarray:
    """The k-th largest logit of each whole row: every global top-k logit is in its rank's local top k."""
    every = group.all_gather(_local_top(x, k)[None])
    return _merged(every)[:, k - 1]


def _top_p_threshold(x, p: float, group) -> numpy.ndarray:
    """The smallest logit of each row's nucleus: the most probable tokens whose probability reaches p."""
    xp = array_module(x)
    c = TOP_P_CANDIDATES
    m = x.max(axis=1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)  # a row of only -inf (all masked here) has log sum exp -inf
    with numpy.errstate(divide="ignore"):
        lse = to_numpy(m[:, 0] + xp.log(xp.exp(x - m).sum(axis=1)))  # log sum exp of my columns
    mine = numpy.concatenate([_local_top(x, c), lse[:, None]], axis=1)
    every = group.all_gather(mine[None])  # [tp, B, c + 1]
    total = numpy.logaddexp.reduce(every[:, :, c], axis=0)  # log of the softmax's denominator
    top = _merged(every[:, :, :c])
    exact = c if c < x.shape[1] else top.shape[1]  # all of them when each rank sent every column
    cum = numpy.cumsum(numpy.exp(top[:, :exact] - total[:, None]), axis=1)
    reach = (cum < p).sum(axis=1)  # index of the token whose probability takes the sum to p
    if (reach >= exact).any():  # a nucleus beyond the exact candidates: the whole rows (same on every rank)
        top = _merged(group.all_gather(to_numpy(x)[None]))
        cum = numpy.cumsum(numpy.exp(top - total[:, None]), axis=1)
        reach = numpy.minimum((cum < p).sum(axis=1), top.shape[1] - 1)
    return top[numpy.arange(top.shape[0]), reach]
