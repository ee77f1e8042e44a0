"""Collectives and point-to-point over mpi4py's buffer methods (upper-case: no pickling of arrays).

CuPy arrays go to MPI as device buffers when the MPI library is CUDA-aware (after synchronising the
stream that produced them), otherwise through page-locked (pinned) host buffers from a pool, reused
by size from step to step; `cuda_aware()` says which, and start-up prints it. Also here:
`abort_on_exception`, which turns an uncaught exception on any rank into "rank R: <error>" and
MPI_Abort, so one failing rank ends the job instead of hanging it, and `report_interrupts`, which does
the same for SIGINT (mpirun forwards Ctrl-C to every rank).
"""

import ctypes
import math
import os
import signal
import sys
import threading
import time
import traceback

import numpy

from mpmp.backend import from_wire, is_device_array, to_wire
from mpmp.comm.group import Group

_MPI = None


def MPI():
    """mpi4py's MPI module, imported on first use (importing it initialises MPI)."""
    global _MPI
    if _MPI is None:
        from mpi4py import MPI as mpi

        _MPI = mpi
    return _MPI


_ops = {}


def _op(op):
    """The MPI op for "sum", "max", "min", or "sum:bf16" etc. on 16-bit patterns (a user-defined
    op that widens to float32, reduces and rounds back: MPI has no bf16 arithmetic). Cached: this
    runs once per message."""
    cached = _ops.get(op)
    if cached is not None:
        return cached
    m = MPI()
    if ":" not in op:
        _ops[op] = {"sum": m.SUM, "max": m.MAX, "min": m.MIN}[op]
        return _ops[op]
    base, fmt = op.split(":")
    combine = {"sum": numpy.add, "max": numpy.maximum, "min": numpy.minimum}[base]

    def reduce16(inbuf, inoutbuf, datatype):
        a = from_wire(numpy.frombuffer(inbuf, dtype=numpy.uint16), fmt)
        io = numpy.frombuffer(inoutbuf, dtype=numpy.uint16)
        io[...] = to_wire(combine(a, from_wire(io, fmt)), fmt)

    _ops[op] = m.Op.Create(reduce16, commute=True)
    return _ops[op]


_cuda_aware = None


def cuda_aware() -> bool:
    """Whether MPI can take device pointers: MPMP_CUDA_AWARE=0/1 wins, else MPIX_Query_cuda_support."""
    global _cuda_aware
    if _cuda_aware is None:
        env = os.environ.get("MPMP_CUDA_AWARE")
        if env in ("0", "1"):
            _cuda_aware = env == "1"
        else:
            _cuda_aware = False
            try:
                lib = ctypes.CDLL(None)  # the MPI library is already loaded by mpi4py
                MPI()
                fn = getattr(lib, "MPIX_Query_cuda_support", None)
                if fn is None:
                    import mpi4py.MPI as m

                    fn = getattr(ctypes.CDLL(m.__file__), "MPIX_Query_cuda_support", None)
                _cuda_aware = bool(fn and fn())
            except OSError:
                _cuda_aware = False
    return _cuda_aware


class PinnedPool:
    """Page-locked host memory for staging device arrays, kept by size for reuse: a copy between the
    GPU and pinned memory runs at full bus speed, where pageable memory goes through the driver's
    bounce buffer, and allocating pinned memory is slow (so it is never done per message).
    `allocated` and `reused` count what `take` did."""

    def __init__(self):
        self.free = {}
        self.allocated = self.reused = 0

    def take(self, nbytes: int):
        """A uint8 host array of nbytes in pinned memory."""
        free = self.free.get(nbytes)
        if free:
            self.reused += 1
            return free.pop()
        import cupy

        self.allocated += 1
        return numpy.frombuffer(cupy.cuda.alloc_pinned_memory(max(1, nbytes)), numpy.uint8, nbytes)

    def give(self, raw):
        self.free.setdefault(raw.size, []).append(raw)


pinned = PinnedPool()


