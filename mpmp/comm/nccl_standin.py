"""A CPU stand-in for NCCLGroup: MPI moves NumPy arrays, and NCCL's rules are enforced, so code meant
for NCCL fails here, with a message, where it would hang on GPUs.

The model is one CUDA stream per rank, which is what NCCLGroup uses (CuPy's current stream):
- Operations complete in issue order. A send or receive outside batch_isend_irecv holds the stream
  until the peer posts the matching operation; so here it completes before the call returns, and one
  that is not matched within `timeout` seconds raises NCCLRuleError (two ranks that both send first
  would hang on NCCL). Non-blocking collectives complete at once for the same reason.
- Operations inside one group call (batch_isend_irecv) complete together, at its end.
- No tags: sends and receives between two ranks match in the order they are issued (one MPI tag,
  and MPI's non-overtaking rule).
- Every rank issues the same collectives in the same order with the same sizes: before each
  collective (every `check_every`-th; a running fingerprint covers the ones between) the ranks
  exchange what they are about to do, and a difference, or a rank that does not arrive within
  `timeout`, raises NCCLRuleError naming the ranks.
- One device per rank: two members that claim the same device on one host are refused at start.
- The dtypes are NCCL's: uint16 (16-bit patterns) is moved, or reduced only as bf16/fp16.
"""

import socket
import time
import zlib

import numpy

from mpmp._setup import local_rank
from mpmp.comm.group import Group
from mpmp.comm.mpi import MPI, MPIGroup
from mpmp.errors import ConfigError

_P2P_TAG = 7  # the one tag of every point-to-point message: NCCL has none
_DESC_BYTES = 112
_REDUCIBLE = {numpy.dtype(t) for t in ("float16", "float32", "float64", "int32", "int64", "uint8")}
_POLL_S = 2e-4


class NCCLRuleError(RuntimeError):
    """Code that would hang, or be refused, on NCCL."""


class _Batched:
    """A request of an operation issued inside a group call: done when the group ends."""

    __slots__ = ("done",)

    def __init__(self):
        self.done = False


