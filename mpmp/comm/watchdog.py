"""Hang watchdog: turn a stuck communication into a message and an abort instead of a silent hang.

A daemon thread looks at the operations this rank is blocked in (a collective, or the wait() of a
non-blocking one: a send left in flight while the rank computes is not a hang). When one has waited
longer than the timeout, the rank prints what it is waiting for and the last completed operation (sequence number,
kind, model scope) of every group. The ranks then compare notes over a communicator of their own,
with a bounded wait: a rank whose operation in some group differs from its peers' (another kind or
another sequence number) is named as desynchronised. Then the job is aborted.
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
        led = _ledger.get()
        now = led.now()
        items = list(led.blocked.values())
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
        report = self._exchange({"group": group, "seq": seq, "kind": kind})
        if report and self.rank == 0:
            sys.stderr.write(report + "\n")
        from mpmp.comm.mpi import abort_world

        abort_world(EXIT_WATCHDOG, self.comm)

    def _exchange(self, mine):
        """All ranks' stuck operations, gathered with a bounded wait; the desync report (rank 0)."""
        from mpi4py import MPI

        size = self.comm.Get_size()
        payload = json.dumps(mine).encode().ljust(256)[:256]
        send = numpy.frombuffer(payload, dtype=numpy.uint8).copy()
        recv = numpy.zeros(256 * size, dtype=numpy.uint8)
        req = self.comm.Iallgather([send, MPI.BYTE], [recv, MPI.BYTE])
        deadline = time.time() + self.exchange_wait
        while not req.Test():
            if time.time() > deadline:
                return f"rank {self.rank}: not every rank reached the watchdog exchange (a rank may have died)"
            time.sleep(0.05)
        states = [json.loads(bytes(recv[i * 256 : (i + 1) * 256]).decode().strip()) for i in range(size)]
        return desync_report(states)


def desync_report(states) -> str:
    """Name the ranks whose stuck operation differs from the majority of their group's members."""
    lines = []
    by_group = {}
    for rank, st in enumerate(states):
        by_group.setdefault(st["group"], []).append((rank, st["kind"], st["seq"]))
    for group, members in sorted(by_group.items()):
        votes = {}
        for _, kind, seq in members:
            votes[(kind, seq)] = votes.get((kind, seq), 0) + 1
        majority = max(votes, key=votes.get)
        odd = [(r, k, s) for r, k, s in members if (k, s) != majority]
        for r, k, s in odd:
            lines.append(
                f"desync: rank {r} is in {k} #{s} on group {group} while its peers are in {majority[0]} #{majority[1]}"
            )
    kinds = {(st["kind"], st["seq"]) for st in states}
    if not lines and len(kinds) > 1:
        lines.append(
            "stuck operations: "
            + "; ".join(f"rank {r}: {st['kind']} on {st['group']} #{st['seq']}" for r, st in enumerate(states))
        )
    return "\n".join(lines) if lines else "every rank waits in the same operation (a peer outside it may have stopped)"
