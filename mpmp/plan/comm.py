"""Communication per step: the bytes each rank moves, per group and operation, in the ledger's
convention (mpmp/comm/ledger.py: the message size; all-gather counts its gathered output), and the
time of each operation on the link its group spans.

Per micro-batch and chunk, with T = b·s tokens, hidden d and w bytes per activation element on the
wire (2 under bf16/fp16: tp and pp traffic travels as 16-bit patterns; 4 otherwise):

  tp, without SP   embedding g: all-reduce T·d·w; per block f and g: 2 all-reduces forward and 2
                   backward (arXiv 1909.08053 §3); the head's f backward: 1 all-reduce; the vocabulary-
                   parallel cross-entropy: all-reduces of T and 2T fp32 values (max; target, sum).
                   Full recomputation repeats each block's forward all-reduces in backward.
  tp, with SP      every all-reduce of T·d·w becomes a reduce-scatter plus an all-gather of T·d·w
                   (arXiv 2205.05198 §4.2); once per step, the replicated tensors' gradients are summed
                   (all-reduce of their fp32 span in the flat buffer).
  pp               each chunk boundary: send/receive of b·(s/tp under SP)·d·w bytes, each way.
  embed            the tied embedding's fp32 gradient, all-reduced between the first and last stage.
  dp               every bucket of the fp32 gradient buffer: iall_reduce; under ZeRO-1 reduce-scatter,
                   then all-gather of the updated weights, plus the norm's 8-byte all-reduce.
  mp               the squared gradient norm: one 8-byte all-reduce over tp x pp.
  world            the loss and the stop flag: one 16-byte all-reduce.

Time: an α–β model. A ring over n ranks takes 2⌈log2 n⌉ latencies for an all-reduce (⌈log2 n⌉ for the
gathers: tree-like start-up, as NCCL and MPI do for short messages) plus its wire bytes (ledger.wire_bytes:
2(n-1)/n of the buffer for an all-reduce) over the bandwidth. A group inside one node uses the intra-
node link; a group across nodes the inter-node link, whose bandwidth k rings share when k of its
members sit on each node (each GPU has its own HCA), capped by the intra-node bandwidth.
"""

import math
from collections import defaultdict

from mpmp.comm.grid import Coord, world_rank
from mpmp.comm.ledger import wire_bytes
from mpmp.config import TrainConfig
from mpmp.plan.memory import flat_layout
from mpmp.plan.stages import chunk_ranges, unit_counts

GROUPS = ("tp", "pp", "dp", "embed", "mp", "world")


def wire_itemsize(cfg: TrainConfig) -> int:
    return 2 if cfg.precision else 4


def tp_ops(cfg: TrainConfig, unit: int, micro_batch: int) -> dict:
    """{"F": [...], "B": [...]}: the tp operations, as (kind, bytes, count), of one micro-batch's
    forward and backward through a unit (the backward of a fully recomputed block repeats its forward's)."""
    model, par = cfg.model, cfg.parallel
    if par.tp == 1:
        return {"F": [], "B": []}
    tokens = micro_batch * cfg.seq_len
    act = tokens * model.d_model * wire_itemsize(cfg)
    last = model.units - 1
    # Each f or g in the layer (arXiv 1909.08053 §3), or under SP an all-gather or a reduce-scatter
    g_fwd = [("reduce_scatter", act, 1)] if par.sequence_parallel else [("all_reduce", act, 1)]
    f_fwd = [("all_gather", act, 1)] if par.sequence_parallel else []
    f_bwd = [("reduce_scatter", act, 1)] if par.sequence_parallel else [("all_reduce", act, 1)]
    g_bwd = [("all_gather", act, 1)] if par.sequence_parallel else []
    if unit == 0:  # vocabulary-parallel lookup: g
        return {"F": g_fwd, "B": g_bwd}
    if unit == last:  # the output layer's f; the cross-entropy's fp32 max and sums
        ce = [("all_reduce", 4 * tokens, 1), ("all_reduce", 8 * tokens, 1)]
        return {"F": f_fwd + ce, "B": f_bwd}
    forward = [(k, b, 2 * c) for k, b, c in f_fwd + g_fwd]  # attention and MLP: f ... g each
    backward = [(k, b, 2 * c) for k, b, c in g_bwd + f_bwd]
    return {"F": forward, "B": backward + (forward if par.recompute == "full" else [])}


