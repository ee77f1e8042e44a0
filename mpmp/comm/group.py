"""A communication group: the one interface the rest of mpmp talks to.

Subclasses (MPI in mpi.py, NCCL in nccl.py) implement a handful of raw operations on contiguous
buffers split along axis 0; this base class adds what is common: the axis handling, uneven block
sizes, the average op, the ledger record, and a size-1 fast path that moves nothing and records
nothing. Peers are group ranks. Collectives on arrays are in place where the name says so.

16-bit arrays are already in their wire format: on GPUs, bf16 activations are held as uint16 bit
patterns and fp16 ones as float16. They travel as they are, and reductions of them combine values,
not patterns (the op carries the format: "sum:bf16", "sum:fp16").
"""

import functools
from time import perf_counter as _perf_counter

import numpy

from mpmp.backend import array_module, from_wire, to_wire
from mpmp.comm import ledger as _ledger

OPS = ("sum", "avg", "max", "min")


def block_sizes(n: int, parts: int) -> list[int]:
    """numpy.array_split's sizes: the first n % parts blocks get one extra row."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@functools.lru_cache(maxsize=256)
def _blocks(n: int, parts: int) -> tuple[int, ...]:
    """block_sizes as a tuple, kept: reduce_scatter asks once per message."""
    return tuple(block_sizes(n, parts))


class Handle:
    """A non-blocking operation in flight; wait() completes it and returns its result."""

    def __init__(self, group, token, requests, finish, *, nbytes, dtype, peer=-1):
        self._group, self._token, self._requests, self._finish = group, token, requests, finish
        self._nbytes, self._dtype, self._peer = nbytes, _dtype_name(dtype), peer
        self._done, self._result = False, None

    def wait(self):
        if not self._done:
            led = _ledger.get()
            led.wait_start(self._token)
            t0 = _perf_counter()
            self._group._wait_all(self._requests)
            self._result = self._finish() if self._finish else None
            # the ledger's seconds: the time this rank was blocked here, not the time in flight
            led.end(self._token, self._group.size, self._peer, self._nbytes, self._dtype, _perf_counter() - t0)
            self._done = True
        return self._result


class _Done(Handle):
    def __init__(self, result=None):
        self._done, self._result = True, result


class Group:
    """Base class. Attributes: name, size, rank (in the group), ranks (world ranks of the members)."""

    name: str
    size: int
    rank: int
    ranks: tuple
    # "bf16" or "fp16": float32 arrays in this group's collectives and transfers travel as those 16-bit
    # patterns (mixed precision); a call with exact=True (the loss, fp32 gradients) keeps fp32.
    wire = None
    # NCCL: a send or receive outside batch_isend_irecv holds the stream until the peer matches it, so
    # the pipeline must issue its transfers in batches (pipeline/batching.py).
    batched_p2p = False

    def _format(self, x, exact):
        return self.wire if self.wire and not exact and x.dtype == numpy.float32 else None

    # ---- raw operations: contiguous arrays, axis 0; implemented by the transports -------------
    def _all_reduce(self, buf, op):
        raise NotImplementedError

    def _all_gather(self, send, recv, counts):
        raise NotImplementedError

    def _reduce_scatter(self, send, recv, counts, op):
        raise NotImplementedError

    def _broadcast(self, buf, root):
        raise NotImplementedError

    def _isend(self, buf, peer, tag):
        raise NotImplementedError

    def _irecv(self, buf, peer, tag):
        raise NotImplementedError

    def _iall_reduce(self, buf, op):
        raise NotImplementedError

    def _send_blocking(self, buf, peer, tag):
        """A send that returns when buf may be reused (transports may do it in one call)."""
        self._wait_all(self._isend(buf, peer, tag))

    def _recv_blocking(self, buf, peer, tag):
        self._wait_all(self._irecv(buf, peer, tag))

    def _wait_all(self, requests):
        raise NotImplementedError

    def _barrier(self):
        raise NotImplementedError

    def _group_start(self):
        """Batched point-to-point: NCCL fuses what is issued between start and end."""

    def _group_end(self):
        pass

    # ---- collectives ------------------------------------------------------------------------
    def all_reduce(self, x, op="sum", exact=False):
        """In place over the group; returns x. op: sum, avg, max, min."""
        if op not in OPS:
            _check_op(op)
        if self.size == 1:
            return x
        led = _ledger.get()
        led.enter("all_reduce", self.name)
        base = "sum" if op == "avg" else op
        native = _native16(x, op)
        if native:
            payload, fmt = native
            self._all_reduce(payload, f"{base}:{fmt}")
        elif fmt := self._format(x, exact):
            payload = to_wire(x, fmt)
            self._all_reduce(payload, f"{base}:{fmt}")
            from_wire(payload, fmt, out=x)
        else:
            payload = x
            self._all_reduce(x, base)
        if op == "avg":
            x /= self.size
        led.leave(self.size, -1, payload.nbytes, fmt or _dtype_name(payload.dtype))
        return x

    def iall_reduce(self, x, op="sum") -> Handle:
        """Non-blocking all_reduce in place; wait() returns x."""
        _check_op(op)
        if self.size == 1:
            return _Done(x)
        token = _ledger.get().begin("iall_reduce", self.name, False)
        requests = self._iall_reduce(x, "sum" if op == "avg" else op)

        def finish():
            if op == "avg":
                array_module(x).divide(x, self.size, out=x)
            return x

        return Handle(self, token, requests, finish, nbytes=x.nbytes, dtype=x.dtype)

    def all_gather(self, x, axis=0, sizes=None, exact=False, out=None):
        """Concatenate every member's x along axis. sizes: each member's extent along axis when
        they differ (defaults to equal extents). out: a buffer to reuse (axis 0, fp32 wire only)."""
        if self.size == 1:
            return x
        moved = axis % x.ndim  # 0: the blocks are along the first axis already
        front = _to_front(x, axis)
        counts = list(sizes) if sizes is not None else [front.shape[0]] * self.size
        fmt = self._format(x, exact)
        if fmt:
            front = to_wire(front, fmt)
        if out is None or fmt or moved:
            out = array_module(x).empty((sum(counts),) + front.shape[1:], dtype=front.dtype)
        led = _ledger.get()
        led.enter("all_gather", self.name)
        self._all_gather(front, out, counts)
        led.leave(self.size, -1, out.nbytes, fmt or _dtype_name(x.dtype))
        if fmt:
            out = from_wire(out, fmt)
        return _from_front(out, axis) if moved else out

    def reduce_scatter(self, x, axis=0, op="sum", exact=False, out=None):
        """Reduce x over the group and return this rank's block along axis (numpy.array_split's
        blocks when the extent does not divide). out: a buffer to reuse (axis 0, fp32 wire only)."""
        if op not in OPS:
            _check_op(op)
        if self.size == 1:
            return x
        moved = axis % x.ndim
        front = _to_front(x, axis)
        counts = _blocks(front.shape[0], self.size)
        base = "sum" if op == "avg" else op
        native = _native16(front, op)
        if native:  # the 16-bit storage itself goes out and comes back
            front, fmt = native
            base, out = f"{base}:{fmt}", None if out is None else out.view(numpy.uint16)
        elif fmt := self._format(x, exact):
            front, base = to_wire(front, fmt), f"{base}:{fmt}"
        if out is None or (fmt and not native) or moved:
            out = array_module(x).empty((counts[self.rank],) + front.shape[1:], dtype=front.dtype)
        led = _ledger.get()
        led.enter("reduce_scatter", self.name)
        self._reduce_scatter(front, out, counts, base)
        led.leave(self.size, -1, front.nbytes, fmt or _dtype_name(x.dtype))
        if native:
            out = out.view(x.dtype)
        elif fmt:
            out = from_wire(out, fmt)
        if op == "avg":
            out /= self.size
        return _from_front(out, axis) if moved else out

    def all_gather_json(self, obj) -> list:
        """Every member's JSON-serialisable obj, in group order: its bytes travel in uint8 buffers
        (two all-gathers: the lengths, then the bytes), never pickled."""
        import json

        if self.size == 1:
            return [obj]
        payload = numpy.frombuffer(json.dumps(obj).encode(), dtype=numpy.uint8)
        sizes = self.all_gather(numpy.array([payload.size], dtype=numpy.int64)).tolist()
        gathered = self.all_gather(payload, sizes=sizes)
        out, offset = [], 0
        for n in sizes:
            out.append(json.loads(bytes(gathered[offset : offset + n])))
            offset += n
        return out

    def broadcast(self, x, root=0):
        """In place from group rank root; returns x."""
        if self.size == 1:
            return x
        led = _ledger.get()
        led.enter("broadcast", self.name)
        self._broadcast(x, root)
        led.leave(self.size, -1, x.nbytes, _dtype_name(x.dtype))
        return x

    def barrier(self):
        if self.size > 1:
            led = _ledger.get()
            led.enter("barrier", self.name)
            self._barrier()
            led.leave(self.size, -1, 0, "")

    # ---- point to point ------------------------------------------------------------------------
    def _send_payload(self, x):
        """(what goes on the wire for x, its 16-bit format or None)."""
        fmt = self._format(x, False)
        return (to_wire(x, fmt) if fmt else x), fmt

    def _recv_buffer(self, out):
        """(the buffer a message for out arrives in, its 16-bit format or None)."""
        fmt = self._format(out, False)
        return (array_module(out).empty(out.shape, dtype=numpy.uint16) if fmt else out), fmt

    def isend(self, x, peer, tag=0) -> Handle:
        payload, fmt = self._send_payload(x)  # the handle keeps the payload alive until wait()
        token = _ledger.get().begin("send", self.name, False)
        requests = self._isend(payload, peer, tag)
        handle = Handle(self, token, requests, None, nbytes=payload.nbytes, dtype=fmt or x.dtype, peer=peer)
        handle.payload = payload
        return handle

    def irecv(self, out, peer, tag=0) -> Handle:
        """Receive into the preallocated out; wait() returns it."""
        buf, fmt = self._recv_buffer(out)
        finish = (lambda: from_wire(buf, fmt, out=out)) if fmt else (lambda: out)
        token = _ledger.get().begin("recv", self.name, False)
        requests = self._irecv(buf, peer, tag)
        return Handle(self, token, requests, finish, nbytes=buf.nbytes, dtype=fmt or out.dtype, peer=peer)

    def send(self, x, peer, tag=0):
        payload, fmt = self._send_payload(x)
        led = _ledger.get()
        led.enter("send", self.name)
        self._send_blocking(payload, peer, tag)
        led.leave(self.size, peer, payload.nbytes, fmt or _dtype_name(x.dtype))

    def recv(self, out, peer, tag=0):
        """Receive into the preallocated out; returns it."""
        buf, fmt = self._recv_buffer(out)
        led = _ledger.get()
        led.enter("recv", self.name)
        self._recv_blocking(buf, peer, tag)
        if fmt:
            from_wire(buf, fmt, out=out)
        led.leave(self.size, peer, buf.nbytes, fmt or _dtype_name(out.dtype))
        return out

    def batch_isend_irecv(self, ops) -> list[Handle]:
        """ops: [("send", array, peer, tag) | ("recv", out, peer, tag)] issued together."""
        self._group_start()
        try:
            handles = [
                self.isend(a, peer, tag) if kind == "send" else self.irecv(a, peer, tag) for kind, a, peer, tag in ops
            ]
        finally:
            self._group_end()
        return handles

    def __repr__(self):
        return f"{type(self).__name__}({self.name}, rank {self.rank}/{self.size}, world ranks {list(self.ranks)})"


class SelfGroup(Group):
    """A group of one process: every collective is the identity; nothing is recorded."""

    def __init__(self, name="self", world_rank=0):
        self.name, self.size, self.rank, self.ranks = name, 1, 0, (world_rank,)

    def _barrier(self):
        pass


_dtype_names = {}


def _dtype_name(dtype) -> str:
    """str(dtype), cached: NumPy 2 builds it in Python, which costs microseconds per operation."""
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = str(dtype)
    return name


def _check_op(op):
    if op not in OPS:
        raise ValueError(f"reduction op must be one of {OPS}, not {op!r}")


_HELD16 = {"H": "bf16", "e": "fp16"}  # dtype chars of the 16-bit formats: uint16 holds bf16 patterns


def _native16(x, op):
    """(uint16 view, "bf16" or "fp16") for an array held in a 16-bit format (uint16 = bf16 patterns,
    float16 = fp16), else None. The average is refused there: it would divide in place in the
    storage type."""
    try:
        fmt = _HELD16.get(x.dtype.char)
    except AttributeError:  # not an array: the transport says what it takes
        return None
    if fmt is None:
        return None
    if op == "avg":
        raise ValueError(f"avg of an array held in {fmt}: reduce with sum and scale in fp32")
    return x.view(numpy.uint16), fmt


def _to_front(x, axis):
    if axis % x.ndim == 0 and x.flags.c_contiguous:
        return x
    xp = array_module(x)
    if axis % x.ndim == 0:
        return xp.ascontiguousarray(x)
    return xp.ascontiguousarray(xp.moveaxis(x, axis, 0))


def _from_front(x, axis):
    if axis % x.ndim == 0:
        return x
    xp = array_module(x)
    return xp.ascontiguousarray(xp.moveaxis(x, 0, axis))
