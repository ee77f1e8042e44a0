"""Device check (d): a one-rank NCCL communicator (mpmp.comm.nccl.NCCLGroup) through every collective
and a batched send/recv, against the values NCCL must give on one rank.

Group's public collectives skip a group of one (nothing to move), so the raw operations are called
directly: they are what the public ones call on more ranks. The batched send/recv goes to this rank
itself inside one NCCL group call, through the public batch_isend_irecv.
Usage: python tests/gpu/check_nccl.py [--json FILE]   (one process; mpi4py needs libmpi)
"""

import argparse
import json
import sys

import cupy
import numpy

RESULTS = []


def check(name, got, want):
    ok = bool(numpy.array_equal(cupy.asnumpy(got), numpy.asarray(want)))
    RESULTS.append({"check": name, "ok": ok})
    print(f"{'PASS' if ok else 'FAIL'}  {name}", flush=True)


def run(g):
    rng = numpy.random.default_rng(0)
    for dtype in (numpy.float32, numpy.float16, numpy.float64, numpy.int32, numpy.int64):
        host = (rng.integers(-50, 50, 1000) / 4).astype(dtype)
        for op in ("sum", "max", "min"):
            x = cupy.asarray(host)
            g._all_reduce(x, op)
            check(f"all_reduce {op} {numpy.dtype(dtype).name}", x, host)
        x = cupy.asarray(host)
        g.iall_reduce(x)  # size 1: a completed handle; the raw non-blocking op below uses NCCL
        reqs = g._iall_reduce(x, "sum")
        g._wait_all(reqs)
        check(f"iall_reduce + event wait {numpy.dtype(dtype).name}", x, host)
        out = cupy.empty_like(x)
        g._all_gather(x.reshape(1000, 1), out.reshape(1000, 1), [1000])
        check(f"all_gather {numpy.dtype(dtype).name}", out, host)
        out = cupy.empty_like(x)
        g._reduce_scatter(x, out, [1000], "sum")
        check(f"reduce_scatter {numpy.dtype(dtype).name}", out, host)
        y = cupy.asarray(host)
        g._broadcast(y, 0)
        check(f"broadcast {numpy.dtype(dtype).name}", y, host)
    from mpmp.backend import to_wire

    pattern = cupy.asarray(to_wire(numpy.linspace(-3, 3, 64, dtype=numpy.float32), "bf16"))
    expect = cupy.asnumpy(pattern)
    g._all_reduce(pattern, "sum:bf16")
    check("all_reduce sum of bf16 patterns (NCCL_BFLOAT16)", pattern, expect)
    send = cupy.arange(100, dtype=cupy.float32)
    recv = cupy.zeros(100, dtype=cupy.float32)
    send2, recv2 = cupy.ones(7, dtype=cupy.int64), cupy.zeros(7, dtype=cupy.int64)
    handles = g.batch_isend_irecv(
        [("send", send, 0, 0), ("send", send2, 0, 1), ("recv", recv, 0, 0), ("recv", recv2, 0, 1)]
    )
    for h in handles:
        h.wait()
    check("batch_isend_irecv to itself (order kept)", recv, numpy.arange(100))
    check("batch_isend_irecv second pair", recv2, numpy.ones(7))
    g._barrier()
    check("barrier", cupy.zeros(1), [0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from mpi4py import MPI

    from mpmp.comm.nccl import NCCLGroup

    cupy.cuda.Device(0).use()
    g = NCCLGroup(MPI.COMM_WORLD, "world")
    print(f"NCCL {cupy.cuda.nccl.get_version()} on {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    try:
        run(g)
    except Exception as exc:
        RESULTS.append({"check": "nccl", "ok": False, "error": repr(exc)})
        print(f"FAIL  raised {exc!r}", flush=True)
    cupy.cuda.get_current_stream().synchronize()
    g.close()
    failed = [r for r in RESULTS if not r["ok"]]
    print(f"nccl: {len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
