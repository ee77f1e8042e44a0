"""Run by `python -m mpmp.plan calibrate` as `mpirun -n 2 python -m mpmp.plan._pingpong`: MPI latency and
bandwidth between two ranks of this machine, and how much of a non-blocking all-reduce progresses while
the rank computes. Rank 0 prints one JSON line {"latency_s", "bandwidth", "overlap"}."""

import json
import statistics
import time

import numpy

from mpmp.plan.calibrate import median_seconds


def main():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()

    def pingpong(buf):
        if rank == 0:
            comm.Send(buf, peer), comm.Recv(buf, peer)
        else:
            comm.Recv(buf, peer), comm.Send(buf, peer)

    small, big = numpy.zeros(1, numpy.float64), numpy.zeros(4 << 20, numpy.float32)  # 8 B, 16 MiB
    pingpong(small), pingpong(big)
    latency = median_seconds(lambda: pingpong(small), 200) / 2
    bandwidth = big.nbytes / (median_seconds(lambda: pingpong(big), 10) / 2 - latency)

    # overlap: an all-reduce's blocking time, against what is left to wait after computing that long
    comm.Barrier()
    blocking = median_seconds(lambda: comm.Allreduce(MPI.IN_PLACE, big), 5)
    a = numpy.ones((256, 256), numpy.float32)

    def overlapped():
        req = comm.Iallreduce(MPI.IN_PLACE, big)
        end = time.perf_counter() + blocking
        while time.perf_counter() < end:
            a @ a
        t = time.perf_counter()
        req.Wait()
        return time.perf_counter() - t

    waited = statistics.median(overlapped() for _ in range(5))
    if rank == 0:
        print(json.dumps({"latency_s": latency, "bandwidth": bandwidth, "overlap": max(0.0, 1 - waited / blocking)}))


if __name__ == "__main__":
    main()
