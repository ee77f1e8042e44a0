"""Step time of a layout: compute at the profile's achieved rates, the pipeline re-timed over the
schedule's own order with per-stage costs, and the gradient reductions overlapped as the trainer does.

1. Compute. Each unit's forward (F), input-gradient backward (B) and weight-gradient pass (W) is a list
   of kernels (kernels.py). A matrix product takes max(FLOPs / gemm rate, bytes / bandwidth) (the
   roofline), an elementwise kernel its bytes over the memory (or cache) bandwidth, and every kernel a
   launch overhead. tp collectives sit in F and B on the critical path, as Megatron's do.
2. Pipeline. Stage s's chunk c costs F, B, W per micro-batch; activations cross stages in
   latency + bytes / bandwidth on the link between the two ranks. The computations run in the order of
   schedules.compute_order (the order the engine executes and schedules.simulate checks), each
   starting when its rank is free and its input (or output gradient) has arrived: exactly
   schedules.simulate's timing, but with each stage's own costs (tests compare the two on equal costs).
3. Gradients (optim/grads.py). A data-parallel bucket is launched once the last micro-batch's backward
   has finished every parameter in it; buckets go over the dp link one after another, progressing at the
   profile's `overlap` rate while the rank still computes. Then the sequence-parallel sums, the tied
   embedding's all-reduce and the late buckets, all blocking; ZeRO-1's reduce-scatters block in place.
4. The optimizer step: the norm's all-reduce over mp (every stage waits for the slowest), AdamW over the
   rank's slice, ZeRO-1's all-gathers, and the loss all-reduce over the world.
"""

from dataclasses import dataclass
from functools import lru_cache

from mpmp.comm.grid import Coord, world_rank
from mpmp.config import LOW_PRECISION, ParallelConfig, TrainConfig
from mpmp.nn.parallel import padded_vocab
from mpmp.plan import comm, kernels
from mpmp.plan.memory import flat_layout
from mpmp.plan.schedule import BW, B, F, W, orders, splits_backward
from mpmp.plan.stages import chunk_ranges, unit_counts


@dataclass(frozen=True)
class Software:
    """The training program's habits that change its time but not its arithmetic.

    mpmp's trainer has no dropout, launches data-parallel buckets during the last backward, sends whole
    activations between stages and numbers its pipeline messages with MPI tags (at most 32768 per
    step). Megatron-LM as measured in arXiv 2104.04473 (its Table 1) applies dropout (0.1) to the
    attention probabilities and both residual branches, all-reduces the gradients after the pipeline
    has drained, splits each stage-to-stage transfer over the tp ranks' own links and all-gathers it
    inside the node (its §4.1 scatter/gather), and communicates through NCCL (no tag limit).
    """

    name: str
    dropout: bool
    overlap_dp: bool
    scatter_gather: bool
    mpi_tags: bool


MPMP = Software("mpmp", dropout=False, overlap_dp=True, scatter_gather=False, mpi_tags=True)
MEGATRON_2021 = Software("megatron-2021", dropout=True, overlap_dp=False, scatter_gather=True, mpi_tags=False)
SOFTWARE = {sw.name: sw for sw in (MPMP, MEGATRON_2021)}


@dataclass(frozen=True)
class Rates:
    """What one rank gets of its device (GPUs) or of its node's cores (CPUs)."""

    gemm_flops: float
    slowdown: float  # elementwise time multiplier when ranks outnumber cores
    e: int  # bytes per activation element


