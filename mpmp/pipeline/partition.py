"""Assigning the model's units (embedding, L blocks, head) to pipeline stages.

A partition cuts the unit sequence into pp·v contiguous, non-empty parts (one per virtual stage,
vs = chunk·pp + stage) that minimise the most expensive part. The cost of a unit is:
  uniform     1 per block; the embedding and head ride along with the first and last block
  parameters  its parameter count (the head counts the tied wte it multiplies by)
  time        its measured forward + backward time on a short profiling run (rank 0 measures,
              every rank receives the same numbers, so every rank computes the same split)
"""

import time

import numpy

from mpmp.config import ModelConfig
from mpmp.errors import ConfigError

METHODS = ("uniform", "parameters", "time")


def balanced_split(costs, parts: int) -> list[tuple[int, int]]:
    """Contiguous non-empty [start, end) ranges minimising the largest sum; among equally good splits
    (sums within 1e-12 count as equal), the earliest cuts.

    This is the dynamic programme best[k][i] = min over j of max(best[k-1][j], sum(costs[j:i])), with
    its tie rule (a later j replaces the best so far only if it is better by more than 1e-12), but each
    level is computed for all i at once in O(n log n): for costs >= 0, best[k-1][j] grows with j and
    sum(costs[j:i]) shrinks, so only the few j around their crossing can win (see _level). Negative or
    non-finite costs take the plain O(parts n^2) programme, which gives the same ranges, slowly.
    """
    n = len(costs)
    if parts > n:
        raise ConfigError(f"cannot split {n} units (embedding, blocks, head) into {parts} pipeline stages")
    values = numpy.asarray(costs, dtype=numpy.float64)
    prefix = numpy.concatenate([[0.0], numpy.cumsum(values, dtype=numpy.float64)])
    level = _level if numpy.all(values >= 0) and numpy.all(numpy.isfinite(values)) else _level_plain
    best = numpy.full(n + 1, numpy.inf)
    best[0] = 0.0
    cuts = []
    for k in range(1, parts + 1):
        i = numpy.arange(k, n - (parts - k) + 1)
        best, cut = level(best, prefix, k, i)
        cuts.append((i[0], cut))
    ranges, end = [], n
    for k in range(parts, 0, -1):
        first, cut = cuts[k - 1]
        start = int(cut[end - first])
        ranges.append((start, end))
        end = start
    return ranges[::-1]


_TIE = 1e-12  # sums closer than this are equally good: the earlier cut wins


def _level_plain(prev, prefix, k, i):
    """One level of the programme, j by j (any costs)."""
    best = numpy.full(prefix.size, numpy.inf)
    cut = numpy.zeros(i.size, dtype=numpy.int64)
    for row, end in enumerate(i.tolist()):
        for j in range(k - 1, end):
            value = max(prev[j], prefix[end] - prefix[j])
            if value < best[end] - _TIE:
                best[end], cut[row] = value, j
    return best, cut


