"""`mpirun -n N python -m mpmp.bench comm`: mpmp's collectives beside the raw mpi4py calls they wrap.

For each operation and message size, the same buffers go through mpmp's Group, with the ledger on
and keeping every event (as under --trace), and through mpi4py directly (Allreduce with IN_PLACE,
Allgather, Reduce_scatter_block, Bcast, Send/Recv). The two are timed in turn, A B B A ..., and each
reported time is the median over the repeats of the slowest rank's mean time per operation, as
nccl-tests reports it. Sizes and bandwidths follow nccl-tests (doc/PERFORMANCE.md):

    algbw = size / time
    busbw = algbw * 2(n-1)/n (all_reduce), (n-1)/n (all_gather, reduce_scatter), 1 (broadcast, sendrecv)

size being the buffer for all_reduce and broadcast, the gathered output for all_gather, the input for
reduce_scatter and one message for sendrecv (a ping-pong between ranks 0 and 1: a round trip is two
messages). The last line is the median mpmp/raw busbw ratio over the sizes >= 1 MiB.

A third side, "floor", is the raw call inside a Python function that records the least a ledger can:
a clock reading before and after and one row appended. It is timed in turn with the other two, and
raw/floor is the best mpmp/raw any Python layer that records every message could reach: at small
sizes, where the raw call itself takes a few microseconds, that bound is what limits mpmp/raw.
"""

import argparse
import json
import statistics
import time

import numpy

from mpmp.comm.ledger import bus_factor
from mpmp.comm.mpi import wait_sleeping

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "sendrecv")
MiB = 1 << 20
QUIET_POLL_S = 1e-4  # ranks between timings sleep this long between tests (mpi.wait_sleeping)


def algbw(nbytes: int, seconds: float) -> float:
    """GB/s (10^9 bytes, as nccl-tests)."""
    return nbytes / seconds / 1e9


def busbw(op: str, nbytes: int, seconds: float, n: int) -> float:
    return algbw(nbytes, seconds) * bus_factor(op, n)


def parse_args(argv=None):
    def ops(text):
        chosen = OPS if text == "all" else tuple(text.split(","))
        for op in chosen:
            if op not in OPS:
                raise argparse.ArgumentTypeError(f"unknown op {op!r}; choose from {', '.join(OPS)} or all")
        return chosen

    p = argparse.ArgumentParser(prog="python -m mpmp.bench comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--min-bytes", type=int, default=1 << 10, help="smallest message (default 1 KiB)")
    p.add_argument("--max-bytes", type=int, default=64 * MiB, help="largest message (default 64 MiB)")
    p.add_argument("--step-factor", type=int, default=4, help="each size is this many times the last (default 4)")
    p.add_argument("--ops", type=ops, default=OPS, help=f"comma-separated, from {', '.join(OPS)} (default all)")
    p.add_argument("--dtype", choices=["float32", "float64", "int32", "int64"], default="float32")
    p.add_argument("--iters", type=int, default=None, help="operations per timing (default: ~25 ms worth)")
    p.add_argument("--warmup", type=int, default=2, help="untimed operations per size and side (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timings per side; the median is reported (default 5)")
    p.add_argument("--target-seconds", type=float, default=0.025, help="length of one timing when --iters is unset")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON (rank 0)")
    args = p.parse_args(argv)
    if args.min_bytes < 1 or args.max_bytes < args.min_bytes or args.step_factor < 2:
        p.error("need 1 <= --min-bytes <= --max-bytes and --step-factor >= 2")
    return args


def sizes(lo: int, hi: int, factor: int) -> list[int]:
    out = [lo]
    while out[-1] * factor <= hi:
        out.append(out[-1] * factor)
    return out


