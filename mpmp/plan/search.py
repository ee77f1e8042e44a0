"""Choosing a layout: evaluate one, choose its free knobs, or enumerate every layout of N devices.

A request fixes the model, the global batch and the training options; tp, pp, the schedule, the
virtual stages and the micro-batch count may be left free (None). For a layout (tp, pp, dp) the search
tries every micro-batch count that divides the replica's share of the batch, the schedules 1f1b,
interleaved (2 to 4 chunks per rank) and zb-h1 (gpipe never beats 1f1b's time and holds more), keeps
what fits in memory and returns the fastest. Candidates are timed in the order of a lower bound (the
busiest stage's work after the first micro-batch reaches it); once that bound exceeds the best step
found, the rest cannot win and are skipped.
"""

from dataclasses import dataclass, replace

from mpmp.config import TrainConfig
from mpmp.config import validate as config_validate
from mpmp.errors import ConfigError
from mpmp.plan import comm, memory, step_time

SEARCHED_SCHEDULES = ("1f1b", "interleaved", "zb-h1")
MAX_VIRTUAL_STAGES = 4  # more chunks multiply the pipeline messages (and the search) for a shrinking bubble gain


@dataclass(frozen=True)
class Request:
    """What the user fixed; None = free."""

    cfg: TrainConfig  # model, batch, options; its parallel part gives sp, zero, recompute, bucket_mb, partition
    gpus: int
    tp: int | None = None
    pp: int | None = None
    schedule: str | None = None
    virtual_stages: int | None = None
    micro_batches: int | None = None
    software: step_time.Software = step_time.MPMP


@dataclass(frozen=True)
class Plan:
    cfg: TrainConfig
    memory: list  # per stage: memory.Memory
    step: step_time.StepTime
    comm_bytes: list  # per stage: {(group, kind): [count, bytes]}
    comm_seconds: dict  # group -> seconds of its operations on the busiest stage
    tflops_per_gpu: float


def validate(cfg: TrainConfig, sw: step_time.Software = step_time.MPMP):
    """The trainer's own checks (mpmp.config.validate), MPI's tag range only for software bound by it,
    and a partition a plan can compute without a run."""
    if cfg.parallel.partition not in ("uniform", "parameters"):
        raise ConfigError(
            f"--partition must be uniform or parameters for a plan (time needs a run), not {cfg.parallel.partition!r}"
        )
    config_validate(cfg, mpi_tags=sw.mpi_tags)


def capacity(cfg: TrainConfig, hw) -> float:
    """Bytes one rank may fill: its device's usable memory, or its share of a CPU node's."""
    par = cfg.parallel
    ranks = min(par.world_size, hw.devices_per_node) if hw.cores_per_node > 0 else 1
    return hw.memory_bytes * hw.memory_usable / ranks


def evaluate(cfg: TrainConfig, hw, sw: step_time.Software = step_time.MPMP) -> Plan:
    """Every number of one fully specified layout."""
    native = hw.storage == "native"
    mem = [memory.stage_memory(cfg, s, native) for s in range(cfg.parallel.pp)]
    st = step_time.step_time(cfg, hw, sw)
    return _plan(cfg, hw, mem, st)


def _plan(cfg, hw, mem, st) -> Plan:
    pp = cfg.parallel.pp
    comm_bytes = [comm.bytes_per_step(cfg, s) for s in range(pp)]
    seconds = {}
    for s in range(pp):
        for group, t in comm.seconds_per_group(cfg, hw, s, comm_bytes[s]).items():
            seconds[group] = max(seconds.get(group, 0.0), t)
    return Plan(cfg, mem, st, comm_bytes, seconds, step_time.tflops_per_gpu(cfg, st.step_s))