class _Staged:
    """A buffer as MPI sees it: the array itself, or for a device array without CUDA-aware MPI a
    pinned host copy. `back()` copies a staged buffer MPI wrote into to the device array (writes=True)
    and returns the pinned memory to the pool; call it once the operation has completed."""

    def __init__(self, a, *, reads=True, writes=False, host=False):
        """reads: MPI reads the contents (a send); writes: MPI writes them (a receive). host=True:
        stage even with CUDA-aware MPI (our Python reduction ops read host memory)."""
        self.array, self.writes, self.raw = a, writes, None
        self.buf = a
        if is_device_array(a):
            import cupy

            cupy.cuda.get_current_stream().synchronize()
            if not cuda_aware() or host:
                self.raw = pinned.take(a.nbytes)
                self.buf = self.raw.view(a.dtype).reshape(a.shape)
                if reads:
                    a.get(out=self.buf)

    def back(self):
        if self.raw is not None:
            if self.writes:
                import cupy

                self.array.set(self.buf)
                # a copy from pinned memory may run after set() returns: let it finish before the
                # buffer can be handed to the next operation
                cupy.cuda.get_current_stream().synchronize()
            pinned.give(self.raw)
            self.raw = None


class MPIGroup(Group):
    """A group over an MPI communicator."""

    def __init__(self, comm, name: str, ranks=None):
        self.comm = comm
        self.name = name
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.ranks = tuple(ranks) if ranks is not None else tuple(range(self.size))
        self._in_place = MPI().IN_PLACE

    # Each operation has a path for host (NumPy) arrays, which MPI reads and writes as they are, kept
    # short because it runs once per message: tensor parallelism issues thousands of small ones.
    def _all_reduce(self, buf, op):
        if not buf.flags.c_contiguous:
            raise ValueError("all_reduce works in place and needs a contiguous array")
        if type(buf) is numpy.ndarray:
            self.comm.Allreduce(self._in_place, buf, op=_ops.get(op) or _op(op))
            return
        s = _Staged(buf, writes=True, host=":" in op)
        self.comm.Allreduce(self._in_place, s.buf, op=_op(op))
        s.back()

    def _iall_reduce(self, buf, op):
        if not buf.flags.c_contiguous:
            raise ValueError("iall_reduce works in place and needs a contiguous array")
        s = _Staged(buf, writes=True, host=":" in op)
        return [(self.comm.Iallreduce(self._in_place, s.buf, op=_op(op)), s)]

    def _all_gather(self, send, recv, counts):
        host = type(send) is numpy.ndarray and type(recv) is numpy.ndarray
        if host and counts.count(counts[0]) == len(counts):
            self.comm.Allgather(send, recv)
            return
        s, r = (send, recv) if host else (_Staged(send), _Staged(recv, reads=False, writes=True))
        sbuf, rbuf = (send, recv) if host else (s.buf, r.buf)
        if counts.count(counts[0]) == len(counts):
            self.comm.Allgather(sbuf, rbuf)
        else:
            row = math.prod(send.shape[1:])
            sizes = [c * row for c in counts]
            displs = numpy.concatenate([[0], numpy.cumsum(sizes)[:-1]]).tolist()
            self.comm.Allgatherv(sbuf, [rbuf, sizes, displs, MPI()._typedict[send.dtype.char]])
        if not host:
            s.back()
            r.back()

    def _reduce_scatter(self, send, recv, counts, op):
        host = type(send) is numpy.ndarray and type(recv) is numpy.ndarray
        if host and counts.count(counts[0]) == len(counts):
            self.comm.Reduce_scatter_block(send, recv, op=_ops.get(op) or _op(op))
            return
        if host:
            s = r = None
            sbuf, rbuf = send, recv
        else:
            s, r = _Staged(send, host=":" in op), _Staged(recv, reads=False, writes=True, host=":" in op)
            sbuf, rbuf = s.buf, r.buf
        if counts.count(counts[0]) == len(counts):
            self.comm.Reduce_scatter_block(sbuf, rbuf, op=_op(op))
        else:
            row = math.prod(send.shape[1:])
            self.comm.Reduce_scatter(sbuf, rbuf, [c * row for c in counts], op=_op(op))
        if not host:
            s.back()
            r.back()

    def _broadcast(self, buf, root):
        if type(buf) is numpy.ndarray:
            self.comm.Bcast(buf, root=root)
            return
        s = _Staged(buf, writes=True)
        self.comm.Bcast(s.buf, root=root)
        s.back()

    def _isend(self, buf, peer, tag):
        s = None if type(buf) is numpy.ndarray else _Staged(buf)  # a pinned copy must outlive the send
        return [(self.comm.Isend(buf if s is None else s.buf, dest=peer, tag=tag), s)]

    def _irecv(self, buf, peer, tag):
        r = None if type(buf) is numpy.ndarray else _Staged(buf, reads=False, writes=True)
        return [(self.comm.Irecv(buf if r is None else r.buf, source=peer, tag=tag), r)]

    def _send_blocking(self, buf, peer, tag):
        if type(buf) is numpy.ndarray:
            self.comm.Send(buf, dest=peer, tag=tag)
        else:
            super()._send_blocking(buf, peer, tag)

    def _recv_blocking(self, buf, peer, tag):
        if type(buf) is numpy.ndarray:
            self.comm.Recv(buf, source=peer, tag=tag)
        else:
            super()._recv_blocking(buf, peer, tag)

    def _wait_all(self, requests):
        if len(requests) == 1:
            request, staged = requests[0]
            request.Wait()
            if staged is not None:
                staged.back()
            return
        MPI().Request.Waitall([req for req, _ in requests])
        for _, staged in requests:
            if staged is not None:
                staged.back()

    def _barrier(self):
        self.comm.Barrier()


