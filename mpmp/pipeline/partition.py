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
    """Contiguous non-empty [start, end) ranges minimising the largest sum (exact dynamic programme;
    among equally good splits, the earliest cuts)."""
    n = len(costs)
    if parts > n:
        raise ConfigError(f"cannot split {n} units (embedding, blocks, head) into {parts} pipeline stages")
    prefix = numpy.concatenate([[0.0], numpy.cumsum(costs, dtype=numpy.float64)])
    inf = float("inf")
    # best[k][i]: the minimal max cost of splitting units[:i] into k parts
    best = numpy.full((parts + 1, n + 1), inf)
    cut = numpy.zeros((parts + 1, n + 1), dtype=int)
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = value, j
    ranges, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        ranges.append((int(j), int(i)))
        i = j
    return ranges[::-1]


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