def _case(op, nbytes, dtype, group, comm, MPI):
    """(size in nccl-tests' sense, mpmp call, raw call, operations per call) on shared buffers."""
    n, rank, item = comm.Get_size(), comm.Get_rank(), numpy.dtype(dtype).itemsize
    count = nbytes // item
    if op == "all_reduce":
        x = numpy.zeros(count, dtype)
        return x.nbytes, lambda: group.all_reduce(x), lambda: comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM), 1
    if op == "broadcast":
        x = numpy.zeros(count, dtype)
        return x.nbytes, lambda: group.broadcast(x, 0), lambda: comm.Bcast(x, root=0), 1
    per = count // n
    if op == "all_gather":
        send, recv, out = numpy.zeros(per, dtype), numpy.zeros(per * n, dtype), numpy.zeros(per * n, dtype)
        return recv.nbytes, lambda: group.all_gather(send, out=out), lambda: comm.Allgather(send, recv), 1
    if op == "reduce_scatter":
        send, recv, out = numpy.zeros(per * n, dtype), numpy.zeros(per, dtype), numpy.zeros(per, dtype)
        raw = lambda: comm.Reduce_scatter_block(send, recv, op=MPI.SUM)  # noqa: E731
        return send.nbytes, lambda: group.reduce_scatter(send, out=out), raw, 1
    x, y = numpy.zeros(count, dtype), numpy.zeros(count, dtype)  # sendrecv: ping-pong, ranks 0 and 1
    if rank > 1:
        return x.nbytes, lambda: None, lambda: None, 2
    peer = 1 - rank

    def mpmp():
        if rank == 0:
            group.send(x, peer)
            group.recv(y, peer)
        else:
            group.recv(y, peer)
            group.send(x, peer)

    def raw():
        if rank == 0:
            comm.Send(x, dest=peer)
            comm.Recv(y, source=peer)
        else:
            comm.Recv(y, source=peer)
            comm.Send(x, dest=peer)

    return x.nbytes, mpmp, raw, 2


def _timed(fn, iters, comm, MPI) -> float:
    """Seconds per call: each rank's mean over iters calls after a barrier, the slowest rank's."""
    wait_sleeping(comm.Ibarrier(), QUIET_POLL_S)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    mine = numpy.array([(time.perf_counter() - start) / iters])
    slowest = numpy.empty(1)
    wait_sleeping(comm.Iallreduce(mine, slowest, op=MPI.MAX), QUIET_POLL_S)
    return float(slowest[0])


def _interleaved(fns, repeats, iters, per_call, comm, MPI) -> tuple:
    """The median over repeats of each fn's seconds per operation (per_call operations per call, iters
    calls per timing). Interleaved, each side first in turn (A B C, B C A, C A B, ...): drift, and
    whatever the first of a round pays (caches, the progress engine), hit all alike."""
    times = tuple([] for _ in fns)
    for i in range(repeats):
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            times[k].append(_timed(fns[k], iters, comm, MPI) / per_call)
    return tuple(statistics.median(t) for t in times)


def _recorded(raw, rows: list):
    """raw inside a Python call that records the least a ledger can: two clock readings, one row."""

    def call():
        start = time.perf_counter()
        raw()
        rows.append((start, time.perf_counter()))

    return call