def bytes_per_step(cfg: TrainConfig, stage: int) -> dict:
    """{(group, kind): [count, bytes]} one rank of `stage` records in its ledger over one step."""
    par = cfg.parallel
    m = par.micro_batches
    micro_batch = cfg.micro_batch
    totals = defaultdict(lambda: [0, 0])

    def add(group, kind, count, nbytes):
        if count:
            totals[(group, kind)][0] += count
            totals[(group, kind)][1] += count * nbytes

    layout = flat_layout(cfg, stage)
    ranges = chunk_ranges(cfg, stage)
    if par.tp > 1:
        for unit, copies in unit_counts(cfg, ranges).items():
            for ops in tp_ops(cfg, unit, micro_batch).values():
                for kind, nbytes, count in ops:
                    add("tp", kind, count * copies * m, nbytes)
        add("tp", "all_reduce", int(layout.sp_span > 0), 4 * layout.sp_span)
    if par.pp > 1:
        local = cfg.seq_len // par.tp if par.sequence_parallel else cfg.seq_len
        act = micro_batch * local * cfg.model.d_model * wire_itemsize(cfg)
        last_vs = par.pp * par.virtual_stages - 1
        for c in range(len(ranges)):
            vs = c * par.pp + stage
            inner, outer = int(vs > 0), int(vs < last_vs)
            add("pp", "send", m * (inner + outer), act)
            add("pp", "recv", m * (inner + outer), act)
    add("embed", "all_reduce", int(layout.wte_numel > 0), 4 * layout.wte_numel)
    if par.dp > 1:
        zero = par.zero == 1
        for n in layout.bucket_numel.tolist():
            add("dp", "reduce_scatter" if zero else "iall_reduce", 1, 4 * n)
            add("dp", "all_gather", int(zero), 4 * n)
        add("dp", "all_reduce", int(zero), 8)
    add("mp", "all_reduce", int(par.tp * par.pp > 1), 8)
    add("world", "all_reduce", int(par.world_size > 1), 16)
    return {k: list(v) for k, v in totals.items()}


def keyed(totals: dict) -> dict:
    """{"group:kind": bytes}, the JSON form."""
    return {f"{g}:{k}": v[1] for (g, k), v in sorted(totals.items())}


# ---- time --------------------------------------------------------------------------------------


def group_members(cfg: TrainConfig, group: str, stage: int) -> list[int]:
    """World ranks of the `group` containing rank (dp 0, stage, tp 0), from the grid's rank order."""
    par = cfg.parallel
    tp, pp, dp = par.tp, par.pp, par.dp
    if group == "tp":
        coords = [Coord(0, stage, t) for t in range(tp)]
    elif group == "dp":
        coords = [Coord(d, stage, 0) for d in range(dp)]
    elif group in ("pp", "embed"):
        coords = [Coord(0, p, 0) for p in (range(pp) if group == "pp" else sorted({0, pp - 1}))]
    elif group == "mp":
        coords = [Coord(0, p, t) for p in range(pp) for t in range(tp)]
    else:
        return list(range(tp * pp * dp))  # world
    return [world_rank(c, tp, dp) for c in coords]


def group_link(cfg: TrainConfig, hw, group: str, stage: int) -> tuple[int, float, float]:
    """(ranks, latency, bandwidth) of `group` at `stage`: the n, latency, bandwidth op_seconds takes."""
    members = group_members(cfg, group, stage)
    return (len(members), *link(hw, members))


def link(hw, members) -> tuple[float, float]:
    """(latency, bandwidth) of a ring over these world ranks."""
    per_node = defaultdict(int)
    for r in members:
        per_node[r // hw.devices_per_node] += 1
    if len(per_node) == 1:
        return hw.intra_node.latency_s, hw.intra_node.bandwidth
    rings = min(per_node.values())
    return hw.inter_node.latency_s, min(hw.intra_node.bandwidth, rings * hw.inter_node.bandwidth)


def op_seconds(kind: str, nbytes: float, n: int, latency: float, bandwidth: float) -> float:
    """One operation of message size nbytes over n ranks (α–β, see the module docstring)."""
    if n <= 1:
        return 0.0
    steps = {"send": 1, "recv": 1}.get(kind, math.ceil(math.log2(n)) * (2 if kind.endswith("all_reduce") else 1))
    moved = wire_bytes("send" if kind == "recv" else kind, nbytes, n)
    return steps * latency + moved / bandwidth


def seconds_per_group(cfg: TrainConfig, hw, stage: int, totals: dict) -> dict:
    """{group: seconds} the stage's operations take on their links (not all of it is exposed)."""
    out = defaultdict(float)
    for (group, kind), (count, nbytes) in totals.items():
        if kind == "recv":
            continue  # a transfer's time is counted once, at its send
        out[group] += count * op_seconds(kind, nbytes / count, *group_link(cfg, hw, group, stage))
    return dict(out)
