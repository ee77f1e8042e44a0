"""The NCCL transport (mpmp/comm/nccl.py).

Three layers of checks:
- without CuPy: the module imports, nccl_available() says no, and building a group fails with the
  install hint before any MPI call;
- on CPUs, under MPI: NCCLGroup runs against a stand-in for cupy.cuda.nccl that performs each NCCL
  call with MPI on host memory (same signatures: pointers, counts, datatype and op numbers), so the
  id exchange, the padding of uneven blocks, the batching and the events run everywhere;
- on GPUs (skipped without CuPy and a device): the real NCCL, one rank per GPU, and CuPy arrays
  through MPIGroup (ranks may share a GPU there), against NumPy results.
"""

import ctypes
import os
import subprocess
import sys
import types

import numpy
import pytest

from mpmp.comm import nccl as nccl_mod
from mpmp.comm.nccl import NCCLGroup, nccl_available
from mpmp.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [0, 1, 7, 1000]
REDUCE_DTYPES = [numpy.float32, numpy.float64, numpy.int32, numpy.int64]
MOVE_DTYPES = REDUCE_DTYPES + [numpy.float16, numpy.uint8]


def data(world_rank, n, dtype, salt=0):
    """What world rank r contributes: reproducible anywhere (small values, exact in float16)."""
    rng = numpy.random.default_rng([world_rank, n, salt])
    if numpy.dtype(dtype).kind == "f":
        return (rng.integers(-64, 64, n) / 8).astype(dtype)
    return rng.integers(0 if dtype == numpy.uint8 else -100, 100, n).astype(dtype)


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == numpy.float32 else {"rtol": 1e-12, "atol": 1e-12}


