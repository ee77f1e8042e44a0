"""Pipeline transfers for NCCL: sends and receives in batches that complete together.

The schedules (schedules.py) are checked under MPI's model: a send is buffered (Isend) and only a
receive waits. NCCL's model is stricter: a send outside a group call holds the stream until the peer
posts the matching receive, the operations of one group call (ncclGroupStart/End, PyTorch's and
Megatron's batch_isend_irecv) complete together, and sends and receives between two ranks match in
the order they are issued, without tags. `plan` rewrites every rank's instruction list for that
model: its transfer instructions become Transfers instructions, each one group call.

1. Consecutive transfers of a program form one batch: Megatron's pairs (send the forward output and
   receive the next gradient together, arXiv 2104.04473's send_forward_recv_backward). This keeps
   every transfer where the schedule put it, and is deadlock-free for GPipe, 1F1B and ZB-H1.
2. Where that would hang or pair the wrong messages (interleaved 1F1B: its warm-up relies on
   buffered sends, and with pp = 2 both directions share one pair of ranks), sends are deferred: a
   computed output waits on its rank until the rank next needs a message, and goes out in the batch
   of a round in which its receiver is waiting for exactly it. This is MPI's execution with each
   send delayed until its receiver asks, so it finishes whenever the MPI schedule does.

`check` runs the plans against each other under NCCL's rules, without MPI.
"""

from dataclasses import dataclass

from mpmp.pipeline.schedules import (
    Instr,
    RecvBackward,
    RecvForward,
    ScheduleError,
    SendBackward,
    SendForward,
    message_key,
)

SENDS = (SendForward, SendBackward)
RECEIVES = (RecvForward, RecvBackward)
TRANSFERS = SENDS + RECEIVES


@dataclass(frozen=True)
class Transfers(Instr):
    """Sends and receives issued in one group call (batch_isend_irecv); they complete together."""

    ops: tuple = ()

    def __str__(self):
        return f"Transfers({', '.join(str(op) for op in self.ops)})"


def plan(programs, pp: int) -> list[list[Instr]]:
    """Every rank's program with its transfers batched for NCCL (see the module's docstring);
    checked with `check`. Raises ScheduleError if the programs cannot run even on MPI."""
    consecutive = [_consecutive(p) for p in programs]
    try:
        check(consecutive, pp)
        return consecutive
    except ScheduleError:
        deferred = _deferred(programs, pp)
        check(deferred, pp)
        return deferred


def _consecutive(program) -> list[Instr]:
    out, run = [], []
    for ins in program:
        if isinstance(ins, TRANSFERS):
            run.append(ins)
            continue
        if run:
            out.append(Transfers(ops=tuple(run)))
            run = []
        out.append(ins)
    if run:
        out.append(Transfers(ops=tuple(run)))
    return out


def _deferred(programs, pp: int) -> list[list[Instr]]:
    """Rounds: every rank runs until it needs a message; each waiting receiver whose message is
    computed gets it, the send going into its sender's batch of the round."""
    pos, plans = [0] * pp, [[] for _ in range(pp)]
    pending = [{} for _ in range(pp)]  # per rank: message key -> computed, unsent SendForward/Backward
    while True:
        waiting = [_run_to_receive(programs[s], s, pos, plans[s], pending[s], pp) for s in range(pp)]
        if all(w is None for w in waiting):
            return plans
        batches = [[] for _ in range(pp)]
        for receiver, recv in enumerate(waiting):
            if recv is None:
                continue
            key = message_key(recv, pp, receiver)
            sender = key[2] % pp
            if key in pending[sender]:
                batches[sender].append(pending[sender].pop(key))
                batches[receiver].append(recv)
                pos[receiver] += 1
        if not any(batches):
            stuck = {s: str(w) for s, w in enumerate(waiting) if w is not None}
            raise ScheduleError(f"deadlock even with buffered sends: ranks wait at {stuck}")
        for s, ops in enumerate(batches):
            if ops:
                plans[s].append(Transfers(ops=tuple(ops)))


def _run_to_receive(program, s, pos, plan_s, pending_s, pp):
    """Advance rank s to its next receive (returned; None at the end): computations go to its plan,
    sends into its pending set."""
    while pos[s] < len(program):
        ins = program[pos[s]]
        if isinstance(ins, RECEIVES):
            return ins
        if isinstance(ins, SENDS):
            pending_s[message_key(ins, pp, s)] = ins
        else:
            plan_s.append(ins)
        pos[s] += 1
    return None


# ---------------------------------------------------------------------------------------------
# Checking: every rank's plan against the others under NCCL's rules
# ---------------------------------------------------------------------------------------------


def check(plans, pp: int):
    """Raise ScheduleError unless the plans run to the end under NCCL's rules: a rank at a Transfers
    waits until every operation in it is matched by the peer's; the k-th send from a to b is the
    k-th receive at b from a, and must be the same message; a transfer outside Transfers is refused."""
    _NcclRun(plans, pp).run()


class _NcclRun:
    def __init__(self, plans, pp):
        self.plans, self.pp = plans, pp
        self.pos = [0] * pp
        self.sends, self.recvs = {}, {}  # (src, dst) -> message keys in issue order
        self.posted = [None] * pp  # per rank: [(list, index)] of its batch in flight

    def run(self):
        while not all(self.pos[s] == len(self.plans[s]) for s in range(self.pp)):
            if not any([self._advance(s) for s in range(self.pp)]):
                where = {s: str(self.plans[s][self.pos[s]]) for s in range(self.pp) if self.pos[s] < len(self.plans[s])}
                raise ScheduleError(f"deadlock on NCCL: ranks wait at {where}")
        for pair, keys in self.sends.items():
            if len(self.recvs.get(pair, [])) != len(keys):
                raise ScheduleError(
                    f"rank {pair[0]} sends {len(keys)} messages to rank {pair[1]}, which receives fewer"
                )

    def _advance(self, s) -> bool:
        progressed = False
        while self.pos[s] < len(self.plans[s]):
            ins = self.plans[s][self.pos[s]]
            if isinstance(ins, TRANSFERS):
                raise ScheduleError(f"rank {s}: {ins} outside a batch: on NCCL it holds the stream until matched")
            if isinstance(ins, Transfers):
                if self.posted[s] is None:
                    self.posted[s] = [self._post(s, op) for op in ins.ops]
                    progressed = True
                if not all(self._matched(s, *p) for p in self.posted[s]):
                    return progressed
                self.posted[s] = None
            self.pos[s] += 1
            progressed = True
        return progressed

    def _post(self, s, op):
        key = message_key(op, self.pp, s)
        if isinstance(op, SENDS):
            pair, table = (s, key[3] % self.pp), self.sends
        else:
            pair, table = (key[2] % self.pp, s), self.recvs
        table.setdefault(pair, []).append(key)
        return pair, len(table[pair]) - 1, table is self.sends

    def _matched(self, s, pair, index, is_send) -> bool:
        other = (self.recvs if is_send else self.sends).get(pair, [])
        if len(other) <= index:
            return False
        mine = (self.sends if is_send else self.recvs)[pair][index]
        if other[index] != mine:
            raise ScheduleError(
                f"ranks {pair[0]} -> {pair[1]}: transfer #{index + 1} is {mine} on rank {s} but {other[index]} on "
                "its peer: NCCL matches sends and receives in issue order (no tags)"
            )
        return True
