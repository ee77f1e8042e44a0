"""The ledger: a record of every operation that crosses a process boundary.

Always on, and cheap: per (kind, group) totals of count, bytes and seconds blocked (for non-blocking
operations the time spent in wait(), so overlapped communication costs nothing), and per group the sequence
number and kind of the last completed operation (what the hang watchdog prints). With
`keep_events=True` (tests, `--trace`) every operation is also kept as an Event, so the bytes moved can
be checked against their formula and drawn on a timeline (Chrome trace JSON, one track per rank).

Bytes are the message size in nccl-tests' convention (all-reduce: the buffer; all-gather: the gathered
output; reduce-scatter: the input; send/recv/broadcast: the buffer); `wire_bytes` turns that into the
bytes a rank sends with ring algorithms, e.g. 2(n-1)/n of the buffer for an all-reduce.
"""

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter as _perf_counter

# nccl-tests' bus-bandwidth factors (busbw = algbw x factor, PERFORMANCE.md there): with ring
# algorithms, also the share of the message each rank sends. A size-1 group records nothing.
_BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "send": lambda n: 1.0,
    "sendrecv": lambda n: 1.0,
    "recv": lambda n: 0.0,
}


def bus_factor(kind: str, n: int) -> float:
    """busbw / algbw of an operation on n ranks (a non-blocking "iall_reduce" as its blocking twin);
    0 for operations that move no payload (barrier)."""
    base = kind[1:] if kind.startswith("i") and kind[1:] in _BUS_FACTOR else kind
    factor = _BUS_FACTOR.get(base)
    return factor(n) if factor else 0.0


def wire_bytes(kind: str, nbytes: int, group_size: int) -> float:
    """Bytes one rank sends for an operation of this message size (ring algorithms)."""
    return nbytes * bus_factor(kind, group_size)


@dataclass(frozen=True, slots=True)
class Event:
    """One operation (or span of work) as it happened (built when Ledger.events is read)."""

    kind: str  # all_reduce, all_gather, reduce_scatter, broadcast, send, recv, ... or <span cat>:<name>
    group: str  # tp, dp, pp, embed, world, ...; for spans their category (compute, step)
    group_size: int
    peer: int  # group rank of the peer for send/recv, -1 for collectives
    nbytes: int
    dtype: str
    start: float  # seconds since the epoch (all ranks of a node share the clock)
    end: float
    seq: int  # sequence number of this operation within its group on this rank
    label: str  # the model scope that issued it, e.g. "h.3" ("" outside the model)
    blocked: float = 0.0  # seconds this rank waited for it (the whole span unless non-blocking)

    @property
    def wire_bytes(self) -> float:
        return wire_bytes(self.kind, self.nbytes, self.group_size)