def mpi_groups():
    """(comm, name, world ranks) for the world and for its two halves. Collective on COMM_WORLD."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    half = max(1, size // 2)
    sub = world.Split(rank // half, rank)
    first = (rank // half) * half
    return [(world, "world", tuple(range(size))), (sub, "half", tuple(range(first, first + sub.Get_size())))]


def check_collectives(groups, rank, to_device, to_host):
    """Every collective of every group against NumPy; arrays go in through to_device."""
    for g in groups:
        for dtype in REDUCE_DTYPES:
            for op in ("sum", "avg", "max", "min"):
                if op == "avg" and numpy.dtype(dtype).kind != "f":
                    continue
                for n in SIZES:
                    parts = [data(r, n, dtype) for r in g.ranks]
                    x = to_device(data(rank, n, dtype))
                    assert g.all_reduce(x, op) is x
                    if op in ("sum", "avg"):
                        expect = numpy.sum(parts, axis=0, dtype=dtype) / (g.size if op == "avg" else 1)
                    else:
                        expect = (numpy.max if op == "max" else numpy.min)(parts, axis=0)
                    numpy.testing.assert_allclose(to_host(x), expect.reshape(n), **tol(dtype))
            x = to_device(data(rank, 100, dtype))
            y = to_device(data(rank, 100, dtype))
            handle = g.iall_reduce(x)
            g.all_reduce(y)
            assert handle.wait() is x
            numpy.testing.assert_array_equal(to_host(x), to_host(y))
            for n in SIZES + [g.size * 5 + 3]:  # the last one has uneven blocks
                total = numpy.sum([data(r, n, dtype) for r in g.ranks], axis=0, dtype=dtype).reshape(n)
                got = g.reduce_scatter(to_device(data(rank, n, dtype)))
                numpy.testing.assert_allclose(to_host(got), numpy.array_split(total, g.size)[g.rank], **tol(dtype))
            x = data(rank, 2 * 4 * g.size * 3, dtype).reshape(2, 4 * g.size, 3)
            total = numpy.sum([data(r, x.size, dtype).reshape(x.shape) for r in g.ranks], axis=0, dtype=dtype)
            got = g.reduce_scatter(to_device(x), axis=1)
            numpy.testing.assert_allclose(to_host(got), numpy.split(total, g.size, axis=1)[g.rank], **tol(dtype))
        for dtype in MOVE_DTYPES:
            for n in SIZES:
                got = g.all_gather(to_device(data(rank, n, dtype).reshape(n, 1)))
                expect = numpy.concatenate([data(r, n, dtype).reshape(n, 1) for r in g.ranks])
                numpy.testing.assert_array_equal(to_host(got), expect)
            got = g.all_gather(to_device(data(rank, 24, dtype).reshape(2, 3, 4)), axis=1)
            expect = numpy.concatenate([data(r, 24, dtype).reshape(2, 3, 4) for r in g.ranks], axis=1)
            numpy.testing.assert_array_equal(to_host(got), expect)
            # uneven: member i contributes i + 1 rows (padded to the largest block on NCCL)
            got = g.all_gather(to_device(numpy.full((g.rank + 1, 2), rank, dtype)), sizes=range(1, g.size + 1))
            expect = numpy.concatenate([numpy.full((i + 1, 2), r, dtype) for i, r in enumerate(g.ranks)])
            numpy.testing.assert_array_equal(to_host(got), expect)
            for root in range(g.size):
                x = to_device(data(rank, 33, dtype))
                assert g.broadcast(x, root) is x
                numpy.testing.assert_array_equal(to_host(x), data(g.ranks[root], 33, dtype))
        g.barrier()


def check_point_to_point(groups, rank, to_device, to_host, empty):
    """Blocking pairs ordered by parity, then a batched ring in both directions. (An isend/irecv ring
    issued one by one would deadlock on NCCL, where a send holds its stream until it is received.)"""
    for g in groups:
        if g.size == 1:
            continue
        right, left = (g.rank + 1) % g.size, (g.rank - 1) % g.size
        for dtype in MOVE_DTYPES:
            for n in SIZES:
                out = empty(n, dtype)
                if g.rank % 2 == 0:
                    g.send(to_device(data(rank, n, dtype)), right)
                    g.recv(out, left)
                else:
                    g.recv(out, left)
                    g.send(to_device(data(rank, n, dtype)), right)
                numpy.testing.assert_array_equal(to_host(out), data(g.ranks[left], n, dtype))
                a, b = empty(n, dtype), empty(n, dtype)
                handles = g.batch_isend_irecv(
                    [
                        ("send", to_device(data(rank, n, dtype, 2)), right, 7),
                        ("send", to_device(data(rank, n, dtype, 3)), left, 8),
                        ("recv", a, left, 7),
                        ("recv", b, right, 8),
                    ]
                )
                for h in handles:
                    h.wait()
                numpy.testing.assert_array_equal(to_host(a), data(g.ranks[left], n, dtype, 2))
                numpy.testing.assert_array_equal(to_host(b), data(g.ranks[right], n, dtype, 3))


# ---- without CuPy ------------------------------------------------------------------------------


def test_module_imports_and_reports_unavailable_without_cupy():
    code = "import sys; sys.modules['cupy'] = None; import mpmp.comm.nccl as m; print(m.nccl_available())"
    env = {**os.environ, "PYTHONPATH": ROOT}
    for var in ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_PORT", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        env.pop(var, None)  # a plain child process, not an MPI rank
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_nccl_unavailable_here_when_cupy_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert nccl_available() is False


class _NoComm:
    def __getattr__(self, name):
        raise AssertionError(f"NCCLGroup called comm.{name} before checking for CuPy")


def test_group_without_cupy_raises_config_error_before_any_mpi_call(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ConfigError, match=r"NCCL needs CuPy with NCCL \(pip install 'mpmp\[gpu\]'\)"):
        NCCLGroup(_NoComm(), "tp")


def test_unique_id_bytes_survive_every_cupy_form():
    raw = bytes(range(256))[::2]  # 128 bytes, half of them >= 128
    assert nccl_mod._id_bytes(raw).tobytes() == raw
    signed = tuple(numpy.frombuffer(raw, numpy.int8).tolist())  # CuPy < 14 on x86
    assert nccl_mod._id_bytes(signed).tobytes() == raw
    assert nccl_mod._id_bytes(tuple(raw)).tobytes() == raw  # CuPy < 14 with unsigned chars (ARM)


@pytest.mark.parametrize("form", ["bytes", "signed", "unsigned"])
def test_communicator_is_built_with_the_id_form_this_cupy_takes(form):
    raw = bytes(range(256))[1::2]
    seen = []

    def communicator(size, comm_id, rank):
        # what Cython's argument conversion does for `bytes commId` / `tuple commId` of chars
        if (form == "bytes") != isinstance(comm_id, bytes):
            raise TypeError("Argument 'commId' has incorrect type")
        if form != "bytes" and any(not (-128 <= v < 128 if form == "signed" else 0 <= v < 256) for v in comm_id):
            raise OverflowError("value too large to convert to char")
        seen.append(comm_id)
        return "comm"

    lib = types.SimpleNamespace(NcclCommunicator=communicator)
    assert nccl_mod._communicator(lib, 2, raw, 1) == "comm"
    assert nccl_mod._id_bytes(seen[0]).tobytes() == raw


# ---- NCCLGroup on a stand-in for cupy.cuda.nccl (CPUs, MPI) ------------------------------------

_NP_DTYPES = {1: numpy.uint8, 2: numpy.int32, 4: numpy.int64, 6: numpy.float16, 7: numpy.float32, 8: numpy.float64}


class _HostArray(numpy.ndarray):
    """A NumPy array posing as a CuPy one: its module says cupy and .data.ptr is its address."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


