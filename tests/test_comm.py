"""The communication layer: every collective and point-to-point operation on the sub-communicators of
a real grid, checked against NumPy results each rank computes locally from every member's data."""

import os
import subprocess
import sys
import textwrap
import time

import numpy
import pytest

from mpmp.comm import ledger
from mpmp.comm.grid import Coord, coord_of, world_rank
from mpmp.comm.group import block_sizes

DTYPES = [numpy.float32, numpy.float64, numpy.int32, numpy.int64]
SIZES = [0, 1, 7, 1000]


def tol(dtype):
    """Reductions may add in another order than NumPy: float32 round-off, relative and absolute."""
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == numpy.float32 else {"rtol": 1e-12, "atol": 1e-12}


def layout_for(size):
    return {2: (2, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2)}[size]


def data(world_rank_, n, dtype, salt=0):
    """What world rank r contributes: reproducible anywhere."""
    rng = numpy.random.default_rng([world_rank_, n, salt])
    if numpy.dtype(dtype).kind == "f":
        return rng.standard_normal(n).astype(dtype)
    return rng.integers(-1000, 1000, n).astype(dtype)


@pytest.fixture
def grid():
    from mpi4py import MPI

    from mpmp.comm.grid import ProcessGrid

    tp, pp, dp = layout_for(MPI.COMM_WORLD.Get_size())
    return ProcessGrid(tp, pp, dp)


def groups(grid):
    return [grid.tp_group, grid.dp_group, grid.pp_group, grid.mp_group, grid.world]


# ---- pure layout arithmetic (no MPI) -----------------------------------------------------------


@pytest.mark.parametrize("tp,dp,pp", [(1, 1, 1), (2, 2, 2), (4, 2, 1), (1, 8, 1), (2, 1, 4), (3, 2, 2)])
def test_rank_formula_round_trips(tp, dp, pp):
    seen = set()
    for r in range(tp * dp * pp):
        c = coord_of(r, tp, dp)
        assert world_rank(c, tp, dp) == r
        assert r == c.tp + tp * (c.dp + dp * c.pp)  # Megatron's order: tp fastest, then dp, then pp
        seen.add((c.tp, c.dp, c.pp))
    assert len(seen) == tp * dp * pp
    if dp > 1:
        assert coord_of(tp, tp, dp) == Coord(dp=1, pp=0, tp=0)  # after the tp ranks comes the next replica


def test_world_size_mismatch_is_refused_before_any_collective():
    from mpmp.comm.grid import check_layout
    from mpmp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"world size \(6\) must be divisible by tp\*pp \(4\*1 = 4\)"):
        check_layout(6, 4, 1)
    with pytest.raises(ConfigError, match=r"world size \(8\) != tp\*pp\*dp"):
        check_layout(8, 2, 2, 3)
    assert check_layout(8, 2, 2) == 2


def test_block_sizes_match_numpy_array_split():
    for n in range(0, 20):
        for parts in (1, 2, 3, 4, 8):
            assert block_sizes(n, parts) == [len(b) for b in numpy.array_split(numpy.arange(n), parts)]