def _level(prev, prefix, k, i):
    """One level for every end i at once, with exactly the plain scan's result (costs >= 0).

    The scan over j keeps a current best c and moves to j when v_j = max(prev[j], prefix[i] - prefix[j])
    < c - 1e-12. Its result depends only on where it is after the last j it certainly moves to: j moves
    for sure when v_j < rest_{j-1} - 1e-12, rest_{j-1} = prefix[i] - prefix[j-1] (every earlier v, hence c,
    is at least that). Such a j is found just before prev and the rest cross; from there the scan runs
    j by j (all ends in lockstep) until no later prev[j] can undercut c (suffix minimum of prev).
    """
    total = prefix[i]

    def value(j):
        return numpy.maximum(prev[j], total - prefix[j])

    def certain(j):
        rest = total - prefix[numpy.maximum(j - 1, 0)]
        return (j == k - 1) | (value(j) < rest - _TIE)

    # Where prev[j] + prefix[j-1] passes prefix[i], prev[j] passes the rest: a sorted search (prev grows
    # with j) proposes that j; any j the exact test refuses steps back, down to j = k-1 if need be.
    valid = numpy.arange(k - 1, i[-1])
    rising = prev[valid] + prefix[numpy.maximum(valid - 1, 0)]
    lo = k - 1 + numpy.searchsorted(rising, total - _TIE, side="left") - 1
    lo = numpy.clip(lo, k - 1, i - 1)
    while not numpy.all(ok := certain(lo)):
        lo = numpy.where(ok, lo, lo - 1)
    floor = numpy.minimum.accumulate(prev[::-1])[::-1]  # floor[j] = min(prev[j:])
    cur, cut = value(lo), lo.copy()
    j = lo + 1
    active = (j < i) & (floor[numpy.minimum(j, prefix.size - 1)] < cur - _TIE)
    while numpy.any(active):
        jj = numpy.where(active, j, lo)
        v = value(jj)
        move = active & (v < cur - _TIE)
        cur, cut = numpy.where(move, v, cur), numpy.where(move, jj, cut)
        j = j + 1
        active &= (j < i) & (floor[numpy.minimum(j, prefix.size - 1)] < cur - _TIE)
    best = numpy.full(prefix.size, numpy.inf)
    best[i] = cur
    return best, cut


def unit_costs(cfg: ModelConfig, method: str, measured=None) -> list[float]:
    if method not in METHODS:
        raise ConfigError(f"--partition must be one of {', '.join(METHODS)}, not {method!r}")
    L, V, D, S = cfg.layers, cfg.vocab, cfg.d_model, cfg.seq_len
    if method == "uniform":
        eps = 1e-3  # the ends ride along: they only break ties
        return [eps] + [1.0] * L + [eps]
    if method == "parameters":
        return [float(V * D + S * D)] + [float(cfg.block_params)] * L + [float(V * D + 2 * D)]
    if measured is None:
        raise ValueError("partition 'time' needs measured unit costs")
    t_embed, t_block, t_head = measured
    return [t_embed] + [t_block] * L + [t_head]


def stage_ranges(split, pp: int, stage: int, v: int = 1) -> list[tuple[int, int]]:
    """The unit ranges of this stage's chunks (chunk c is virtual stage c·pp + stage)."""
    return [split[c * pp + stage] for c in range(v)]


def profile_units(cfg: ModelConfig, micro_batch: int, seq_len: int, reps: int = 2) -> tuple[float, float, float]:
    """Forward + backward seconds of the embedding, one block and the head, on this process alone."""
    from mpmp.backend import synchronize, xp
    from mpmp.model.gpt import GPT, MicroBatch, random_source

    one = ModelConfig(cfg.vocab, cfg.seq_len, cfg.d_model, 1, cfg.heads)
    model = GPT(one, random_source(one, 0), ranges=[(0, 1), (1, 2), (2, 3)])
    rng = numpy.random.default_rng(0)
    ids = xp().asarray(rng.integers(0, cfg.vocab, (micro_batch, seq_len)))
    mb = MicroBatch(ids, ids, 1.0 / ids.size)
    x = xp().zeros((micro_batch, seq_len, cfg.d_model), numpy.float32)
    out = []
    for chunk, inp, dy in ((model.chunks[0], None, x), (model.chunks[1], x, x), (model.chunks[2], x, None)):
        best = float("inf")
        for _ in range(reps + 1):
            t = time.perf_counter()
            _, caches = chunk.forward(inp, mb)
            chunk.backward(dy, caches)
            synchronize()
            best = min(best, time.perf_counter() - t)
        out.append(best)
    return tuple(out)


def describe(split, pp: int, v: int, cfg: ModelConfig) -> str:
    from mpmp.model.gpt import unit_names

    names = unit_names(cfg)
    lines = []
    for vs, (a, b) in enumerate(split):
        stage, chunk = vs % pp, vs // pp
        part = names[a] if b - a == 1 else f"{names[a]} .. {names[b - 1]}"
        where = f"stage {stage}" + (f" chunk {chunk}" if v > 1 else "")
        lines.append(f"  {where}: units {a}..{b - 1} ({part})")
    return "\n".join(lines)