class NCCLStandIn(Group):
    """The Group interface over MPI with NCCL's rules. comm: the mpi4py communicator of the members;
    device: the device this rank claims (default: its local rank on the node)."""

    batched_p2p = True

    def __init__(self, comm, name: str, ranks=None, device=None, timeout=60.0, check_every=1):
        self.name, self.size, self.rank = name, comm.Get_size(), comm.Get_rank()
        self.ranks = tuple(ranks) if ranks is not None else tuple(range(self.size))
        self.timeout, self.check_every = float(timeout), int(check_every)
        self.comm, self._checks = comm.Dup(), comm.Dup()  # data, and the order checks
        self._mpi = MPIGroup(self.comm, name, self.ranks)
        self._pending = None  # (kind, buf, peer, request) issued inside a group call
        self._p2p_count = {}  # peer -> point-to-point operations issued towards it
        self._seq, self._fingerprint = 0, 0
        self.device = local_rank() if device is None else int(device)
        self._claim_device()

    def close(self):
        self.comm.Free()
        self._checks.Free()

    # ---- one device per rank ----------------------------------------------------------------------
    def _claim_device(self):
        mine = numpy.zeros(72, numpy.uint8)
        host = socket.gethostname().encode()[:64]
        mine[: len(host)] = numpy.frombuffer(host, numpy.uint8)
        mine[64:] = numpy.frombuffer(numpy.int64(self.device).tobytes(), numpy.uint8)
        every = numpy.empty((self.size, 72), numpy.uint8)
        self.comm.Allgather(mine, every)
        claims = {}
        for r, row in enumerate(every):
            claims.setdefault(row.tobytes(), []).append(r)
        for key, members in claims.items():
            if len(members) > 1:
                host = bytes(key[:64]).rstrip(b"\0").decode(errors="replace")
                dev = int(numpy.frombuffer(key[64:], numpy.int64)[0])
                raise ConfigError(
                    f"group {self.name}: ranks {members} all claim device {dev} on {host}: NCCL needs one "
                    "device per rank (use MPI for ranks that share a GPU)"
                )

    # ---- the order of collectives -------------------------------------------------------------------
    def _collective(self, desc: str):
        """Record the collective about to run and, every check_every-th one, compare with the others."""
        self._seq += 1
        self._fingerprint = zlib.crc32(desc.encode(), self._fingerprint)
        if self._seq % self.check_every == 0:
            self._compare(desc)

    def _compare(self, desc):
        mine = numpy.zeros(16 + _DESC_BYTES, numpy.uint8)
        mine[:16] = numpy.frombuffer(numpy.array([self._seq, self._fingerprint], numpy.int64).tobytes(), numpy.uint8)
        text = desc.encode()[:_DESC_BYTES]
        mine[16 : 16 + len(text)] = numpy.frombuffer(text, numpy.uint8)
        records = numpy.zeros((self.size, mine.size), numpy.uint8)
        records[self.rank] = mine
        tag = self._seq % 32000
        others = [r for r in range(self.size) if r != self.rank]
        sends = [self._checks.Isend(mine, dest=r, tag=tag) for r in others]
        recvs = [self._checks.Irecv(records[r], source=r, tag=tag) for r in others]
        missing = self._wait_for(recvs)
        if missing:
            for i in missing:
                recvs[i].Cancel()
            absent = [others[i] for i in missing]
            raise NCCLRuleError(
                f"group {self.name}: ranks {absent} did not reach collective #{self._seq} ({desc}) within "
                f"{self.timeout:g} s: on NCCL every rank must issue the same collectives in the same order "
                "(they may be in a different operation, or have issued fewer collectives)"
            )
        self._wait_for(sends)
        self._report_divergence(records)

    def _report_divergence(self, records):
        by_state = {}
        for r, row in enumerate(records):
            seq, fp = numpy.frombuffer(row[:16].tobytes(), numpy.int64)
            text = row[16:].tobytes().rstrip(b"\0").decode(errors="replace")
            by_state.setdefault((int(seq), int(fp)), (text, []))[1].append(r)
        if len(by_state) > 1:
            parts = "; ".join(f"ranks {members}: {text}" for text, members in by_state.values())
            raise NCCLRuleError(
                f"group {self.name}: collective #{self._seq} differs across ranks (NCCL needs every rank to "
                f"issue the same collectives, with the same sizes, in the same order): {parts}"
            )

    def _wait_for(self, requests) -> list[int]:
        """Wait up to timeout; the indices of the requests still incomplete (empty when all are done)."""
        deadline = time.monotonic() + self.timeout
        while not MPI().Request.Testall(requests):
            if time.monotonic() > deadline:
                return [i for i, req in enumerate(requests) if not req.Test()]
            time.sleep(_POLL_S)
        return []

    # ---- dtypes ------------------------------------------------------------------------------------
    def _check(self, a, op=None):
        if not isinstance(a, numpy.ndarray):
            raise TypeError(f"group {self.name} is a CPU stand-in for NCCL and takes NumPy arrays, not {type(a)}")
        if not a.flags.c_contiguous:
            raise ValueError(f"group {self.name}: NCCL needs a contiguous array")
        if op is not None and ":" not in op and a.dtype not in _REDUCIBLE:
            raise TypeError(f"NCCL cannot reduce {a.dtype} (16-bit patterns reduce only as bf16 or fp16)")

    # ---- collectives ------------------------------------------------------------------------------
    def _all_reduce(self, buf, op):
        self._check(buf, op)
        self._collective(f"all_reduce {op} {buf.dtype} x{buf.size}")
        self._mpi._all_reduce(buf, op)

    def _iall_reduce(self, buf, op):
        self._all_reduce(buf, op)  # stream order: done before anything issued after it
        return []

    def _all_gather(self, send, recv, counts):
        self._check(send)
        self._collective(f"all_gather {send.dtype} rows {list(counts)} x{send[:1].size}")
        self._mpi._all_gather(send, recv, counts)

    def _reduce_scatter(self, send, recv, counts, op):
        self._check(send, op)
        self._collective(f"reduce_scatter {op} {send.dtype} rows {list(counts)} x{send[:1].size}")
        self._mpi._reduce_scatter(send, recv, counts, op)

    def _broadcast(self, buf, root):
        self._check(buf)
        self._collective(f"broadcast root {root} {buf.dtype} x{buf.size}")
        self._mpi._broadcast(buf, root)

    def _barrier(self):
        self._collective("barrier (an all_reduce of one element on NCCL)")
        self.comm.Barrier()

    # ---- point to point ---------------------------------------------------------------------------
    def _isend(self, buf, peer, tag):
        return self._p2p("send", buf, peer)

    def _irecv(self, buf, peer, tag):
        return self._p2p("recv", buf, peer)

    def _p2p(self, kind, buf, peer):
        self._check(buf)
        if not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"group {self.name}: rank {self.rank} cannot {kind} with group rank {peer}")
        self._p2p_count[peer] = self._p2p_count.get(peer, 0) + 1
        if self._pending is not None:
            req = _Batched()
            self._pending.append((kind, buf, peer, req))
            return [req]
        # outside a group: the stream is held until the peer posts the matching operation
        req = self.comm.Issend(buf, dest=peer, tag=_P2P_TAG) if kind == "send" else self._recv(buf, peer)
        if self._wait_for([req]):
            self._unblock(kind, req, peer)
            raise NCCLRuleError(
                f"group {self.name}: rank {self.rank}'s {kind} {'to' if kind == 'send' else 'from'} group rank "
                f"{peer} (point-to-point operation #{self._p2p_count[peer]} between them) was not matched within "
                f"{self.timeout:g} s. On NCCL a send or receive outside batch_isend_irecv holds the stream until "
                "the peer posts the matching operation, and sends and receives match in issue order (no tags): "
                "this would hang. Issue the exchange in one batch_isend_irecv, or order it so one side sends first."
            )
        return []

    def _recv(self, buf, peer):
        return self.comm.Irecv(buf, source=peer, tag=_P2P_TAG)

    def _unblock(self, kind, req, peer):
        """Leave the communicator clean after a detected hang: cancel a receive; for a send, take in
        what the peer sent us meanwhile (two ranks that both sent first), so both sends complete."""
        if kind == "recv":
            req.Cancel()
            req.Wait()
            return
        # Drain only after a grace period: a peer whose own send is stuck the same way must reach its
        # deadline (and report) before our draining would complete its send and let it go on.
        grace = min(2.0, self.timeout)
        time.sleep(grace)
        deadline = time.monotonic() + grace
        status, drained = MPI().Status(), False
        # until our send is taken and the peer's stuck send (if any) drained: the peer may drain ours
        # first, and must still find its own taken
        while not (drained and req.Test()) and time.monotonic() < deadline:
            if not drained and self.comm.Iprobe(source=peer, tag=_P2P_TAG, status=status):
                self.comm.Recv(numpy.empty(status.Get_count(MPI().BYTE), numpy.uint8), source=peer, tag=_P2P_TAG)
                drained = True
            time.sleep(_POLL_S)

    def _group_start(self):
        if self._pending is not None:
            raise NCCLRuleError(f"group {self.name}: a group call inside a group call")
        self._pending = []

    def _group_end(self):
        pending, self._pending = self._pending, None
        requests = [
            self.comm.Isend(buf, dest=peer, tag=_P2P_TAG) if kind == "send" else self._recv(buf, peer)
            for kind, buf, peer, _ in pending
        ]
        missing = self._wait_for(requests)
        if missing:
            what = ", ".join(f"{pending[i][0]} with group rank {pending[i][2]}" for i in missing)
            raise NCCLRuleError(
                f"group {self.name}: a batch of point-to-point operations was not matched within "
                f"{self.timeout:g} s ({what}): every operation of a batch needs its peer's matching one"
            )
        for *_, req in pending:
            req.done = True

    def _wait_all(self, requests):
        for req in requests:
            if isinstance(req, _Batched) and not req.done:
                raise NCCLRuleError(f"group {self.name}: wait() on an operation of a batch that has not ended")
