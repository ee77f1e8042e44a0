"""Bytes each rank holds: parameters, gradients and optimizer state exactly as mpmp allocates them, and
its activation caches with the schedule's micro-batches in flight.

Parameters, gradients, optimizer (optim/buffer.py, optim/optimizer.py, optim/adamw.py): a rank's distinct
parameters go, in reverse forward order, into one flat buffer of buckets of bucket_mb MiB, each padded
to a multiple of dp; the tied embedding (pp > 1) and, under sequence parallelism, the replicated
tensors go last, into the late bucket(s). Data and gradient buffers hold every padded element; AdamW
keeps m and v, and fp32 master weights under bf16/fp16, for the whole buffer, or under ZeRO-1
(arXiv 1910.02054 §5.1) for this rank's 1/dp slice of every bucket.

Two accountings (the profile's `storage`):
  emulated  mpmp's NumPy path: every array float32 (bf16/fp16 values are rounded float32s), so
            parameters 4 B, gradients 4 B, optimizer 8 B (+ 4 B masters under bf16/fp16) per element.
  native    a GPU run as Megatron's: 16-bit parameters and activations, fp32 gradients, fp32 masters,
            m and v: 2 + 4 + 12 B per element under bf16/fp16 (4 + 4 + 8 under fp32).

Activations (pipeline/engine.py): the peak, over one step, of the bytes in the caches of the
(micro-batch, chunk) pairs whose forward has run and whose backward (or, split, weight gradient) has
not. Each unit's cache is what mpmp's layers keep (nn/layers.py, nn/functional.py, nn/parallel.py,
model/gpt.py); per block, with T = b·s tokens, T' = T/tp under SP, hidden d, d' = d/tp, a/tp heads and
element size e:

  none       e·(2T'(d+1) + 2Td + 16Td' + (a/tp)·b·s²)   ln_1, ln_2 (x̂, rstd); the inputs of c_attn and
                                                          c_fc; q·scale, k, v, p, the merged heads; GELU's
                                                          input, tanh and output
  selective  the same without the (a/tp)·b·s² probabilities, rebuilt in backward (arXiv 2205.05198 §5)
  full       e·T'd: the block's input only

Korthikanti et al.'s Table 2 (arXiv 2205.05198) counts 34sbh + 5as²b bytes for Megatron's layer with
dropout (masks, 16-bit); mpmp keeps no dropout masks but caches LayerNorm's x̂ and GELU's tanh, so it
holds 40sbh + 2as²b in 16 bits (tp = 1) and follows the same tp/SP/selective/full pattern.

The trainer's start-up check calls `stage_memory` (one stage, before allocating anything); it costs
O(parameters of the stage + m·v), never O(L^2).
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy

from mpmp.comm.grid import coord_of
from mpmp.config import LOW_PRECISION, ParallelConfig, TrainConfig
from mpmp.nn.parallel import padded_vocab
from mpmp.plan.schedule import BW, F, W, orders
from mpmp.plan.stages import BLOCK_TENSORS, chunk_ranges, stage_params

FLAT_ITEMSIZE = 4  # the flat buffers are float32 (bucket sizes are measured in their bytes)


@dataclass(frozen=True)
class Memory:
    params: int
    grads: int
    optimizer: int
    activations: int
    workspace: int  # one micro-batch's largest unit cache, rebuilt or live during its backward

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.workspace


@dataclass(frozen=True)
class FlatLayout:
    """optim/buffer.py's FlatParams without the arrays."""

    bucket_numel: numpy.ndarray  # padded elements of each bucket, in buffer order
    bucket_late: numpy.ndarray  # bool
    bucket_ready_unit: numpy.ndarray  # the unit whose backward completes the bucket (-1 for late)
    sp_span: int  # elements from the first sequence-parallel tensor to the end of the last
    wte_numel: int  # elements of the tied embedding when it is reduced over the embed group, else 0

    @property
    def numel(self) -> int:
        return int(self.bucket_numel.sum())