def run(args, comm) -> dict:
    """Measure every (op, size); returns the table as a dict (the same on every rank)."""
    from mpmp.comm import ledger
    from mpmp.comm.mpi import MPI, MPIGroup

    mpi = MPI()
    comm = comm.Dup()  # the bench's messages never mix with the caller's
    n, rank = comm.Get_size(), comm.Get_rank()
    group = MPIGroup(comm, "bench")
    previous = ledger.get()
    led = ledger.install(ledger.Ledger(rank, keep_events=True))
    rows = []
    try:
        for op in args.ops:
            for nbytes in sizes(args.min_bytes, args.max_bytes, args.step_factor):
                size, mpmp_fn, raw_fn, per_call = _case(op, nbytes, args.dtype, group, comm, mpi)
                if size == 0:
                    continue  # fewer elements than ranks
                for _ in range(args.warmup):
                    mpmp_fn()
                    raw_fn()
                iters = args.iters or max(1, min(1000, int(args.target_seconds / _timed(raw_fn, 1, comm, mpi))))
                led.reset()
                floor_fn = _recorded(raw_fn, [])
                t_mpmp, t_raw, t_floor = _interleaved(
                    (mpmp_fn, raw_fn, floor_fn), args.repeats, iters, per_call, comm, mpi
                )
                rows.append(
                    {
                        "op": op,
                        "bytes": size,
                        "iters": iters,
                        "mpmp_us": t_mpmp * 1e6,
                        "mpmp_algbw": algbw(size, t_mpmp),
                        "mpmp_busbw": busbw(op, size, t_mpmp, n),
                        "raw_us": t_raw * 1e6,
                        "raw_algbw": algbw(size, t_raw),
                        "raw_busbw": busbw(op, size, t_raw, n),
                        "ratio": t_raw / t_mpmp,  # mpmp busbw / raw busbw
                        "floor_us": t_floor * 1e6,
                        "floor_ratio": t_raw / t_floor,  # the best mpmp/raw a recording Python layer could reach
                        "ledger_events": len(led.events),  # rank 0's, the proof the ledger was on
                    }
                )
                led.reset()
    finally:
        ledger.install(previous)
        comm.Free()
    big = [r for r in rows if r["bytes"] >= MiB]
    per_op = {op: [r["ratio"] for r in big if r["op"] == op] for op in args.ops}
    return {
        "ranks": n,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "mpi": mpi.Get_library_version().splitlines()[0].strip(),
        "rows": rows,
        "median_ratio_ge_1MiB": statistics.median([r["ratio"] for r in big]) if big else None,
        "per_op_ratio_ge_1MiB": {op: statistics.median(v) for op, v in per_op.items() if v},
    }


def format_table(result: dict) -> str:
    head = (
        f"# mpmp comm bench: {result['ranks']} ranks, {result['dtype']}, {result['mpi']}\n"
        f"# mpmp = Group with the ledger on (keep_events); raw = mpi4py on the same buffers; median of "
        f"{result['repeats']} interleaved repeats of the slowest rank's mean\n"
        f"# time in us, algbw and busbw in GB/s (nccl-tests' definitions)\n"
        f"# floor = the raw call inside a Python call that records two clock readings and a row: "
        f"raw/floor bounds mpmp/raw\n"
        f"#{'':>34}{'---------- mpmp ----------':>34}{'----------- raw ----------':>34}"
        f"{'------- floor -------':>31}\n"
        f"#{'op':>15}{'size(B)':>12}{'iters':>7}"
        + f"{'time':>12}{'algbw':>11}{'busbw':>11}" * 2
        + f"{'mpmp/raw':>10}{'time':>11}{'raw/floor':>10}"
    )
    lines = [head]
    for r in result["rows"]:
        lines.append(
            f" {r['op']:>15}{r['bytes']:>12}{r['iters']:>7}"
            f"{r['mpmp_us']:>12.1f}{r['mpmp_algbw']:>11.3f}{r['mpmp_busbw']:>11.3f}"
            f"{r['raw_us']:>12.1f}{r['raw_algbw']:>11.3f}{r['raw_busbw']:>11.3f}{r['ratio']:>10.3f}"
            f"{r['floor_us']:>11.1f}{r['floor_ratio']:>10.3f}"
        )
    if result["per_op_ratio_ge_1MiB"]:
        parts = ", ".join(f"{op} {v:.3f}" for op, v in result["per_op_ratio_ge_1MiB"].items())
        lines.append(f"# mpmp/raw busbw per op, median over sizes >= 1 MiB: {parts}")
    median = result["median_ratio_ge_1MiB"]
    shown = f"{median:.3f}" if median is not None else "n/a (no size >= 1 MiB)"
    lines.append(f"# median mpmp/raw busbw ratio, sizes >= 1 MiB, {result['ranks']} ranks: {shown}")
    return "\n".join(lines)


def main(argv=None, comm=None) -> int:
    args = parse_args(argv)
    from mpmp.comm.mpi import MPI
    from mpmp.errors import ConfigError

    comm = comm if comm is not None else MPI().COMM_WORLD
    if comm.Get_size() < 2:
        raise ConfigError("the comm bench needs at least 2 ranks: mpirun -n 2 python -m mpmp.bench comm")
    result = run(args, comm)
    if comm.Get_rank() == 0:
        print(format_table(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return 0