class Ledger:
    def __init__(self, rank: int = 0, keep_events: bool = False):
        self.rank = rank
        self.keep_events = keep_events
        self._rows: list[tuple] = []  # the kept events' fields, as recorded
        self._events: list[Event] = []  # the Events built from them so far
        self.totals = defaultdict(lambda: [0, 0, 0.0])  # (kind, group) -> [count, bytes, seconds]
        self.seq = defaultdict(int)  # group -> operations started
        self.last_done: dict[str, tuple[int, str, str]] = {}  # group -> (seq, kind, label) completed
        self.in_flight: dict[int, tuple] = {}  # token -> (group, seq, kind, label, started)
        self.blocked: dict[int, tuple] = {}  # the subset this rank is waiting in -> (..., waiting since)
        self.waiting: tuple | None = None  # the blocking operation in progress (enter/leave), same fields
        self.label = ""
        # times are kept as perf_counter() readings (the cheapest clock to read) and turned into seconds
        # since the epoch when read: wall = reading + _to_wall
        self._to_wall = time.time() - time.perf_counter()
        self._token = 0

    def now(self) -> float:
        """Seconds since the epoch (all ranks of a node share the clock)."""
        return self._to_wall + _perf_counter()

    def blocked_since(self) -> list[tuple]:
        """(group, seq, kind, label, since) of every operation this rank is waiting in now, since a
        perf_counter() reading (what the watchdog watches)."""
        items = list(self.blocked.values())
        waiting = self.waiting
        return items + [waiting] if waiting is not None else items

    @contextmanager
    def scope(self, label: str):
        """Tag every operation issued inside with a model scope (e.g. the block name)."""
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    # enter/leave (blocking operations) and begin/wait_start/end (non-blocking ones) run once per
    # message: written for speed, one shared helper call (_close) each (see bench comm)
    def enter(self, kind: str, group: str):
        """A blocking operation starts; the watchdog counts this rank as waiting in it until leave().
        One at a time: communication is issued from one thread."""
        seq = self.seq[group]
        self.seq[group] = seq + 1
        self.waiting = (group, seq, kind, self.label, _perf_counter())

    def leave(self, group_size: int, peer: int, nbytes: int, dtype: str):
        """The blocking operation enter() started has completed."""
        stop = _perf_counter()
        entry, self.waiting = self.waiting, None
        self._close(entry, stop, stop - entry[4], group_size, peer, nbytes, dtype)

    def begin(self, kind: str, group: str, blocking: bool = True) -> int:
        """Mark an operation as started; returns a token for end(). A non-blocking operation counts as
        blocked (what the watchdog watches) only from wait_start()."""
        self._token = token = self._token + 1
        seq = self.seq[group]
        self.seq[group] = seq + 1
        self.in_flight[token] = entry = (group, seq, kind, self.label, _perf_counter())
        if blocking:
            self.blocked[token] = entry
        return token

    def wait_start(self, token: int):
        """The rank now waits for a non-blocking operation."""
        group, seq, kind, label, _ = self.in_flight[token]
        self.blocked[token] = (group, seq, kind, label, _perf_counter())

    def end(self, token: int, group_size: int, peer: int, nbytes: int, dtype: str, blocked: float | None = None):
        """blocked: for a non-blocking operation, the seconds spent waiting for it (what the totals
        count); its event still spans from start to completion."""
        stop = _perf_counter()
        entry = self.in_flight.pop(token)
        self.blocked.pop(token, None)
        self._close(entry, stop, stop - entry[4] if blocked is None else blocked, group_size, peer, nbytes, dtype)

    def _close(self, entry, stop, waited, group_size, peer, nbytes, dtype):
        """The record of a completed operation (leave and end): its totals, the last completed
        operation of its group, and its event when events are kept."""
        group, seq, kind, label, start = entry
        total = self.totals[(kind, group)]
        total[0] += 1
        total[1] += nbytes
        total[2] += waited
        self.last_done[group] = (seq, kind, label)
        if self.keep_events:
            self._rows.append((kind, group, group_size, peer, nbytes, dtype, start, stop, seq, label, waited))

    @property
    def events(self) -> list[Event]:
        """Every kept operation and span in the order it ended. The Events are built here, on read,
        from the fields end() keeps: building one per message costs more than the rest of the record."""
        rows, events, wall = self._rows, self._events, self._to_wall
        for kind, group, size, peer, nbytes, dtype, start, stop, seq, label, waited in rows[len(events) :]:
            events.append(Event(kind, group, size, peer, nbytes, dtype, start + wall, stop + wall, seq, label, waited))
        return events

    @contextmanager
    def span(self, name: str, cat: str = "compute"):
        """A span of work for the timeline, events only: cat "compute" (a micro-batch's forward or
        backward, a recomputation, the optimizer) or "step" (a whole training step, named "step K")."""
        if not self.keep_events:
            yield
            return
        start = _perf_counter()
        try:
            yield
        finally:
            self._rows.append((f"{cat}:{name}", cat, 1, -1, 0, "", start, _perf_counter(), -1, self.label, 0.0))

    def mark(self) -> dict:
        """A copy of the totals, for since()."""
        return {key: tuple(t) for key, t in self.totals.items()}

    def since(self, mark: dict) -> dict:
        """{(group, kind): (count, bytes, seconds blocked)} recorded after mark() was taken."""
        out = {}
        for (kind, group), (c, b, s) in self.totals.items():
            c0, b0, s0 = mark.get((kind, group), (0, 0, 0.0))
            if c > c0:
                out[(group, kind)] = (c - c0, b - b0, s - s0)
        return out

    def comm_seconds(self) -> float:
        return sum(t[2] for t in self.totals.values())

    def summary_rows(self):
        """[(kind, group, count, bytes, seconds)] sorted by group then kind."""
        return _sorted_rows(self.totals)

    def reset(self):
        self._rows.clear()
        self._events.clear()
        self.totals.clear()

    def chrome_events(self):
        """This rank's events as Chrome trace 'X' (complete) events; pid = rank, tid 0 for spans of
        work, tid 1 for communication (args.blocked_us: the time this rank waited)."""
        return [_chrome_event(e, self.rank) for e in self.events]