# ---- grid on MPI ---------------------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
def test_group_members_match_the_formula_on_every_layout():
    from mpi4py import MPI

    from mpmp.comm.grid import ProcessGrid

    size = MPI.COMM_WORLD.Get_size()
    layouts = [(tp, pp, size // (tp * pp)) for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8) if size % (tp * pp) == 0]
    for tp, pp, dp in layouts:
        g = ProcessGrid(tp, pp, dp)
        c = g.coord
        assert g.rank == world_rank(c, tp, dp)
        assert list(g.tp_group.ranks) == [world_rank(Coord(c.dp, c.pp, t), tp, dp) for t in range(tp)]
        assert list(g.dp_group.ranks) == [world_rank(Coord(d, c.pp, c.tp), tp, dp) for d in range(dp)]
        assert list(g.pp_group.ranks) == [world_rank(Coord(c.dp, p, c.tp), tp, dp) for p in range(pp)]
        for group in (g.tp_group, g.dp_group, g.pp_group, g.mp_group):
            # the communicator really holds those ranks, in that order
            got = group.all_gather(numpy.array([g.rank], dtype=numpy.int64))
            assert got.tolist() == list(group.ranks)
            assert group.ranks[group.rank] == g.rank
        assert g.pp_group.rank == c.pp
        if pp > 1 and c.pp in (0, pp - 1):
            assert list(g.embed_group.ranks) == [world_rank(Coord(c.dp, p, c.tp), tp, dp) for p in (0, pp - 1)]
            got = g.embed_group.all_gather(numpy.array([c.pp], dtype=numpy.int64))
            assert got.tolist() == [0, pp - 1]
        else:
            assert g.embed_group.size == 1
        assert g.next_stage == (c.pp + 1) % pp and g.prev_stage == (c.pp - 1) % pp


# ---- collectives ---------------------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "avg", "max", "min"])
def test_all_reduce_matches_numpy(grid, dtype, op):
    if op == "avg" and numpy.dtype(dtype).kind != "f":
        pytest.skip("avg is for floating point")
    for group in groups(grid):
        for n in SIZES:
            parts = [data(r, n, dtype) for r in group.ranks]
            x = data(grid.rank, n, dtype)
            got = group.all_reduce(x, op)
            assert got is x  # in place
            if op in ("sum", "avg"):
                expect = numpy.sum(parts, axis=0, dtype=dtype) if n else numpy.zeros(0, dtype)
                if op == "avg":
                    expect = expect / group.size
            else:
                expect = (numpy.max if op == "max" else numpy.min)(parts, axis=0) if n else numpy.zeros(0, dtype)
            numpy.testing.assert_allclose(got, expect, **tol(dtype))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", DTYPES)
def test_iall_reduce_matches_all_reduce(grid, dtype):
    for group in groups(grid):
        for n in SIZES:
            x = data(grid.rank, n, dtype)
            y = x.copy()
            handle = group.iall_reduce(x)
            group.all_reduce(y)
            assert handle.wait() is x
            numpy.testing.assert_array_equal(x, y)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_gather_matches_numpy(grid, dtype):
    for group in groups(grid):
        for n in SIZES:
            x = data(grid.rank, n, dtype).reshape(n, 1) if n else numpy.zeros((0, 1), dtype)
            got = group.all_gather(x)
            expect = numpy.concatenate([data(r, n, dtype).reshape(n, 1) for r in group.ranks])
            numpy.testing.assert_array_equal(got, expect)
        # along another axis, as sequence parallelism gathers [b, s, d] along s
        x = data(grid.rank, 24, dtype).reshape(2, 3, 4)
        got = group.all_gather(x, axis=1)
        expect = numpy.concatenate([data(r, 24, dtype).reshape(2, 3, 4) for r in group.ranks], axis=1)
        numpy.testing.assert_array_equal(got, expect)
        # uneven sizes: member i contributes i + 1 rows
        mine = group.rank + 1
        x = numpy.full((mine, 2), grid.rank, dtype=dtype)
        got = group.all_gather(x, sizes=[i + 1 for i in range(group.size)])
        expect = numpy.concatenate([numpy.full((i + 1, 2), r, dtype=dtype) for i, r in enumerate(group.ranks)])
        numpy.testing.assert_array_equal(got, expect)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_scatter_matches_numpy(grid, dtype):
    for group in groups(grid):
        for n in SIZES + [group.size * 5, group.size * 5 + 3]:
            x = data(grid.rank, n, dtype)
            got = group.reduce_scatter(x)
            total = (
                numpy.sum([data(r, n, dtype) for r in group.ranks], axis=0, dtype=dtype) if n else numpy.zeros(0, dtype)
            )
            expect = numpy.array_split(total, group.size)[group.rank]
            numpy.testing.assert_allclose(got, expect, **tol(dtype))
        x = data(grid.rank, 2 * 4 * group.size * 3, dtype).reshape(2, 4 * group.size, 3)
        got = group.reduce_scatter(x, axis=1)
        total = numpy.sum([data(r, x.size, dtype).reshape(x.shape) for r in group.ranks], axis=0, dtype=dtype)
        expect = numpy.split(total, group.size, axis=1)[group.rank]
        numpy.testing.assert_allclose(got, expect, **tol(dtype))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_from_every_root(grid, dtype):
    for group in groups(grid):
        for root in range(group.size):
            for n in SIZES:
                x = data(grid.rank, n, dtype)
                assert group.broadcast(x, root) is x
                numpy.testing.assert_array_equal(x, data(group.ranks[root], n, dtype))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", DTYPES)
def test_point_to_point_ring(grid, dtype):
    for group in groups(grid):
        if group.size == 1:
            continue  # no peer to talk to
        right, left = (group.rank + 1) % group.size, (group.rank - 1) % group.size
        for n in SIZES:
            out = numpy.empty(n, dtype)
            # blocking pair, ordered so it cannot deadlock: even ranks send first
            if group.rank % 2 == 0:
                group.send(data(grid.rank, n, dtype), right, tag=5)
                group.recv(out, left, tag=5)
            else:
                group.recv(out, left, tag=5)
                group.send(data(grid.rank, n, dtype), right, tag=5)
            numpy.testing.assert_array_equal(out, data(group.ranks[left], n, dtype))
            # non-blocking
            out2 = numpy.empty(n, dtype)
            r = group.irecv(out2, left, tag=6)
            s = group.isend(data(grid.rank, n, dtype, salt=1), right, tag=6)
            assert r.wait() is out2
            s.wait()
            numpy.testing.assert_array_equal(out2, data(group.ranks[left], n, dtype, salt=1))
            # batched: both directions at once
            a, b = numpy.empty(n, dtype), numpy.empty(n, dtype)
            hs = group.batch_isend_irecv(
                [
                    ("send", data(grid.rank, n, dtype, 2), right, 7),
                    ("send", data(grid.rank, n, dtype, 3), left, 8),
                    ("recv", a, left, 7),
                    ("recv", b, right, 8),
                ]
            )
            for h in hs:
                h.wait()
            numpy.testing.assert_array_equal(a, data(group.ranks[left], n, dtype, 2))
            numpy.testing.assert_array_equal(b, data(group.ranks[right], n, dtype, 3))


@pytest.mark.mpi(min_size=2)
def test_ledger_records_kind_group_bytes_and_sequence(grid):
    led = ledger.install(ledger.Ledger(grid.rank, keep_events=True))
    try:
        g = grid.tp_group
        x = numpy.ones(10, numpy.float32)
        g.all_reduce(x)
        g.all_gather(x)
        g.reduce_scatter(numpy.ones(4 * g.size, numpy.float64))
        kinds = [(e.kind, e.group, e.nbytes, e.seq) for e in led.events]
        assert kinds == [
            ("all_reduce", "tp", 40, 0),
            ("all_gather", "tp", 40 * g.size, 1),
            ("reduce_scatter", "tp", 32 * g.size, 2),
        ]
        assert led.events[0].wire_bytes == pytest.approx(40 * 2 * (g.size - 1) / g.size)
        assert led.last_done["tp"] == (2, "reduce_scatter", "")
        assert all(e.end >= e.start for e in led.events)
    finally:
        ledger.install(ledger.Ledger())


def test_size_one_groups_move_and_record_nothing():
    from mpmp.comm.group import SelfGroup

    led = ledger.install(ledger.Ledger(keep_events=True))
    try:
        g = SelfGroup("tp")
        x = numpy.arange(6.0).reshape(2, 3)
        assert g.all_reduce(x) is x
        assert g.all_gather(x, axis=1) is x
        assert g.reduce_scatter(x) is x
        assert g.broadcast(x) is x
        assert led.events == [] and not led.totals
    finally:
        ledger.install(ledger.Ledger())


def test_chrome_trace_has_one_track_per_rank():
    import json

    a, b = ledger.Ledger(0, keep_events=True), ledger.Ledger(1, keep_events=True)
    for led in (a, b):
        t = led.begin("all_reduce", "dp")
        led.end(t, 2, -1, 8, "float32")
        with led.span("F0.0"):
            pass
    trace = json.loads(ledger.chrome_trace([a.chrome_events(), b.chrome_events()]))
    pids = {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert pids == {0, 1}
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {"rank 0", "rank 1"}


# ---- failure ends the job ------------------------------------------------------------------------


def _mpirun():
    import shutil

    return shutil.which("mpirun") or shutil.which("mpiexec")


@pytest.mark.skipif(_mpirun() is None, reason="no mpirun")
def test_exception_on_one_rank_aborts_the_whole_job_with_its_message(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(
        textwrap.dedent(
            """
            from mpmp.comm.mpi import MPI, abort_on_exception
            abort_on_exception()
            comm = MPI().COMM_WORLD
            if comm.Get_rank() == 1:
                raise RuntimeError("boom on purpose")
            comm.Barrier()  # rank 0 would wait here forever without the abort
            """
        )
    )
    start = time.time()
    proc = subprocess.run(
        [_mpirun(), "-n", "2", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
    )
    assert proc.returncode != 0
    assert time.time() - start < 30
    assert "rank 1: RuntimeError: boom on purpose" in proc.stderr


@pytest.mark.mpi(min_size=2)
def test_all_gather_json_returns_every_members_object_in_order(grid):
    for group in groups(grid):
        got = group.all_gather_json({"rank": grid.rank, "payload": "x" * grid.rank})
        assert got == [{"rank": r, "payload": "x" * r} for r in group.ranks]
