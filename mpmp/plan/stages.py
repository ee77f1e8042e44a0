"""What each pipeline stage holds: its chunks of units, and its parameters in the trainer's order.

Rank (dp, pp = s, tp) runs the chunks split[c·pp + s] of the partition (mpmp.pipeline.partition) and
holds the parameters of their units (mpmp.model.gpt.unit_params), each sharded for tp as
nn/parallel.shard does: the vocabulary padded to a multiple of tp, q/k/v and the MLP's first matrix by
columns, the projections by rows, LayerNorms, wpe and the projections' biases whole. Every tp rank and
every replica of a stage holds the same shapes, so one description per stage serves them all. The
arrays are built by tiling one block's 12 tensors, so 100,000 layers cost milliseconds.
"""

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy

from mpmp.config import ModelConfig, TrainConfig
from mpmp.nn.parallel import padded_vocab
from mpmp.pipeline import partition

# One block's tensors in forward order (model/gpt.py param_infos): whether each is replicated over tp
# (split None), and its elements on one tp rank as a function of (d, tp).
BLOCK_TENSORS = (
    ("ln_1.weight", True, lambda d, t: d),
    ("ln_1.bias", True, lambda d, t: d),
    ("attn.c_attn.weight", False, lambda d, t: d * 3 * d // t),
    ("attn.c_attn.bias", False, lambda d, t: 3 * d // t),
    ("attn.c_proj.weight", False, lambda d, t: d // t * d),
    ("attn.c_proj.bias", True, lambda d, t: d),
    ("ln_2.weight", True, lambda d, t: d),
    ("ln_2.bias", True, lambda d, t: d),
    ("mlp.c_fc.weight", False, lambda d, t: d * 4 * d // t),
    ("mlp.c_fc.bias", False, lambda d, t: 4 * d // t),
    ("mlp.c_proj.weight", False, lambda d, t: 4 * d // t * d),
    ("mlp.c_proj.bias", True, lambda d, t: d),
)


@dataclass(frozen=True)
class StageParams:
    """A stage's distinct parameters in forward order (the trainer's model.parameters())."""

    sizes: numpy.ndarray  # elements on one rank
    unit: numpy.ndarray  # the unit whose backward finishes the parameter's gradient last
    replicated: numpy.ndarray  # bool: split None (under SP: a partial sum over tp, the late bucket)
    wte: int  # index of the token embedding, -1 when the stage does not hold it


@lru_cache(maxsize=64)
def split(model: ModelConfig, method: str, parts: int) -> tuple:
    """The partition of the L + 2 units into pp·v chunks, as the trainer computes it."""
    return tuple(partition.balanced_split(partition.unit_costs(model, method), parts))


def chunk_ranges(cfg: TrainConfig, stage: int) -> list[tuple[int, int]]:
    """[start, end) unit ranges of a stage's chunks, in execution order (chunk c = virtual stage c·pp + s)."""
    par = cfg.parallel
    parts = split(cfg.model, par.partition, par.pp * par.virtual_stages)
    return partition.stage_ranges(list(parts), par.pp, stage, par.virtual_stages)


def unit_counts(cfg: TrainConfig, ranges) -> dict:
    """{unit: how many of its kind} over unit ranges: 0 (embedding), 1 (standing for every block), L+1."""
    last = cfg.model.units - 1
    out = defaultdict(int)
    for a, b in ranges:
        out[0] += a == 0
        out[last] += b > last
        out[1] += max(0, min(b, last) - max(a, 1))
    return {u: n for u, n in out.items() if n}


def _chunk_tensors(model: ModelConfig, tp: int, start: int, end: int, wte_held: bool):
    """(sizes, units, replicated) of the distinct tensors of units [start, end), in forward order."""
    d, last = model.d_model, model.units - 1
    wte = padded_vocab(model.vocab, tp) // tp * d
    sizes, units, repl = [], [], []
    if start == 0:  # the embedding: wte (vocabulary rows), wpe (whole)
        sizes.append([wte, model.seq_len * d]), units.append([0, 0]), repl.append([False, True])
    blocks = numpy.arange(max(start, 1), min(end, last))
    sizes.append(numpy.tile([f(d, tp) for _, _, f in BLOCK_TENSORS], blocks.size))
    units.append(numpy.repeat(blocks, len(BLOCK_TENSORS)))
    repl.append(numpy.tile([r for _, r, _ in BLOCK_TENSORS], blocks.size))
    if end > last:  # the head: ln_f, and the tied wte unless the embedding's is already here
        own = 2 if wte_held or start == 0 else 3
        sizes.append([d, d, wte][:own]), units.append([last] * own), repl.append([True, True, False][:own])
    cat = numpy.concatenate
    return cat(sizes).astype(numpy.int64), cat(units).astype(numpy.int64), cat(repl).astype(bool)


def stage_params(cfg: TrainConfig, stage: int) -> StageParams:
    model, tp = cfg.model, cfg.parallel.tp
    parts, wte, count = [], -1, 0
    for start, end in chunk_ranges(cfg, stage):
        sizes, units, repl = _chunk_tensors(model, tp, start, end, wte >= 0)
        if start == 0:
            wte = count
        elif end == model.units and wte < 0:
            wte = count + sizes.size - 1
        parts.append((sizes, units, repl))
        count += sizes.size
    sizes, units, repl = (numpy.concatenate(x) for x in zip(*parts))
    return StageParams(sizes, units, repl, wte)
