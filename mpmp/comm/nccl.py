"""The Group interface over NCCL (cupy.cuda.nccl), for CuPy arrays on GPUs.

One process per GPU: bind the device first (mpmp.backend.use("cupy", local_rank)); NCCL refuses two
ranks of one communicator on the same device. Group rank 0 makes the NCCL unique id and the others get
its 128 bytes by an MPI broadcast of a plain buffer (no pickle).

Semantics are NCCL's (and PyTorch's ProcessGroupNCCL's):
- Blocking operations and point-to-point transfers are enqueued on CuPy's current stream (the compute
  stream) and return at once; later work on that stream runs after them. So the ledger's times are
  enqueue times unless the caller synchronises.
- A non-blocking all-reduce (iall_reduce: the data-parallel gradient buckets) runs on the group's own
  communication stream, so it overlaps the backward work that follows on the compute stream. An event
  recorded on the compute stream orders it after the kernels that produced the bucket; wait() makes
  the compute stream wait for the event recorded after it (the device waits, not the host). A later
  blocking operation of the group first makes the compute stream wait for the last one, so the
  group's operations keep their issue order on every rank.
- A batch's requests share one CUDA event recorded after groupEnd (NCCL launches nothing before it).
- NCCL has no tags: sends and receives between two ranks match in the order they are issued, and a
  send holds its stream until the peer receives. Exchanges in a ring must go through
  batch_isend_irecv (one NCCL group call), never an isend/irecv pair issued one by one.
- NCCL needs equal counts: uneven all_gather/reduce_scatter blocks are padded to the largest block in
  scratch buffers and sliced back (one extra device copy each way, only when the blocks differ). The
  scratch buffers go back to CuPy's memory pool, which is stream-ordered, so dropping them before the
  kernel has run is safe.

CuPy is imported on first use only: this module imports on machines without it.
"""

import numpy

from mpmp.comm.group import Group
from mpmp.errors import ConfigError