def fits(mem, cfg: TrainConfig, hw) -> bool:
    return max(m.total for m in mem) <= capacity(cfg, hw)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def knob_choices(req: Request, tp: int, pp: int, dp: int) -> list[TrainConfig]:
    """Every valid (micro-batches, schedule, virtual stages) of a layout the request leaves open."""
    base = req.cfg
    share = base.global_batch // dp
    ms = [req.micro_batches] if req.micro_batches else _divisors(share)
    scheds = [req.schedule] if req.schedule else (SEARCHED_SCHEDULES if pp > 1 else ("1f1b",))
    out, first_error = [], None
    for schedule in scheds:
        if req.virtual_stages:
            vs = [req.virtual_stages]
        elif schedule == "interleaved":
            vs = range(2, min(MAX_VIRTUAL_STAGES, base.model.units // pp) + 1)
        else:
            vs = [1]
        for v in vs:
            for m in ms:
                par = replace(base.parallel, tp=tp, pp=pp, dp=dp, schedule=schedule, virtual_stages=v, micro_batches=m)
                cfg = replace(base, parallel=par)
                try:
                    validate(cfg, req.software)
                except ConfigError as exc:
                    first_error = first_error or exc
                    continue
                out.append(cfg)
    if not out:
        raise first_error or ConfigError("no micro-batch count, schedule and virtual stages fit this layout")
    return out


@dataclass(frozen=True)
class Rejected:
    layout: tuple  # (tp, pp, dp)
    reason: str
    closest: TrainConfig | None = None  # the candidate needing the least memory, when memory was the reason


def _state_by_v(choices, hw, room: float) -> dict:
    """{virtual stages: the largest stage's parameters, gradients and optimizer state}; the average
    stage first: it bounds the largest from below in O(1) and settles layouts far too big."""
    native, pp, state = hw.storage == "native", choices[0].parallel.pp, {}
    for cfg in choices:
        v = cfg.parallel.virtual_stages
        if v not in state:
            average = memory.average_state_bytes(cfg, native)
            state[v] = average if average > room else max(memory.state_bytes(cfg, s, native) for s in range(pp))
    return state


def best_for_layout(req: Request, tp: int, pp: int, dp: int, hw) -> Plan | Rejected:
    """The fastest plan of this layout that fits, or why there is none."""
    try:
        _validate_layout(replace(req.cfg, parallel=replace(req.cfg.parallel, tp=tp, pp=pp, dp=dp)))
        choices = knob_choices(req, tp, pp, dp)
    except ConfigError as exc:
        return Rejected((tp, pp, dp), str(exc))
    sw, native, room = req.software, hw.storage == "native", capacity(choices[0], hw)
    state = _state_by_v(choices, hw, room)
    if min(state.values()) > room:
        need = min(state.values())
        smallest_batches = max(choices, key=lambda c: c.parallel.micro_batches)
        return Rejected(
            (tp, pp, dp),
            f"out of memory: parameters, gradients and optimizer state alone need at "
            f"least {need / 2**30:.1f} GiB per rank > {room / 2**30:.1f} GiB",
            smallest_batches,
        )
    ranked = sorted((step_time.lower_bound(c, hw, sw), i, c) for i, c in enumerate(choices))
    too_big = {}  # (schedule, v) -> the most micro-batches found not to fit
    best, closest = None, None
    for bound, _, cfg in ranked:
        par = cfg.parallel
        family = (par.schedule, par.virtual_stages)
        if best is not None and bound >= best.step.step_s:
            break  # neither this candidate nor any later one can be faster
        if state[par.virtual_stages] > room or par.micro_batches <= too_big.get(family, 0):
            continue  # fewer, larger micro-batches hold at least as much (caches in flight x their size)
        mem = [memory.stage_memory(cfg, s, native) for s in range(pp)]
        need = max(m.total for m in mem)
        if closest is None or need < closest[0]:
            closest = (need, cfg)
        if need > room:
            too_big[family] = max(too_big.get(family, 0), par.micro_batches)
            continue
        st = step_time.step_time(cfg, hw, sw)
        if best is None or st.step_s < best.step.step_s:
            best = _plan(cfg, hw, mem, st)
    if best is not None:
        return best
    need, cfg = closest
    return Rejected(
        (tp, pp, dp),
        f"out of memory: needs {need / 2**30:.1f} GiB per rank at best (micro-batches "
        f"{cfg.parallel.micro_batches}, {cfg.parallel.schedule}) > {room / 2**30:.1f} GiB",
        cfg,
    )


def _validate_layout(cfg: TrainConfig):
    """The checks that do not depend on the knobs the search chooses."""
    par, model = cfg.parallel, cfg.model
    model.validate(par.tp)
    if cfg.global_batch % par.dp:
        raise ConfigError(f"--global-batch ({cfg.global_batch}) must be divisible by dp ({par.dp})")
    if model.units < par.pp:
        raise ConfigError(
            f"{model.layers} layers + embedding + head = {model.units} units cannot fill pp = {par.pp} stages"
        )
    if par.sequence_parallel and cfg.seq_len % par.tp:
        raise ConfigError(f"--sequence-parallel needs --seq-len ({cfg.seq_len}) divisible by --tp ({par.tp})")


def layouts(req: Request) -> list[tuple[int, int, int]]:
    """(tp, pp, dp) with tp·pp·dp = gpus, the given ones fixed."""
    n = req.gpus
    tps = [req.tp] if req.tp else _divisors(n)
    out = []
    for tp in tps:
        for pp in [req.pp] if req.pp else _divisors(n // tp) if n % tp == 0 else []:
            if n % (tp * pp) == 0:
                out.append((tp, pp, n // (tp * pp)))
    return out


def search(req: Request, hw) -> tuple[list[Plan], list[Rejected]]:
    """(plans best first, the layouts that cannot run). A request that fixes tp and pp must be valid:
    its errors are the user's (ConfigError)."""
    if req.tp and req.pp:
        if req.gpus % (req.tp * req.pp):
            raise ConfigError(f"--gpus ({req.gpus}) must be divisible by tp*pp ({req.tp}*{req.pp} = {req.tp * req.pp})")
        dp = req.gpus // (req.tp * req.pp)
        _validate_layout(replace(req.cfg, parallel=replace(req.cfg.parallel, tp=req.tp, pp=req.pp, dp=dp)))
        knob_choices(req, req.tp, req.pp, dp)
    plans, rejected = [], []
    for tp, pp, dp in layouts(req):
        result = best_for_layout(req, tp, pp, dp, hw)
        (rejected if isinstance(result, Rejected) else plans).append(result)
    plans.sort(key=lambda p: p.step.step_s)
    return plans, rejected
