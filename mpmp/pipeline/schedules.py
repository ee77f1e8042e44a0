"""Pipeline schedules as data: per-rank instruction lists, built and checked without MPI.

A schedule first fixes each rank's order of computations, F (forward), B (backward; input gradient
only when split), W (weight gradient), on (micro-batch, chunk) pairs; `with_communication` then
inserts the transfers that order implies. The gradient reduction and the optimizer step that follow
a rank's list are the trainer's (mpmp/runtime.py), not the pipeline's.

Chunks: with v virtual stages, rank (stage) s holds model chunks s, s + pp, ..., s + (v-1)·pp
(Megatron's interleaving, arXiv 2104.04473 §2.2); `chunk` in an instruction is the local index 0..v-1
and the virtual stage is chunk·pp + s.

Schedules:
  gpipe        all forwards, then all backwards (GPipe, arXiv 1811.06965)
  1f1b         PipeDream-Flush (arXiv 2006.09503): pp - s - 1 warm-up forwards, then one forward /
               one backward, then the remaining backwards; at most pp - s micro-batches in flight
  interleaved  1F1B over v chunks per rank (arXiv 2104.04473 §2.2); needs m >= pp and v >= 2
  zb-h1        zero bubble ZB-H1 (arXiv 2401.10241 §2.1): backward split into B and W; delayed W
               passes fill the bubbles; at most pp micro-batches in flight on every stage
"""

from dataclasses import dataclass

from mpmp.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
MAX_TAGS = 32768  # the tag range every MPI library offers (MPI_TAG_UB >= 32767)


@dataclass(frozen=True)
class Instr:
    mb: int = -1
    chunk: int = 0

    def __str__(self):
        name = type(self).__name__
        return name + "()" if self.mb < 0 else f"{name}(mb={self.mb}, chunk={self.chunk})"


class RecvForward(Instr): ...


class Forward(Instr): ...


class SendForward(Instr): ...


class RecvBackward(Instr): ...


class Backward(Instr):
    """Input and weight gradients together."""


class BackwardInput(Instr):
    """B: the input gradient only (zero-bubble split); its W follows later."""


class BackwardWeight(Instr):
    """W: the deferred weight gradients of a BackwardInput."""


class SendBackward(Instr): ...


# ---------------------------------------------------------------------------------------------
# Computation orders
# ---------------------------------------------------------------------------------------------


def validate(schedule: str, pp: int, m: int, v: int = 1):
    if schedule not in SCHEDULES:
        raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    if pp < 1 or m < 1 or v < 1:
        raise ConfigError(f"pp ({pp}), micro-batches ({m}) and virtual stages ({v}) must be at least 1")
    if schedule == "interleaved":
        if pp < 2:
            raise ConfigError("--schedule interleaved needs --pp of at least 2")
        if v < 2:
            raise ConfigError("--schedule interleaved needs --virtual-stages of at least 2")
        if m < pp:
            raise ConfigError(f"--schedule interleaved needs micro-batches ({m}) >= pp ({pp})")
    elif v != 1:
        raise ConfigError(f"--virtual-stages {v} needs --schedule interleaved (got {schedule})")


def check_tag_range(pp: int, m: int, v: int = 1):
    """Every pipeline message of a step gets its own MPI tag (see PipelineEngine.tag): (m·pp·v) x 2
    directions must fit MAX_TAGS."""
    if m * pp * v * 2 > MAX_TAGS:
        raise ConfigError(
            f"micro-batches * pp * virtual-stages ({m}*{pp}*{v}) exceeds {MAX_TAGS // 2}: "
            "pipeline messages would run out of MPI tags"
        )


def compute_order(schedule: str, pp: int, m: int, stage: int, v: int = 1) -> list[Instr]:
    """Rank `stage`'s computations in execution order (no communication)."""
    validate(schedule, pp, m, v)
    if schedule == "gpipe":
        return [Forward(i) for i in range(m)] + [Backward(i) for i in range(m)]
    if schedule == "1f1b":
        return _one_f_one_b(pp, m, stage)
    if schedule == "interleaved":
        return _interleaved(pp, m, stage, v)
    return _zb_h1(pp, m, stage)