MISSING = "NCCL needs CuPy with NCCL (pip install 'mpmp[gpu]')"
_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
# keyed by dtype.char: dtype.name costs microseconds per call on NumPy 2
_DTYPES = {
    numpy.dtype(t).char: (t, f"NCCL_{t.upper()}") for t in ("float16", "float32", "float64", "int32", "int64", "uint8")
}
_UINT16 = numpy.dtype(numpy.uint16).char
_OPS = {"sum": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN"}
# Group.wire sends float32 as 16-bit patterns in uint16 arrays and asks for ops like "sum:bf16".
_WIRE = {"bf16": ("NCCL_BFLOAT16", 9), "fp16": ("NCCL_FLOAT16", 6)}  # (name, value in nccl.h)


def _import():
    """(cupy, cupy.cuda.nccl), or ConfigError with the install hint."""
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as exc:
        raise ConfigError(f"{MISSING}: {exc}") from None
    if not getattr(nccl, "available", True):  # CuPy built or installed without libnccl
        raise ConfigError(f"{MISSING}: this CuPy has no NCCL")
    return cupy, nccl


def nccl_available() -> bool:
    """Whether CuPy with NCCL imports and a CUDA device is visible."""
    try:
        cupy, _ = _import()
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ConfigError, or CUDA's own errors when there is no driver
        return False


def _id_bytes(raw) -> numpy.ndarray:
    """get_unique_id()'s id as 128 uint8: bytes in CuPy >= 14, a tuple of C chars before."""
    if isinstance(raw, (bytes, bytearray)):
        return numpy.frombuffer(bytes(raw), numpy.uint8)
    return (numpy.asarray(raw, dtype=numpy.int64) % 256).astype(numpy.uint8)


def _communicator(lib, size: int, uid: bytes, rank: int):
    """NcclCommunicator(size, id, rank) with the id in the form this CuPy takes: bytes (>= 14), else
    a tuple of chars, signed on x86 and unsigned on ARM. A wrong form fails before NCCL is called."""
    forms = (uid, tuple(numpy.frombuffer(uid, numpy.int8).tolist()), tuple(uid))
    for form in forms[:-1]:
        try:
            return lib.NcclCommunicator(size, form, rank)
        except (TypeError, OverflowError):
            continue
    return lib.NcclCommunicator(size, forms[-1], rank)


class _Request:
    """What wait() waits for: the CUDA event after the operation (set at groupEnd when batched)."""

    __slots__ = ("event",)

    def __init__(self, event=None):
        self.event = event


class NCCLGroup(Group):
    """A group over an NCCL communicator; comm is the mpi4py communicator of the same members, in the
    same order, and carries the unique id."""

    batched_p2p = True

    def __init__(self, comm, name: str, ranks=None):
        self._cupy, self._lib = _import()  # before any collective: every rank fails alike
        self.comm = comm
        self.name = name
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.ranks = tuple(ranks) if ranks is not None else tuple(range(self.size))
        self._pending = None  # requests issued inside a group call, evented at groupEnd
        self._side = None  # the communication stream, made on first use
        self._side_done = None  # the event after the last operation on it
        self.nccl = _communicator(self._lib, self.size, self._unique_id(), self.rank)

    def _unique_id(self) -> bytes:
        # Byte 0 says whether rank 0 got an id: a failure there reaches every rank through the same
        # broadcast instead of leaving them waiting in ncclCommInitRank.
        buf = numpy.zeros(1 + _ID_BYTES, numpy.uint8)
        error = None
        if self.rank == 0:
            try:
                buf[1:] = _id_bytes(self._lib.get_unique_id())
                buf[0] = 1
            except Exception as exc:  # re-raised below, after the others have been told
                error = exc
        self.comm.Bcast(buf, root=0)
        if error is not None:
            raise error
        if not buf[0]:
            raise RuntimeError(f"group {self.name}: rank 0 could not create an NCCL unique id")
        return buf[1:].tobytes()

    def close(self):
        """Free the NCCL communicator (all members, after their last operation)."""
        self.nccl.destroy()

    # ---- helpers ----------------------------------------------------------------------------
    def _stream(self) -> int:
        """The compute stream, after this group's work on its communication stream: one order of
        operations per communicator."""
        stream = self._cupy.cuda.get_current_stream()
        if self._side_done is not None:
            stream.wait_event(self._side_done)
            self._side_done = None
        return stream.ptr

    def _args(self, a, op=None):
        """(device pointer, element count, NCCL datatype, NCCL op) of a contiguous CuPy array; op None
        for data movement, else "sum", "max", "min" or "sum:bf16" (uint16 patterns reduced as bf16)."""
        if not isinstance(a, self._cupy.ndarray):
            raise TypeError(f"group {self.name} is NCCL and takes CuPy arrays, not {type(a).__name__}")
        if not a.flags.c_contiguous:
            raise ValueError(f"group {self.name}: NCCL needs a contiguous array")
        base, _, fmt = (op or "").partition(":")
        char = a.dtype.char
        if fmt and char == _UINT16:
            dtype = getattr(self._lib, _WIRE[fmt][0], _WIRE[fmt][1])  # older CuPy lacks NCCL_BFLOAT16
        elif op is None and char == _UINT16:
            dtype = self._lib.NCCL_FLOAT16  # 16-bit patterns moved as they are, never added
        elif char in _DTYPES:
            dtype = getattr(self._lib, _DTYPES[char][1])
        else:
            names = ", ".join(name for name, _ in _DTYPES.values())
            raise TypeError(f"NCCL cannot {'reduce' if op else 'move'} {a.dtype}; it takes {names}")
        return a.data.ptr, a.size, dtype, getattr(self._lib, _OPS[base]) if op else None

    def _request(self):
        req = _Request()
        if self._pending is not None:
            self._pending.append(req)
        else:
            req.event = self._record()
        return [req]

    def _record(self):
        event = self._cupy.cuda.Event(disable_timing=True)
        event.record(self._cupy.cuda.get_current_stream())
        return event

    # ---- raw operations (counts of 0 are the same on every member, so all skip together) ------
    def _all_reduce(self, buf, op):
        ptr, n, dtype, nccl_op = self._args(buf, op)
        if n:
            self.nccl.allReduce(ptr, ptr, n, dtype, nccl_op, self._stream())

    def _iall_reduce(self, buf, op):
        """On the communication stream, after what the compute stream has issued so far."""
        cuda = self._cupy.cuda
        if self._side is None:
            self._side = cuda.Stream(non_blocking=True)
        self._side.wait_event(self._record())
        ptr, n, dtype, nccl_op = self._args(buf, op)
        if n:
            self.nccl.allReduce(ptr, ptr, n, dtype, nccl_op, self._side.ptr)
        done = cuda.Event(disable_timing=True)
        done.record(self._side)
        self._side_done = done
        return [_Request(done)]

    def _all_gather(self, send, recv, counts):
        if send.shape[0] != counts[self.rank]:
            raise ValueError(f"all_gather: this rank has {send.shape[0]} rows, sizes says {counts[self.rank]}")
        _, _, dtype, _ = self._args(send)
        top, row = max(counts), _row(send)
        if top * row == 0:
            return
        even = all(c == top for c in counts)
        src = send if even else self._pad(send, [send.shape[0]], top)
        dst = recv if even else self._cupy.empty((self.size * top,) + send.shape[1:], dtype=send.dtype)
        self.nccl.allGather(src.data.ptr, self._args(dst)[0], top * row, dtype, self._stream())
        if not even:
            _unpad(dst, recv, counts, top)

    def _reduce_scatter(self, send, recv, counts, op):
        _, _, dtype, nccl_op = self._args(send, op)
        top, row = max(counts), _row(send)
        if top * row == 0:
            return
        even = all(c == top for c in counts)
        src = send if even else self._pad(send, counts, top)
        dst = recv if even else self._cupy.empty((top,) + send.shape[1:], dtype=send.dtype)
        self.nccl.reduceScatter(src.data.ptr, self._args(dst)[0], top * row, dtype, nccl_op, self._stream())
        if not even:
            _unpad(dst, recv, [counts[self.rank]], top)

    def _pad(self, a, counts, top):
        """a's blocks of counts[i] rows, each padded with zeros to top rows, end to end."""
        out = self._cupy.zeros((len(counts) * top,) + a.shape[1:], dtype=a.dtype)
        _unpad(out, a, counts, top, to_padded=True)
        return out

    def _broadcast(self, buf, root):
        ptr, n, dtype, _ = self._args(buf)
        if n:
            self.nccl.broadcast(ptr, ptr, n, dtype, root, self._stream())

    def _isend(self, buf, peer, tag):
        ptr, n, dtype, _ = self._args(buf)  # tag: unused, NCCL matches in issue order
        if n:
            self.nccl.send(ptr, n, dtype, peer, self._stream())
        return self._request()

    def _irecv(self, buf, peer, tag):
        ptr, n, dtype, _ = self._args(buf)
        if n:
            self.nccl.recv(ptr, n, dtype, peer, self._stream())
        return self._request()

    def _wait_all(self, requests):
        """The compute stream waits for each request's event; the host goes on (no synchronisation)."""
        stream = self._cupy.cuda.get_current_stream()
        for req in requests:
            if req.event is None:
                raise RuntimeError("wait() on an operation of a batch that has not been issued yet")
            stream.wait_event(req.event)

    def _barrier(self):
        # NCCL has no barrier: a one-element all-reduce, then wait for the stream (and all before it).
        self._all_reduce(self._cupy.zeros(1, dtype=numpy.float32), "sum")
        self._cupy.cuda.get_current_stream().synchronize()

    def _group_start(self):
        self._pending = []
        self._lib.groupStart()

    def _group_end(self):
        pending, self._pending = self._pending, None
        self._lib.groupEnd()
        event = self._record()  # after groupEnd: NCCL launches the batch there
        for req in pending:
            req.event = event


def _row(a) -> int:
    """Elements per row (per index of axis 0)."""
    return int(numpy.prod(a.shape[1:], dtype=numpy.int64))


def _unpad(padded, out, counts, top, to_padded=False):
    """Copy block i (counts[i] rows) from rows i*top.. of padded into out, end to end (to_padded: the
    other way)."""
    start = 0
    for i, c in enumerate(counts):
        if to_padded:
            padded[i * top : i * top + c] = out[start : start + c]
        else:
            out[start : start + c] = padded[i * top : i * top + c]
        start += c