SPAN_CATS = ("compute", "step")


def _chrome_event(e: Event, rank: int) -> dict:
    cat, _, name = e.kind.partition(":")
    common = {"ph": "X", "ts": e.start * 1e6, "dur": max(e.end - e.start, 0.0) * 1e6, "pid": rank}
    if cat in SPAN_CATS and name:
        args = {"label": e.label} | ({"step": int(name.split()[-1])} if cat == "step" else {})
        return common | {"name": name, "cat": cat, "tid": 0, "args": args}
    args = {"bytes": e.nbytes, "peer": e.peer, "seq": e.seq, "label": e.label, "dtype": e.dtype}
    args["blocked_us"] = e.blocked * 1e6
    return common | {"name": f"{e.kind} {e.group}", "cat": e.group, "tid": 1, "args": args}


def chrome_trace(per_rank_events: list[list[dict]], about: dict | None = None) -> str:
    """Merge ranks' event lists into one Chrome trace (openable in Perfetto or chrome://tracing);
    `about` (the run: id, layout, schedule, memory per rank) goes to otherData.mpmp."""
    events = []
    for rank, evs in enumerate(per_rank_events):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "compute"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 1, "args": {"name": "comm"}})
        events.extend(evs)
    trace = {"traceEvents": events, "displayTimeUnit": "ms"}
    if about is not None:
        trace["otherData"] = {"mpmp": about}
    return json.dumps(trace)


def _sorted_rows(totals) -> list:
    return sorted(((k, g, c, b, s) for (k, g), (c, b, s) in totals.items()), key=lambda r: (r[1], r[0]))


def merge_rows(per_rank_rows) -> list:
    """Several ranks' summary_rows() summed per (kind, group), in the same row format and order."""
    totals = defaultdict(lambda: [0, 0, 0.0])
    for rows in per_rank_rows:
        for kind, group, count, nbytes, secs in rows:
            t = totals[(kind, group)]
            t[0] += count
            t[1] += nbytes
            t[2] += secs
    return _sorted_rows(totals)


def format_summary(rows, title="communication") -> str:
    """A table of (kind, group, count, bytes, seconds) rows."""
    lines = [f"{title}: {'kind':<16}{'group':<8}{'ops':>8}{'MiB':>12}{'seconds':>10}"]
    pad = " " * (len(title) + 2)
    for kind, group, count, nbytes, secs in rows:
        lines.append(f"{pad}{kind:<16}{group:<8}{count:>8}{nbytes / 2**20:>12.2f}{secs:>10.3f}")
    return "\n".join(lines)


# The process's ledger. Groups record into it; the trainer and tests may replace it.
_ledger = Ledger()


def get() -> Ledger:
    return _ledger


def install(ledger: Ledger) -> Ledger:
    global _ledger
    _ledger = ledger
    return ledger