def rates(cfg: TrainConfig, hw) -> Rates:
    native_low = hw.storage == "native" and cfg.dtype in LOW_PRECISION
    gemm = hw.gemm_flops if native_low else hw.gemm_flops_fp32
    e = 2 if native_low else 4
    if hw.cores_per_node <= 0:
        return Rates(gemm, 1.0, e)
    world = cfg.parallel.world_size
    ranks = min(world, hw.devices_per_node)
    threads = max(1, hw.cores_per_node // ranks)  # mpmp/_setup.py: BLAS threads per rank
    slowdown = max(1.0, ranks / hw.cores_per_node)
    speedup = threads * (hw.parallel_efficiency if threads > 1 else 1.0)
    return Rates(gemm * speedup / slowdown, slowdown, e)


def _bandwidth(hw, nbytes: float) -> float:
    return hw.cache_bandwidth if 0 < nbytes <= hw.cache_bytes else hw.memory_bandwidth


def op_seconds(op, hw, r: Rates) -> float:
    kind = op[0]
    if kind == "gemm":
        _, m, k, n, batch = op
        nbytes = (m * k + k * n + m * n) * r.e
        compute = 2.0 * m * k * n * batch / (r.gemm_flops * k / (k + hw.gemm_k_half))
        return max(compute, batch * nbytes / _bandwidth(hw, nbytes) * r.slowdown) + hw.kernel_overhead_s
    if kind == "ew":
        _, n, per_element, calls = op
        nbytes = n * per_element
        return calls * (nbytes / _bandwidth(hw, nbytes) * r.slowdown + hw.kernel_overhead_s)
    _, n = op  # exp/tanh, or the scatter-add: their own rates, else a memory pass
    rate = hw.transcendental_rate if kind == "exp" else hw.scatter_rate
    if rate <= 0:
        return op_seconds(("ew", n, 3 * r.e, 1), hw, r)
    return n / rate * r.slowdown + hw.kernel_overhead_s


def seconds(ops, hw, r: Rates) -> float:
    return sum(op_seconds(op, hw, r) for op in ops)


def shape(cfg: TrainConfig, hw, micro_batch: int, sw: Software = MPMP) -> kernels.Shape:
    model, par = cfg.model, cfg.parallel
    return kernels.Shape(
        b=micro_batch,
        s=cfg.seq_len,
        d=model.d_model,
        heads=model.heads,
        tp=par.tp,
        sp=par.sequence_parallel and par.tp > 1,
        vocab_local=padded_vocab(model.vocab, par.tp) // par.tp,
        recompute=par.recompute,
        numpy=hw.kernels == "numpy",
        rounding=cfg.dtype in LOW_PRECISION,
        e=rates(cfg, hw).e,
        dropout=sw.dropout,
    )


def unit_seconds(cfg: TrainConfig, hw, micro_batch: int, sw: Software = MPMP) -> dict:
    """{unit: (F, B, W) seconds} for the embedding (0), a block (1) and the head (L + 1), tp
    collectives included (on the tp group of stage 0: every stage's spans the same nodes)."""
    r = rates(cfg, hw)
    x = shape(cfg, hw, micro_batch, sw)
    link = comm.group_link(cfg, hw, "tp", 0)
    out = {}
    for unit, passes in ((0, kernels.embedding(x)), (1, kernels.block(x)), (cfg.model.units - 1, kernels.head(x))):
        tp = comm.tp_ops(cfg, unit, micro_batch)
        coll = {p: sum(c * comm.op_seconds(k, b, *link) for k, b, c in tp[p]) for p in ("F", "B")}
        out[unit] = (
            seconds(passes.F, hw, r) + coll["F"],
            seconds(passes.B, hw, r) + coll["B"],
            seconds(passes.W, hw, r),
        )
    return out


def stage_costs(cfg: TrainConfig, stage: int, unit_s: dict) -> list[tuple[float, float, float]]:
    """[(F, B, W)] per chunk of the stage."""
    out = []
    for a, b in chunk_ranges(cfg, stage):
        counts = unit_counts(cfg, [(a, b)])
        out.append(tuple(sum(n * unit_s[u][i] for u, n in counts.items()) for i in range(3)))
    return out


def p2p_seconds(cfg: TrainConfig, hw, micro_batch: int, sw: Software = MPMP) -> list[float]:
    """Seconds of the activation transfer from virtual stage vs to vs + 1, for every vs. Scatter/gather
    sends 1/tp of it from each tp rank and all-gathers it over the tp group."""
    par = cfg.parallel
    local = cfg.seq_len // par.tp if par.sequence_parallel else cfg.seq_len
    nbytes = micro_batch * local * cfg.model.d_model * comm.wire_itemsize(cfg)
    split = sw.scatter_gather and par.tp > 1 and not par.sequence_parallel
    gather = 0.0
    if split:
        gather = comm.op_seconds("all_gather", nbytes, *comm.group_link(cfg, hw, "tp", 0))
    out = []
    for vs in range(par.pp * par.virtual_stages):
        a, b = vs % par.pp, (vs + 1) % par.pp
        ranks = [world_rank(Coord(0, s, 0), par.tp, par.dp) for s in (a, b)]
        lat, bw = comm.link(hw, ranks)
        out.append(comm.op_seconds("send", nbytes / par.tp if split else nbytes, 2, lat, bw) + gather)
    return out


@dataclass
class PipelineRun:
    """The re-timed step of every stage: when it ends, how long it computed, when each chunk's final
    backward (or weight-gradient pass) ran, and, when asked, every computation."""

    end: list
    busy: list
    final: list  # per stage: {chunk: (start, end, kind)}
    timeline: list | None = None  # per stage: [(start, end, (kind, mb, chunk))]

    @property
    def bubble_fraction(self) -> float:
        """schedules.bubble_fraction's definition: the idle share of the ranks between the first start
        (0) and the last end."""
        return 1 - sum(self.busy) / (max(self.end) * len(self.end))


def retime(cfg: TrainConfig, costs: list, p2p: list, keep: bool = False, progress: bool = True) -> PipelineRun:
    """Run the stages' computation orders against each other (see the module docstring).
    costs[s][c] = (F, B, W) seconds of stage s's chunk c; p2p[vs] = seconds from vs to vs + 1.
    progress=False: MPI without asynchronous progress, where a large (rendezvous) message moves only
    while its sender is inside MPI: it arrives no sooner than the sender's next send or receive."""
    return _Retimer(cfg, costs, p2p, keep, progress).run()


class _Retimer:
    """retime's state: per stage its position in its order, clock, busy time and pending messages;
    per message (activation or gradient, keyed mb·n_vs + vs) its arrival time."""

    def __init__(self, cfg: TrainConfig, costs: list, p2p: list, keep: bool, progress: bool):
        par = cfg.parallel
        self.pp, m = par.pp, par.micro_batches
        self.sched = [tuple(a.tolist() for a in o) for o in orders(par.schedule, par.pp, m, par.virtual_stages)]
        self.n_vs = par.pp * par.virtual_stages
        self.costs, self.p2p, self.keep, self.progress = costs, p2p, keep, progress
        self.arrive = ([None] * (m * self.n_vs), [None] * (m * self.n_vs))  # activation, gradient
        self.pending = [[] for _ in range(self.pp)]  # without progress: (table, key, ready) not yet moved
        self.pos, self.clock, self.busy = [0] * self.pp, [0.0] * self.pp, [0.0] * self.pp
        self.final = [{} for _ in range(self.pp)]
        self.timeline = [[] for _ in range(self.pp)] if keep else None

    def deliver(self, s, now):
        """Stage s enters MPI at `now`: its pending messages move."""
        for table, key, ready in self.pending[s]:
            table[key] = max(ready, now)
        self.pending[s].clear()

    def run(self) -> PipelineRun:
        remaining = sum(len(k) for k, _, _ in self.sched)
        while remaining:
            moved = sum([self.advance(s) for s in range(self.pp)])
            if not moved:
                raise RuntimeError("pipeline re-timing stalled: the schedule deadlocks")  # simulate() says why
            remaining -= moved
        return PipelineRun(self.clock, self.busy, self.final, self.timeline)

    def advance(self, s) -> int:
        """Run stage s until it waits for a message that has not arrived; how many operations it ran."""
        kinds, mbs, chunks = self.sched[s]
        p, c, work, cost, n_vs, pp = self.pos[s], self.clock[s], self.busy[s], self.costs[s], self.n_vs, self.pp
        while p < len(kinds):
            kind, ch = kinds[p], chunks[p]
            vs = ch * pp + s
            key = mbs[p] * n_vs + vs
            # F receives from vs - 1 and sends to vs + 1; B the other way round; W neither
            source = None if kind == W else (key - 1, 0, vs - 1) if kind == F else (key + 1, 1, vs)
            if source is not None and 0 <= source[2] and (kind == F or vs < n_vs - 1):
                self.deliver(s, c)
                arrival = self.arrive[source[1]][source[0]]
                if arrival is None:
                    break
                c = max(c, arrival)
            f, b, w = cost[ch]
            dt = f if kind == F else w if kind == W else b + (w if kind == BW else 0.0)
            start, c = c, c + dt
            work += dt
            if kind == F and vs < n_vs - 1 or kind in (B, BW) and vs > 0:
                self.send(s, c, *((self.arrive[0], key, vs) if kind == F else (self.arrive[1], key, vs - 1)))
            if kind != F:
                self.final[s][ch] = (start, c, kind)  # the last one seen is the chunk's final one
            if self.keep:
                self.timeline[s].append((start, c, (kind, mbs[p], ch)))
            p += 1
        if p == len(kinds):
            self.deliver(s, c)  # ReduceGrads waits for every send
        moved = p - self.pos[s]
        self.pos[s], self.clock[s], self.busy[s] = p, c, work
        return moved

    def send(self, s, now, table, dest, hop):
        if self.progress:
            table[dest] = now + self.p2p[hop]
        else:
            self.deliver(s, now)
            self.pending[s].append((table, dest, now + self.p2p[hop]))


# ---- gradient reductions and the optimizer step ------------------------------------------------


def _advance(start: float, work: float, rate: float, until: float) -> float:
    """When an operation needing `work` seconds of link time, started at `start`, ends if it progresses
    at `rate` before `until` (while the rank computes) and at full speed after."""
    if start >= until or work <= 0:
        return start + work
    if rate > 0 and (until - start) * rate >= work:
        return start + work / rate
    return until + work - (until - start) * rate


def _unit_done(cfg: TrainConfig, stage: int, final: dict, unit_s: dict) -> dict:
    """{unit: when the step's last backward through it ends}: a chunk's final backward finishes its
    units from the last to the first, each after its share of the time (a split schedule's final
    weight-gradient pass finishes them all at its end)."""
    last = cfg.model.units - 1
    out = {}
    for ch, (a, b) in enumerate(chunk_ranges(cfg, stage)):
        start, end, kind = final[ch]
        units = range(b - 1, a - 1, -1)
        costs = [sum(unit_s[min(u, 1) if u < last else last][1:]) for u in units]
        total, elapsed = sum(costs) or 1.0, 0.0
        for u, c in zip(units, costs):
            elapsed += c
            out[u] = end if kind == W else start + (end - start) * elapsed / total
    return out


def reductions_end(cfg: TrainConfig, hw, stage: int, run: PipelineRun, unit_s: dict, sw: Software = MPMP) -> float:
    """When the stage's ReduceGrads finishes: dp buckets, SP sums, the tied embedding, late buckets."""
    par = cfg.parallel
    layout = flat_layout(cfg, stage)
    t_r = run.end[stage]

    links = {}

    def group_seconds(group, kind, nbytes):
        if group not in links:
            links[group] = comm.group_link(cfg, hw, group, stage)
        return comm.op_seconds(kind, nbytes, *links[group])

    blocking = group_seconds("tp", "all_reduce", 4 * layout.sp_span) if layout.sp_span else 0.0
    blocking += group_seconds("embed", "all_reduce", 4 * layout.wte_numel) if layout.wte_numel else 0.0
    if par.dp == 1:
        return t_r + blocking
    kind = "reduce_scatter" if par.zero == 1 else "iall_reduce"
    work = [group_seconds("dp", kind, 4 * n) for n in layout.bucket_numel.tolist()]
    late = sum(w for w, is_late in zip(work, layout.bucket_late.tolist()) if is_late)
    if par.zero == 1 or not sw.overlap_dp:  # blocking reduce-scatters; or everything after backward
        return t_r + sum(work) + blocking
    done = _unit_done(cfg, stage, run.final[stage], unit_s)
    free = 0.0
    for w, unit in zip(work, layout.bucket_ready_unit.tolist()):
        if unit >= 0:
            free = _advance(max(done[unit], free), w, hw.overlap, t_r)
    t1 = t_r + blocking
    return max(t1, max(free, t1) + late) if late else max(t1, free)


def optimizer_seconds(cfg: TrainConfig, hw, stage: int) -> float:
    """AdamW over the rank's slice (+ ZeRO-1's all-gathers of the updated weights)."""
    par = cfg.parallel
    layout = flat_layout(cfg, stage)
    zero = par.zero == 1 and par.dp > 1
    numel = layout.numel // par.dp if zero else layout.numel
    t = seconds(kernels.optimizer(numel, cfg.dtype in LOW_PRECISION, hw.kernels == "numpy"), hw, rates(cfg, hw))
    if zero:
        link = comm.group_link(cfg, hw, "dp", stage)
        t += sum(comm.op_seconds("all_gather", 4 * n, *link) for n in layout.bucket_numel.tolist())
    return t


def _small_all_reduce(cfg: TrainConfig, hw, group: str, nbytes: int) -> float:
    return comm.op_seconds("all_reduce", nbytes, *comm.group_link(cfg, hw, group, 0))


@dataclass(frozen=True)
class StepTime:
    step_s: float
    bubble_fraction: float
    pipeline_s: float  # the slowest stage's last computation ends
    reductions_s: float  # ... and its gradient reductions
    optimizer_s: float  # norm, AdamW (+ ZeRO-1 gathers), loss all-reduce


def tail_seconds(cfg: TrainConfig, hw) -> float:
    """After the reductions: the norm's all-reduce, the optimizer on the slowest stage, the loss's."""
    par = cfg.parallel
    norm = _small_all_reduce(cfg, hw, "mp", 8) + (_small_all_reduce(cfg, hw, "dp", 8) if par.zero == 1 else 0.0)
    update = max(optimizer_seconds(cfg, hw, s) for s in range(par.pp))
    return norm + update + _small_all_reduce(cfg, hw, "world", 16)


def pipeline_costs(cfg: TrainConfig, hw, sw: Software = MPMP) -> tuple:
    """(unit seconds, per-stage chunk costs, transfer seconds): independent of the schedule and of the
    micro-batch count for a given micro-batch size, so a search computes them once per size."""
    par = cfg.parallel
    micro_batch = cfg.micro_batch
    key = (
        cfg.model,
        par.tp,
        par.pp,
        par.dp,
        par.virtual_stages,
        par.partition,
        par.sequence_parallel,
        par.recompute,
        cfg.dtype,
        cfg.seq_len,
        micro_batch,
    )
    return _pipeline_costs(key, hw, sw)


@lru_cache(maxsize=256)
def _pipeline_costs(key: tuple, hw, sw: Software) -> tuple:
    model, tp, pp, dp, v, method, sp, recompute, dtype, seq_len, micro_batch = key
    par = ParallelConfig(
        tp=tp, pp=pp, dp=dp, virtual_stages=v, partition=method, sequence_parallel=sp, recompute=recompute
    )
    cfg = TrainConfig(model=model, parallel=par, global_batch=micro_batch * dp, seq_len=seq_len, dtype=dtype)
    unit_s = unit_seconds(cfg, hw, micro_batch, sw)
    costs = tuple(tuple(stage_costs(cfg, s, unit_s)) for s in range(pp))
    return unit_s, costs, tuple(p2p_seconds(cfg, hw, micro_batch, sw))


def step_time(cfg: TrainConfig, hw, sw: Software = MPMP) -> StepTime:
    par = cfg.parallel
    unit_s, costs, p2p = pipeline_costs(cfg, hw, sw)
    run = retime(cfg, costs, p2p, progress=hw.overlap > 0)
    pipeline = max(run.end)
    reduced = max(reductions_end(cfg, hw, s, run, unit_s, sw) for s in range(par.pp))
    tail = tail_seconds(cfg, hw)
    bubble = run.bubble_fraction if par.pp > 1 else 0.0
    return StepTime(reduced + tail, bubble, pipeline, reduced - pipeline, tail)


def lower_bound(cfg: TrainConfig, hw, sw: Software = MPMP) -> float:
    """No schedule finishes sooner. Stage s cannot start before the first micro-batch has gone through
    the stages before it, then computes all its work; after its last backward only weight-gradient
    passes may follow, and that backward's micro-batch must still go back through the stages before it.
    For 1F1B with equal stages this is the simulated (m + p - 1)(F + B) exactly. The optimizer step
    follows in any case."""
    par = cfg.parallel
    _, costs, p2p = pipeline_costs(cfg, hw, sw)
    split = splits_backward(par.schedule)
    bound, reach, drain = 0.0, 0.0, 0.0
    for s in range(par.pp):
        busy = par.micro_batches * sum(f + b + w for f, b, w in costs[s])
        after = par.micro_batches * sum(w for _, _, w in costs[s]) if split else 0.0
        bound = max(bound, reach + busy - after + drain)
        reach += costs[s][0][0] + p2p[s]
        drain += min(b + (0.0 if split else w) for _, b, w in costs[s]) + p2p[s]
    return bound + tail_seconds(cfg, hw)


def model_flops(cfg: TrainConfig) -> float:
    """FLOPs of one step as Megatron counts them (arXiv 2104.04473 Eq. 3, matrix products only):
    24·B·s·l·h²·(1 + s/6h) per pass over the blocks, 3 passes (forward, two backward halves) plus the
    recomputed forward under full recomputation (Eq. 3's 96 = 4 x 24), and 6·B·s·h·V for the logits."""
    model = cfg.model
    b, s, layers, h, v = cfg.global_batch, cfg.seq_len, model.layers, model.d_model, model.vocab
    passes = 4 if cfg.parallel.recompute == "full" else 3
    return 24.0 * passes * b * s * layers * h * h * (1 + s / (6 * h)) + 6.0 * b * s * h * v


def tflops_per_gpu(cfg: TrainConfig, step_s: float) -> float:
    par = cfg.parallel
    return model_flops(cfg) / step_s / par.world_size / 1e12