def _buckets(sizes, bucket_bytes: float, dp: int):
    """[(first, last + 1, padded numel)] of FlatParams' greedy buckets over one group of parameters: a
    bucket closes when its elements reach bucket_bytes, or at the group's last parameter."""
    threshold = numpy.inf if bucket_bytes == numpy.inf else int(numpy.ceil(bucket_bytes / FLAT_ITEMSIZE))
    cum = numpy.cumsum(sizes)
    out, first, base = [], 0, 0
    while first < len(sizes):
        end = len(sizes) if threshold == numpy.inf else int(numpy.searchsorted(cum, base + threshold, "left")) + 1
        end = min(end, len(sizes))
        numel = int(cum[end - 1] - base)
        out.append((first, end, -(-numel // dp) * dp))
        first, base = end, int(cum[end - 1])
    return out


def flat_layout(cfg: TrainConfig, stage: int) -> FlatLayout:
    par = cfg.parallel
    # only these decide the layout: searches over micro-batches and schedules reuse it
    key = (cfg.model, par.tp, par.pp, par.dp, par.virtual_stages, par.partition, par.sequence_parallel, par.bucket_mb)
    return _flat_layout(key, stage)


@lru_cache(maxsize=4096)
def _flat_layout(key: tuple, stage: int) -> FlatLayout:
    model, tp, pp, dp, v, method, sp, bucket_mb = key
    par = ParallelConfig(
        tp=tp, pp=pp, dp=dp, virtual_stages=v, partition=method, sequence_parallel=sp, bucket_mb=bucket_mb
    )
    cfg = TrainConfig(model=model, parallel=par)
    p = stage_params(cfg, stage)
    # the late bucket(s): the sequence-parallel partial sums in forward order, then the tied embedding
    sp_late = numpy.flatnonzero(p.replicated) if par.sequence_parallel and par.tp > 1 else numpy.array([], int)
    wte_late = par.pp > 1 and p.wte >= 0
    late_idx = numpy.concatenate([sp_late, [p.wte] if wte_late else []]).astype(numpy.int64)
    early_idx = numpy.setdiff1d(numpy.arange(p.sizes.size), late_idx)[::-1]  # reverse forward order
    bucket_bytes = par.bucket_mb * 2**20
    buckets = []  # (padded numel, late, ready unit)
    for idx, late_group in ((early_idx, False), (late_idx, True)):
        for _, end, n in _buckets(p.sizes[idx], bucket_bytes, par.dp):
            # in reverse forward order the bucket's last tensor belongs to the unit whose backward ends last
            buckets.append((n, late_group, -1 if late_group else int(p.unit[idx[end - 1]])))
    numel, is_late, ready = zip(*buckets)
    sp_span = _sp_span(p.sizes[late_idx], sp_late.size, bucket_bytes, par.dp)
    return FlatLayout(
        numpy.array(numel, dtype=numpy.int64),
        numpy.array(is_late, dtype=bool),
        numpy.array(ready),
        sp_span,
        int(p.sizes[p.wte]) if wte_late else 0,
    )


def _sp_span(late_sizes, n_sp: int, bucket_bytes: float, dp: int) -> int:
    """GradReducer sums flat.grad[first SP tensor : end of the last] over tp: the SP tensors open the
    late group, but when it spans several buckets the span includes their padding."""
    if n_sp == 0:
        return 0
    span = 0
    for first, end, n in _buckets(late_sizes, bucket_bytes, dp):
        if end >= n_sp:
            return span + int(late_sizes[first:n_sp].sum())
        span += n
    return span


def _state_bytes(cfg: TrainConfig, numel: int, native: bool) -> tuple[int, int, int]:
    par = cfg.parallel
    mixed = cfg.dtype in LOW_PRECISION
    shard = numel // par.dp if par.zero == 1 and par.dp > 1 else numel
    param_size = 2 if native and mixed else 4
    return numel * param_size, numel * 4, shard * (12 if mixed else 8)


def unit_cache_bytes(cfg: TrainConfig, unit: int, micro_batch: int, native: bool = False, recompute=None) -> int:
    """Bytes of one micro-batch's cache of a unit (see the module docstring)."""
    model, par = cfg.model, cfg.parallel
    recompute = par.recompute if recompute is None else recompute
    e = 2 if native and cfg.dtype in LOW_PRECISION else 4
    tp, d = par.tp, model.d_model
    tokens = micro_batch * cfg.seq_len
    local = tokens // tp if par.sequence_parallel else tokens
    if unit == 0:
        return 9 * tokens  # int64 local ids and the bool outside-my-vocabulary mask
    if unit == model.units - 1:
        vocab_local = padded_vocab(model.vocab, tp) // tp
        # ln_f (x̂, rstd), the output layer's input, fp32 exponentiated logits, and the cross-entropy's
        # [2, T] float32 sums, int64 rows and targets, bool ownership mask
        return e * (local * (d + 1) + tokens * d) + 4 * tokens * vocab_local + 25 * tokens
    if recompute == "full":
        return e * local * d
    probs = 0 if recompute == "selective" else model.heads // tp * micro_batch * cfg.seq_len**2
    return e * (2 * local * (d + 1) + 2 * tokens * d + 16 * tokens * (d // tp) + probs)


def chunk_cache_bytes(cfg: TrainConfig, stage: int, micro_batch: int, native: bool = False) -> list[int]:
    """Bytes of one micro-batch's cache of each of the stage's chunks."""
    block = unit_cache_bytes(cfg, 1, micro_batch, native)
    last = cfg.model.units - 1
    out = []
    for start, end in chunk_ranges(cfg, stage):
        ends = [u for u in (0, last) if start <= u < end]
        blocks = end - start - len(ends)
        out.append(blocks * block + sum(unit_cache_bytes(cfg, u, micro_batch, native) for u in ends))
    return out


def peak_activations(cfg: TrainConfig, stage: int, micro_batch: int, native: bool = False) -> int:
    """The engine's peak: caches added at each forward, dropped at the backward (or the split
    backward's weight-gradient pass), walked in the stage's order."""
    par = cfg.parallel
    kind, _, chunk = orders(par.schedule, par.pp, par.micro_batches, par.virtual_stages)[stage]
    sizes = numpy.array(chunk_cache_bytes(cfg, stage, micro_batch, native), dtype=numpy.int64)
    delta = numpy.where(kind == F, 1, numpy.where((kind == BW) | (kind == W), -1, 0)) * sizes[chunk]
    return int(numpy.cumsum(delta).max()) if delta.size else 0


def workspace(cfg: TrainConfig, stage: int, micro_batch: int, native: bool = False) -> int:
    """The largest unit cache of the stage without recomputation: what a backward rebuilds (full
    recompute) or holds besides its gradients while it runs; not counted by the engine."""
    last = cfg.model.units - 1
    kinds = set()
    for a, b in chunk_ranges(cfg, stage):
        kinds |= {u for u, held in ((0, a == 0), (last, b > last), (1, max(a, 1) < min(b, last))) if held}
    return max(unit_cache_bytes(cfg, u, micro_batch, native, recompute="none") for u in kinds)


def state_bytes(cfg: TrainConfig, stage: int, native: bool = False) -> int:
    """Parameters + gradients + optimizer state of one rank of `stage`: what no micro-batch size changes."""
    return sum(_state_bytes(cfg, flat_layout(cfg, stage).numel, native))


def average_state_bytes(cfg: TrainConfig, native: bool = False) -> int:
    """The stages' parameters, gradients and optimizer state averaged over the pp stages, without
    padding: a lower bound on the largest stage's, in O(1)."""
    model, par = cfg.model, cfg.parallel
    tp, d = par.tp, model.d_model
    block = sum(f(d, tp) for _, _, f in BLOCK_TENSORS)
    wte = padded_vocab(model.vocab, tp) // tp * d
    numel = model.layers * block + wte * (2 if par.pp > 1 else 1) + model.seq_len * d + 2 * d
    return sum(_state_bytes(cfg, numel // par.pp, native))


def stage_memory(cfg: TrainConfig, stage: int, native: bool = False) -> Memory:
    """Bytes one rank of `stage` holds (every tp rank and replica of a stage holds the same)."""
    micro_batch = cfg.micro_batch
    params, grads, optimizer = _state_bytes(cfg, flat_layout(cfg, stage).numel, native)
    acts = peak_activations(cfg, stage, micro_batch, native)
    return Memory(params, grads, optimizer, acts, workspace(cfg, stage, micro_batch, native))


def per_rank(cfg: TrainConfig, native: bool = False) -> list[Memory]:
    """Memory of every world rank, in world-rank order."""
    par = cfg.parallel
    stages = [stage_memory(cfg, s, native) for s in range(par.pp)]
    return [stages[coord_of(r, par.tp, par.dp).pp] for r in range(par.tp * par.dp * par.pp)]