_HostArray.__module__ = "cupy"


def _dev(a):
    return numpy.ascontiguousarray(a).view(_HostArray)


class _FakeNccl:
    """cupy.cuda.nccl's surface; every call runs at once with MPI on host memory. p2p calls inside
    groupStart/groupEnd start together at groupEnd, as NCCL launches a group there."""

    NCCL_SUM, NCCL_MAX, NCCL_MIN = 0, 2, 3
    NCCL_UINT8, NCCL_INT32, NCCL_INT64, NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 1, 2, 4, 6, 7, 8
    available = True

    def __init__(self):
        self.comm = None  # the MPI communicator the next NcclCommunicator stands for
        self.batch = None
        self.ids = 0
        self.log = []  # (what, stream ptr, ...) of collectives, event records, waits, synchronisations

    def get_unique_id(self):
        self.ids += 1
        return os.urandom(128)

    def groupStart(self):
        self.batch = []

    def groupEnd(self):
        from mpi4py import MPI

        batch, self.batch = self.batch, None
        MPI.Request.Waitall([start() for start in batch])

    def NcclCommunicator(self, size, comm_id, rank):
        return _FakeComm(self, size, comm_id, rank)


class _FakeComm:
    def __init__(self, lib, size, comm_id, rank):
        from mpi4py import MPI

        assert isinstance(comm_id, bytes) and len(comm_id) == 128
        self.lib, self.comm, self.MPI = lib, lib.comm.Dup(), MPI
        assert (self.comm.Get_size(), self.comm.Get_rank()) == (size, rank)
        assert len(set(self.comm.allgather(comm_id))) == 1, "members got different NCCL ids"

    def _view(self, ptr, count, dtype):
        dt = numpy.dtype(_NP_DTYPES[dtype])
        assert count > 0, "NCCL called with count 0"
        return numpy.frombuffer((ctypes.c_char * (count * dt.itemsize)).from_address(ptr), dtype=dt)

    def _op(self, op):
        return {0: self.MPI.SUM, 2: self.MPI.MAX, 3: self.MPI.MIN}[op]

    def allReduce(self, send, recv, count, dtype, op, stream):
        assert send == recv  # mpmp reduces in place
        self.lib.log.append(("allReduce", stream))
        self.comm.Allreduce(self.MPI.IN_PLACE, self._view(recv, count, dtype), op=self._op(op))

    def allGather(self, send, recv, count, dtype, stream):
        self.comm.Allgather(self._view(send, count, dtype), self._view(recv, count * self.comm.Get_size(), dtype))

    def reduceScatter(self, send, recv, count, dtype, op, stream):
        whole = self._view(send, count * self.comm.Get_size(), dtype)
        self.comm.Reduce_scatter_block(whole, self._view(recv, count, dtype), op=self._op(op))

    def broadcast(self, send, recv, count, dtype, root, stream):
        assert send == recv
        self.comm.Bcast(self._view(recv, count, dtype), root=root)

    def send(self, ptr, count, dtype, peer, stream):
        buf = self._view(ptr, count, dtype)
        if self.lib.batch is None:
            self.comm.Send(buf, dest=peer)
        else:
            self.lib.batch.append(lambda: self.comm.Isend(buf, dest=peer))

    def recv(self, ptr, count, dtype, peer, stream):
        buf = self._view(ptr, count, dtype)
        if self.lib.batch is None:
            self.comm.Recv(buf, source=peer)
        else:
            self.lib.batch.append(lambda: self.comm.Irecv(buf, source=peer))

    def destroy(self):
        self.comm.Free()