def wait_sleeping(request, poll: float):
    """Wait for an MPI request, sleeping `poll` seconds between tests: MPICH's own waits spin, which
    on an oversubscribed node takes the cores from the ranks that work (the benchmarks' barriers)."""
    while not request.Test():
        time.sleep(poll)


def world_group() -> MPIGroup:
    return MPIGroup(MPI().COMM_WORLD, "world")


def abort_world(code: int, comm=None):
    """End the whole job with exit code `code`, after this rank has printed its line(s): flush, give
    the launcher a moment to forward the output (it may drop what comes last), then MPI_Abort. The
    peers may be waiting in a collective; without the abort they would wait forever."""
    sys.stderr.flush()
    sys.stdout.flush()
    comm = comm if comm is not None else (MPI().COMM_WORLD if _MPI is not None else None)
    if comm is not None and comm.Get_size() > 1:
        time.sleep(0.5)
        comm.Abort(code)
    os._exit(code)


def abort_on_exception():
    """Make an uncaught exception on any rank abort the whole job with that rank's message.

    Without this, the failing rank exits while its peers wait forever in their next collective.
    MpmpError (bad input) prints one line; anything else prints its traceback after it, in the same
    write (the rank's line first: when the job is aborted, the launcher may drop what comes last).
    """
    from mpmp.errors import MpmpError

    def hook(exc_type, exc, tb):
        rank = MPI().COMM_WORLD.Get_rank() if _MPI is not None else 0
        text = f"rank {rank}: {exc_type.__name__}: {exc}\n"
        if issubclass(exc_type, MpmpError):
            code = exc.exit_code
        else:
            text += "".join(traceback.format_exception(exc_type, exc, tb))
            code = 1
        sys.stderr.write(text)
        abort_world(code)

    sys.excepthook = hook


EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a process ended by Ctrl-C


def interrupted_line(rank: int) -> str:
    return f"rank {rank}: interrupted by SIGINT; stopped without saving a checkpoint (exit code {EXIT_INTERRUPTED})"


def report_interrupts(rank: int):
    """On SIGINT, this rank prints one line (no KeyboardInterrupt traceback) and the job ends with
    EXIT_INTERRUPTED. Call from the main thread.

    Python runs signal handlers in the main thread only, between bytecodes: never while it is blocked
    inside an MPI call, so a rank waiting in a collective for a peer would say nothing until an abort
    killed it. But the C-level handler, whichever thread the signal reaches (BLAS's threads too),
    writes the signal's number to the wakeup fd: a thread reading that fd reports and aborts. The
    Python-level handler itself does nothing."""
    import socket

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def wait():
        while reader.recv(1) != bytes([signal.SIGINT]):
            pass  # another signal with a Python handler (the preemption signal): the main thread's
        sys.stderr.write(interrupted_line(rank) + "\n")
        abort_world(EXIT_INTERRUPTED)

    threading.Thread(target=wait, name="mpmp-sigint", daemon=True).start()
    return reader, writer  # keep both ends open for the life of the process
