"""Hang watchdog: turn a stuck communication into a message and an abort instead of a silent hang.

A daemon thread looks at the operations this rank is blocked in (a collective, or the wait() of a
non-blocking one: a send left in flight while the rank computes is not a hang). When one has waited
longer than the timeout, the rank prints what it is waiting for and the last completed operation (sequence number,
kind, model scope) of every group. The ranks whose watchdogs fired then compare notes over a
communicator of their own, point to point with a bounded wait, so that ranks that never report do not
stop the others: a rank that does not report is waiting in no communication (computing, hung outside
MPI, or dead), which is what the others wait for, and is named as stalled; a rank whose operation in
some group differs from its peers' (another kind or another sequence number) is named as
desynchronised. The lowest reporting rank prints that report, whichever rank stalled. Then the job is
aborted.
"""

import json
import sys
import threading
import time

import numpy

from mpmp.comm import ledger as _ledger

EXIT_WATCHDOG = 3  # the job was aborted because an operation waited longer than --comm-timeout


class Watchdog:
    def __init__(self, comm, timeout: float, poll: float = 0.5, exchange_wait: float = 5.0):
        """comm: MPI.COMM_WORLD (duplicated here, so the exchange never mixes with the job's messages)."""
        self.comm = comm.Dup()
        self.rank = comm.Get_rank()
        self.timeout, self.poll, self.exchange_wait = timeout, poll, exchange_wait
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpmp-watchdog", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def _oldest(self):
        now = time.perf_counter()  # the clock blocked_since() reads
        items = _ledger.get().blocked_since()
        if not items:
            return None
        group, seq, kind, label, started = min(items, key=lambda it: it[4])
        return (group, seq, kind, label, now - started)

    def _run(self):
        while not self._stop.wait(self.poll):
            oldest = self._oldest()
            if oldest and oldest[4] > self.timeout:
                self._fire(oldest)
                return

    def _fire(self, oldest):
        group, seq, kind, label, waited = oldest
        led = _ledger.get()
        done = ", ".join(f"{g}#{s} {k}" + (f" ({lb})" if lb else "") for g, (s, k, lb) in sorted(led.last_done.items()))
        where = f" in {label}" if label else ""
        sys.stderr.write(
            f"rank {self.rank}: communication timeout: {kind} on group {group} (#{seq}{where}) has not completed "
            f"after {waited:.0f} s; last completed per group: {done or 'none'}\n"
        )
        sys.stderr.flush()
        states = self._exchange({"group": group, "seq": seq, "kind": kind})
        if self.rank == min(states):  # the lowest rank that reported speaks for all
            sys.stderr.write(exchange_report(states, self.comm.Get_size()) + "\n")
        sys.stderr.flush()
        from mpmp.comm.mpi import abort_world

        abort_world(EXIT_WATCHDOG, self.comm)

    def _exchange(self, mine) -> dict:
        """{rank: its stuck operation} of the ranks whose watchdog fired, this one included: each sends
        its state to every peer and collects what the peers send until all have, or for
        exchange_wait seconds. Point to point, so a rank that never reports stops nobody."""
        from mpi4py import MPI

        size = self.comm.Get_size()
        payload = numpy.frombuffer(json.dumps(mine).encode().ljust(_STATE_BYTES)[:_STATE_BYTES], numpy.uint8).copy()
        peers = [r for r in range(size) if r != self.rank]
        inbox = {r: numpy.zeros(_STATE_BYTES, dtype=numpy.uint8) for r in peers}
        receives = {r: self.comm.Irecv([inbox[r], MPI.BYTE], source=r, tag=_TAG) for r in peers}
        # never waited for (a stalled peer may never receive them); kept alive until the abort
        self._sends = [self.comm.Isend([payload, MPI.BYTE], dest=r, tag=_TAG) for r in peers]
        states = {self.rank: mine}
        deadline = time.monotonic() + self.exchange_wait
        while receives and time.monotonic() < deadline:
            for r in [r for r, req in receives.items() if req.Test()]:
                states[r] = json.loads(bytes(inbox[r]).decode().strip())
                del receives[r]
            time.sleep(0.05)
        return states


_STATE_BYTES = 256  # one rank's stuck operation, as padded JSON
_TAG = 7  # the watchdog's own communicator carries nothing else


def start_watchdog(world_size: int, timeout: float):
    """A started Watchdog over MPI's world for a job of several ranks and --comm-timeout > 0, else
    None (one process has no peer to wait for; 0 turns the watchdog off)."""
    if world_size == 1 or timeout <= 0:
        return None
    from mpmp.comm.mpi import MPI

    return Watchdog(MPI().COMM_WORLD, timeout).start()


def exchange_report(states: dict, size: int) -> str:
    """The job's report from the stuck operations of the ranks that reported ({rank: state}): first
    the ranks that did not (stalled outside any communication), then desync_report's findings."""
    silent = [r for r in range(size) if r not in states]
    if not silent:
        return desync_report(states)
    who = f"rank {silent[0]}" if len(silent) == 1 else "ranks " + ", ".join(map(str, silent))
    line = (
        f"stalled: {who} did not report to the watchdog: not waiting in any communication (computing, "
        f"hung outside MPI, or dead), so the ranks that wait for {'it' if len(silent) == 1 else 'them'} cannot go on"
    )
    odd = _odd_ranks(states)
    return "\n".join([line, *odd])


def _odd_ranks(states: dict) -> list[str]:
    """A line per rank whose stuck operation differs from the majority of its group's members."""
    lines, by_group = [], {}
    for rank, st in sorted(states.items()):
        by_group.setdefault(st["group"], []).append((rank, st["kind"], st["seq"]))
    for group, members in sorted(by_group.items()):
        votes = {}
        for _, kind, seq in members:
            votes[(kind, seq)] = votes.get((kind, seq), 0) + 1
        majority = max(votes, key=votes.get)
        for r, k, s in members:
            if (k, s) != majority:
                lines.append(
                    f"desync: rank {r} is in {k} #{s} on group {group} while its peers are in {majority[0]} #{majority[1]}"
                )
    return lines


def desync_report(states) -> str:
    """Name the ranks whose stuck operation differs from the majority of their group's members.
    states: {rank: state}."""
    lines = _odd_ranks(states)
    kinds = {(st["kind"], st["seq"]) for st in states.values()}
    if not lines and len(kinds) > 1:
        lines.append(
            "stuck operations: "
            + "; ".join(f"rank {r}: {st['kind']} on {st['group']} #{st['seq']}" for r, st in sorted(states.items()))
        )
    return "\n".join(lines) if lines else "every rank waits in the same operation (a peer outside it may have stopped)"