def _one_f_one_b(pp, m, s):
    warmup = min(pp - s - 1, m)
    order = [Forward(i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Forward(warmup + i), Backward(i)]
    order += [Backward(i) for i in range(m - warmup, m)]
    return order


def _interleaved_groups(pp, m):
    """Micro-batches in groups of pp, the last group absorbing m mod pp (so every group has at least
    pp members and the pipeline never waits for a micro-batch to come round to chunk c + 1)."""
    k = m // pp
    return [pp] * (k - 1) + [m - pp * (k - 1)]


def _interleaved_units(pp, m, v, backward):
    """A rank's (mb, chunk) sequence under interleaving: each group of micro-batches goes through
    chunk 0, 1, ..., v-1 (backwards: v-1, ..., 0) before the next group starts."""
    out, first = [], 0
    for size in _interleaved_groups(pp, m):
        for c in range(v):
            chunk = v - 1 - c if backward else c
            out += [(first + i, chunk) for i in range(size)]
        first += size
    return out


def _interleaved(pp, m, s, v):
    """Megatron's interleaved 1F1B: (pp - s - 1)·2 + (v - 1)·g warm-up forwards (g = pp, or the size of
    the last group when it absorbed m mod pp), then one forward before each backward while forwards
    remain, then the remaining backwards. The simulator finds this matches (p-1)/(vm+p-1) for every
    m >= pp; a backward is never placed before its own forward."""
    fwd = _interleaved_units(pp, m, v, False)
    bwd = _interleaved_units(pp, m, v, True)
    total = m * v
    warmup = min(total, (pp - s - 1) * 2 + (v - 1) * max(_interleaved_groups(pp, m)))
    order, done, f = [], set(), 0
    for i, unit in enumerate(bwd):
        target = min(total, warmup + i + 1)
        while f < target or unit not in done:
            order.append(Forward(*fwd[f]))
            done.add(fwd[f])
            f += 1
        order.append(Backward(*unit))
    return order


def _zb_h1(pp, m, s):
    """ZB-H1 (arXiv 2401.10241 §2.1): 1F1B's order with each backward split into B and W, and stage s
    running the W of micro-batch i - s after the B of micro-batch i. The last stage's B passes thus
    come early and ripple up sooner; the delayed W passes fill the tail. In flight (forward done, W not
    done) stays at pp on every stage: the first stage's 1F1B peak. With F = B = W the bubble is
    (p-1)/(3m+p-1), a third of 1F1B's."""
    warmup = min(pp - s - 1, m)
    order = [Forward(i) for i in range(warmup)]
    w_next = 0

    def weights_after(i):
        nonlocal w_next
        out = []
        while w_next <= i - s:
            out.append(BackwardWeight(w_next))
            w_next += 1
        return out

    for i in range(m - warmup):
        order += [Forward(warmup + i), BackwardInput(i)] + weights_after(i)
    for i in range(m - warmup, m):
        order += [BackwardInput(i)] + weights_after(i)
    return order + [BackwardWeight(j) for j in range(w_next, m)]


# ---------------------------------------------------------------------------------------------
# Communication, and the whole program of a rank
# ---------------------------------------------------------------------------------------------


def with_communication(order: list[Instr], pp: int, stage: int, v: int = 1) -> list[Instr]:
    """Insert receives before and sends after each computation."""
    last_vs = pp * v - 1
    out = []
    for ins in order:
        vs = ins.chunk * pp + stage
        if isinstance(ins, Forward):
            if vs > 0:
                out.append(RecvForward(ins.mb, ins.chunk))
            out.append(ins)
            if vs < last_vs:
                out.append(SendForward(ins.mb, ins.chunk))
        elif isinstance(ins, (Backward, BackwardInput)):
            if vs < last_vs:
                out.append(RecvBackward(ins.mb, ins.chunk))
            out.append(ins)
            if vs > 0:
                out.append(SendBackward(ins.mb, ins.chunk))
        else:
            out.append(ins)
    return out


def build(schedule: str, pp: int, m: int, stage: int, v: int = 1) -> list[Instr]:
    """The instruction list of rank `stage` for one training step."""
    return with_communication(compute_order(schedule, pp, m, stage, v), pp, stage, v)


def build_all(schedule: str, pp: int, m: int, v: int = 1) -> list[list[Instr]]:
    validate(schedule, pp, m, v)
    return [build(schedule, pp, m, s, v) for s in range(pp)]


# ---------------------------------------------------------------------------------------------
# Checking and simulating all ranks together, without MPI
# ---------------------------------------------------------------------------------------------


class ScheduleError(ConfigError):
    pass


def message_key(ins, pp: int, stage: int) -> tuple:
    """(direction, micro-batch, sending virtual stage, receiving virtual stage) of a transfer: the
    same key for a send and the receive that matches it."""
    vs = ins.chunk * pp + stage
    other = vs + 1 if isinstance(ins, (SendForward, RecvBackward)) else vs - 1
    direction = "fwd" if isinstance(ins, (SendForward, RecvForward)) else "bwd"
    if isinstance(ins, (SendForward, SendBackward)):
        return (direction, ins.mb, vs, other)
    return (direction, ins.mb, other, vs)


class _Blocked(Exception):
    """A receive whose message has not been sent yet: the rank waits, the others go on."""


class _Simulation:
    """Every rank's program run against the others (see simulate). Per rank: the position in its
    program, its clock, and per (mb, chunk) how far it got ("F", then "B" when split, then "W")."""

    def __init__(self, programs, pp: int, m: int, v: int, costs: dict, t_comm: float):
        self.programs, self.pp, self.m, self.v = programs, pp, m, v
        self.costs, self.t_comm = costs, t_comm  # instruction type -> per-rank seconds
        self.pos, self.clock = [0] * pp, [0.0] * pp
        self.sent, self.received = {}, set()  # message key -> arrival time; keys received
        self.state = [{} for _ in range(pp)]
        self.have_input, self.have_grad = [set() for _ in range(pp)], [set() for _ in range(pp)]
        self.timeline = [[] for _ in range(pp)]
        self.last_vs = pp * v - 1
        self.handlers = {
            RecvForward: self._recv,
            RecvBackward: self._recv,
            SendForward: self._send,
            SendBackward: self._send,
            Forward: self._forward,
            Backward: self._backward,
            BackwardInput: self._backward,
            BackwardWeight: self._weight,
        }

    def fail(self, s, msg):
        here = self.programs[s][self.pos[s]] if self.pos[s] < len(self.programs[s]) else "end"
        raise ScheduleError(f"rank {s}: {here}: {msg}")

    def run(self):
        while not all(self.pos[s] == len(self.programs[s]) for s in range(self.pp)):
            if not any([self._advance(s) for s in range(self.pp)]):
                stuck = [s for s in range(self.pp) if self.pos[s] < len(self.programs[s])]
                waits = (f"rank {s} waits at {self.programs[s][self.pos[s]]}, which is never sent" for s in stuck)
                raise ScheduleError("deadlock: " + "; ".join(waits))
        self._check_complete()
        return self.timeline

    def _advance(self, s) -> bool:
        """Run rank s until it blocks or ends; whether it got anywhere."""
        progressed = False
        while self.pos[s] < len(self.programs[s]):
            ins = self.programs[s][self.pos[s]]
            if ins.mb >= 0 and not (0 <= ins.mb < self.m and 0 <= ins.chunk < self.v):
                self.fail(s, f"micro-batch or chunk out of range (m = {self.m}, v = {self.v})")
            try:
                self.handlers[type(ins)](s, ins, (ins.mb, ins.chunk))
            except _Blocked:
                break
            if type(ins) in self.costs:
                start = self.clock[s]
                self.clock[s] += self.costs[type(ins)][s]
                self.timeline[s].append((start, self.clock[s], ins))
            self.pos[s] += 1
            progressed = True
        return progressed

    def _recv(self, s, ins, unit):
        key = message_key(ins, self.pp, s)
        if key not in self.sent:
            raise _Blocked
        if key in self.received:
            self.fail(s, "message received twice")
        self.received.add(key)
        self.clock[s] = max(self.clock[s], self.sent[key])
        (self.have_input if isinstance(ins, RecvForward) else self.have_grad)[s].add(unit)

    def _send(self, s, ins, unit):
        key = message_key(ins, self.pp, s)
        if key in self.sent:
            self.fail(s, "message sent twice")
        done = self.state[s].get(unit)
        if done is None or (isinstance(ins, SendBackward) and done == "F"):
            self.fail(s, "sends a result that has not been computed")
        self.sent[key] = self.clock[s] + self.t_comm

    def _forward(self, s, ins, unit):
        if unit in self.state[s]:
            self.fail(s, "forward computed twice")
        if ins.chunk * self.pp + s > 0 and unit not in self.have_input[s]:
            self.fail(s, "forward without its input (missing RecvForward)")
        self.state[s][unit] = "F"

    def _backward(self, s, ins, unit):
        if self.state[s].get(unit) != "F":
            self.fail(s, "backward before its forward, or twice")
        if ins.chunk * self.pp + s < self.last_vs and unit not in self.have_grad[s]:
            self.fail(s, "backward without its output gradient (missing RecvBackward)")
        self.state[s][unit] = "W" if isinstance(ins, Backward) else "B"

    def _weight(self, s, ins, unit):
        if self.state[s].get(unit) != "B":
            self.fail(s, "weight gradient before its input-gradient backward, or twice")
        self.state[s][unit] = "W"

    def _check_complete(self):
        for s in range(self.pp):
            for unit in ((mb, c) for mb in range(self.m) for c in range(self.v)):
                if self.state[s].get(unit) != "W":
                    raise ScheduleError(
                        f"rank {s}: micro-batch {unit[0]} chunk {unit[1]} is not fully computed "
                        f"(state {self.state[s].get(unit)})"
                    )
        unreceived = set(self.sent) - self.received
        if unreceived:
            d, mb, src, dst = sorted(unreceived)[0]
            raise ScheduleError(
                f"rank {src % self.pp}: a {d} message of micro-batch {mb} to rank {dst % self.pp} is never received"
            )


def simulate(programs, pp: int, m: int, v: int = 1, *, t_f=1.0, t_b=1.0, t_w=1.0, t_comm=0.0):
    """Run every rank's program against the others as an event simulation: sends never block (MPI
    Isend), receives wait for their message. Checks that every send is received, nothing waits
    forever, each (mb, chunk) is computed F, then B, then W exactly once, and forward inputs and
    backward gradients exist when used. Times: F, B, W of a stage's whole share of the model (a chunk
    costs 1/v of it; a fused Backward costs t_b + t_w), each a number or a list of one per stage;
    t_comm: a transfer's latency. Returns per-rank lists of (start, end, instr) for computations.

    Raises ScheduleError naming the rank and instruction at fault.
    """
    if len(programs) != pp:
        raise ScheduleError(f"{len(programs)} instruction lists for pp = {pp}")

    def per_stage(t):
        return [float(x) / v for x in (t if isinstance(t, (list, tuple)) else [t] * pp)]

    f, b, w = per_stage(t_f), per_stage(t_b), per_stage(t_w)
    costs = {Forward: f, Backward: [x + y for x, y in zip(b, w)], BackwardInput: b, BackwardWeight: w}
    return _Simulation(programs, pp, m, v, costs, t_comm).run()


def check(programs, pp: int, m: int, v: int = 1):
    """Raise ScheduleError unless the programs are complete, matched and deadlock-free."""
    simulate(programs, pp, m, v)


def bubble_fraction(timeline) -> float:
    """Idle share of the ranks' time between the first start and the last end."""
    end = max(t[-1][1] for t in timeline if t)
    busy = sum(e - s for t in timeline for s, e, _ in t)
    return 1 - busy / (end * len(timeline))


def theoretical_bubble(schedule: str, pp: int, m: int, v: int = 1) -> float:
    """Bubble fractions from the papers with F = B = W: GPipe and 1F1B (p-1)/(m+p-1); interleaved
    (p-1)/(v m + p-1), about 1/v of that; ZB-H1 (p-1)/(3m + p-1), about a third (for m >= p; with
    fewer micro-batches the dependency chain alone makes the bubble larger)."""
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / (m + pp - 1)
    if schedule == "interleaved":
        return (pp - 1) / (v * m + pp - 1)
    return (pp - 1) / (3 * m + pp - 1)