def _fake_cupy(lib):
    cp = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")

    class Stream:
        made = 0

        def __init__(self, non_blocking=False):
            Stream.made += 1
            self.ptr = Stream.made  # the compute stream is 1, the next one made 2

        def synchronize(self):
            lib.log.append(("synchronize", self.ptr))

        def wait_event(self, event):
            assert event.stream is not None, "waiting for an event never recorded"
            lib.log.append(("wait", self.ptr, event.stream))

    stream = Stream()

    class Event:
        def __init__(self, disable_timing=False):
            self.stream = None

        def record(self, stream=None):
            assert lib.batch is None, "event recorded inside a group: NCCL has launched nothing yet"
            self.stream = (stream or cuda.get_current_stream()).ptr
            lib.log.append(("record", self.stream))

        def synchronize(self):
            assert self.stream is not None
            lib.log.append(("synchronize", self.stream))

    cp.ndarray = _HostArray
    cp.empty = lambda shape, dtype=float: numpy.empty(shape, dtype).view(_HostArray)
    cp.zeros = lambda shape, dtype=float: numpy.zeros(shape, dtype).view(_HostArray)
    cp.ascontiguousarray = _dev
    cp.moveaxis = numpy.moveaxis
    cuda.nccl, cuda.Event, cuda.Stream = lib, Event, Stream
    cuda.get_current_stream = lambda: stream
    cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    cp.cuda = cuda
    return cp


@pytest.fixture
def fake_nccl(monkeypatch):
    lib = _FakeNccl()
    cp = _fake_cupy(lib)
    for name, module in (("cupy", cp), ("cupy.cuda", cp.cuda), ("cupy.cuda.nccl", lib)):
        monkeypatch.setitem(sys.modules, name, module)
    return lib


def _fake_groups(lib):
    groups = []
    for comm, name, ranks in mpi_groups():
        lib.comm = comm
        groups.append(NCCLGroup(comm, name, ranks))
    return groups


@pytest.mark.mpi(min_size=2)
def test_stand_in_nccl_collectives_match_numpy(fake_nccl):
    from mpi4py import MPI

    assert nccl_available()
    groups = _fake_groups(fake_nccl)
    assert fake_nccl.ids == sum(g.rank == 0 for g in groups)  # only group rank 0 makes an id
    check_collectives(groups, MPI.COMM_WORLD.Get_rank(), _dev, numpy.asarray)
    for g in groups:
        g.close()


@pytest.mark.mpi(min_size=2)
def test_stand_in_nccl_point_to_point_and_batches(fake_nccl):
    from mpi4py import MPI

    groups = _fake_groups(fake_nccl)
    empty = lambda n, dtype: numpy.empty(n, dtype).view(_HostArray)  # noqa: E731
    check_point_to_point(groups, MPI.COMM_WORLD.Get_rank(), _dev, numpy.asarray, empty)
    for g in groups:
        g.close()


@pytest.mark.mpi(min_size=2)
def test_bucket_all_reduce_runs_on_a_communication_stream_ordered_by_events(fake_nccl):
    """iall_reduce (the dp buckets) goes to the group's own stream after an event of the compute
    stream (1), so backward goes on while it runs; wait() and the next blocking operation make the
    compute stream wait for it on the device: the host never synchronises."""
    g = _fake_groups(fake_nccl)[0]
    fake_nccl.log.clear()
    x, y = _dev(numpy.ones(8, numpy.float32)), _dev(numpy.ones(8, numpy.float32))
    handle = g.iall_reduce(x)
    g.all_reduce(y)
    handle.wait()
    side = next(entry[1] for entry in fake_nccl.log if entry[0] == "allReduce")
    assert side != 1
    assert fake_nccl.log == [
        ("record", 1),  # the bucket's gradients are final here
        ("wait", side, 1),
        ("allReduce", side),
        ("record", side),
        ("wait", 1, side),  # all_reduce(y) keeps the group's order: after the bucket
        ("allReduce", 1),
        ("wait", 1, side),  # handle.wait(): the compute stream waits, the host does not
    ]
    numpy.testing.assert_array_equal(x, g.size)
    g.close()


@pytest.mark.mpi(min_size=2)
def test_stand_in_nccl_refuses_host_arrays_and_odd_dtypes(fake_nccl):
    g = _fake_groups(fake_nccl)[0]
    with pytest.raises(TypeError, match="takes CuPy arrays, not ndarray"):
        g.all_reduce(numpy.ones(3, numpy.float32))
    with pytest.raises(TypeError, match="NCCL cannot reduce complex64"):
        g.all_reduce(_dev(numpy.ones(3, numpy.complex64)))


# ---- real GPUs ---------------------------------------------------------------------------------


def _gpus() -> int:
    """CUDA devices visible to this process (0 without CuPy or a driver)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def _agree(ok: bool, why: str):
    """Skip on every rank or on none: a rank that skips alone would leave the others in a collective."""
    from mpi4py import MPI

    if not MPI.COMM_WORLD.allreduce(int(ok), op=MPI.MIN):
        pytest.skip(why)


def _use_gpu():
    """Bind this rank to a GPU (single-node test runs: world rank modulo the device count)."""
    import cupy
    from mpi4py import MPI

    cupy.cuda.Device(MPI.COMM_WORLD.Get_rank() % cupy.cuda.runtime.getDeviceCount()).use()
    return cupy


@pytest.fixture(scope="module")
def nccl_groups():
    from mpi4py import MPI

    size, gpus = MPI.COMM_WORLD.Get_size(), _gpus()
    _agree(nccl_available(), "needs CuPy with NCCL and a CUDA device")
    _agree(gpus >= size, f"NCCL needs one GPU per rank: {size} ranks, {gpus} GPUs")
    _use_gpu()
    groups = [NCCLGroup(comm, name, ranks) for comm, name, ranks in mpi_groups()]
    yield groups
    for g in groups:
        g.close()


@pytest.mark.mpi(min_size=2)
def test_nccl_collectives_match_numpy_on_gpus(nccl_groups):
    import cupy
    from mpi4py import MPI

    check_collectives(nccl_groups, MPI.COMM_WORLD.Get_rank(), cupy.asarray, cupy.asnumpy)


@pytest.mark.mpi(min_size=2)
def test_nccl_point_to_point_on_gpus(nccl_groups):
    import cupy
    from mpi4py import MPI

    check_point_to_point(nccl_groups, MPI.COMM_WORLD.Get_rank(), cupy.asarray, cupy.asnumpy, cupy.empty)


@pytest.mark.mpi(min_size=2)
def test_cupy_arrays_through_mpi_groups():
    """Ranks may share a GPU here: MPI moves device buffers (CUDA-aware) or stages them through host."""
    from mpi4py import MPI

    from mpmp.comm.mpi import MPIGroup

    _agree(_gpus() > 0, "needs CuPy and a CUDA device")
    cupy = _use_gpu()
    groups = [MPIGroup(comm, name, ranks) for comm, name, ranks in mpi_groups()]
    rank = MPI.COMM_WORLD.Get_rank()
    check_collectives(groups, rank, cupy.asarray, cupy.asnumpy)
    check_point_to_point(groups, rank, cupy.asarray, cupy.asnumpy, cupy.empty)
