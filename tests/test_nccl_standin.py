"""The CPU stand-in for NCCL (mpmp/comm/nccl_standin.py): what NCCL accepts works, and each of NCCL's
rules fires where code would hang or be refused on GPUs.

Run under MPI: timeout 300 mpirun -n 2 bash tests/mpi_rank.sh -q --with-mpi -m mpi tests/test_nccl_standin.py
"""

import numpy
import pytest
from test_nccl import check_collectives, check_point_to_point, mpi_groups

from mpmp.backend import from_wire, to_wire
from mpmp.comm.nccl_standin import NCCLRuleError, NCCLStandIn
from mpmp.errors import ConfigError

SHORT = 1.0  # seconds before a would-be hang is reported, in the tests of the rules


def _pair(comm_of, **kw):
    comm = comm_of(2)
    if comm is None:
        pytest.skip("this rank is outside the pair")
    return NCCLStandIn(comm, "pair", device=comm.Get_rank(), **kw)


@pytest.mark.mpi(min_size=2)
def test_standin_collectives_and_batches_match_numpy():
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    groups = [NCCLStandIn(comm, name, ranks, device=rank) for comm, name, ranks in mpi_groups()]
    check_collectives(groups, rank, numpy.asarray, numpy.asarray)
    check_point_to_point(groups, rank, numpy.asarray, numpy.asarray, numpy.empty)
    for g in groups:
        g.close()


@pytest.mark.mpi(min_size=2)
def test_an_exchange_where_both_ranks_send_first_is_a_hang_on_nccl(comm_of):
    g = _pair(comm_of, timeout=SHORT)
    other = 1 - g.rank
    out = numpy.empty(4, numpy.float32)
    with pytest.raises(NCCLRuleError, match=r"send to group rank .* batch_isend_irecv"):
        g.send(numpy.full(4, g.rank, numpy.float32), other)
        g.recv(out, other)
    # the same exchange in one batch completes, and tags play no part in the matching
    handles = g.batch_isend_irecv([("send", numpy.full(4, g.rank, numpy.float32), other, 5), ("recv", out, other, 9)])
    for h in handles:
        h.wait()
    numpy.testing.assert_array_equal(out, other)
    g.close()


@pytest.mark.mpi(min_size=2)
def test_a_receive_nobody_sends_is_reported(comm_of):
    g = _pair(comm_of, timeout=SHORT)
    if g.rank == 0:
        with pytest.raises(NCCLRuleError, match=r"recv from group rank 1 \(point-to-point operation #1"):
            g.recv(numpy.empty(3, numpy.float32), 1)
    g.close()


@pytest.mark.mpi(min_size=2)
def test_sends_and_receives_match_in_issue_order_without_tags(comm_of):
    g = _pair(comm_of)
    a, b = numpy.empty(2, numpy.float32), numpy.empty(2, numpy.float32)
    if g.rank == 0:
        g.send(numpy.float32([1, 1]), 1, tag=2)
        g.send(numpy.float32([2, 2]), 1, tag=1)
    else:
        g.recv(a, 0, tag=1)  # on MPI the tags would swap these two
        g.recv(b, 0, tag=2)
        numpy.testing.assert_array_equal(a, [1, 1])
        numpy.testing.assert_array_equal(b, [2, 2])
    g.close()


@pytest.mark.mpi(min_size=2)
def test_collectives_in_a_different_order_name_the_ranks(comm_of):
    g = _pair(comm_of, timeout=10)
    x = numpy.ones(6, numpy.float32)
    with pytest.raises(NCCLRuleError, match=r"collective #1 differs.*ranks \[0\]: all_reduce.*ranks \[1\]: all_gather"):
        if g.rank == 0:
            g.all_reduce(x)
        else:
            g.all_gather(x)
    g.close()


@pytest.mark.mpi(min_size=2)
def test_collectives_of_different_sizes_are_refused(comm_of):
    g = _pair(comm_of, timeout=10)
    with pytest.raises(
        NCCLRuleError, match=r"ranks \[0\]: all_reduce sum float32 x10; ranks \[1\]: all_reduce sum float32 x12"
    ):
        g.all_reduce(numpy.ones(10 + 2 * g.rank, numpy.float32))
    g.close()


@pytest.mark.mpi(min_size=2)
def test_a_rank_that_skips_a_collective_is_named(comm_of):
    g = _pair(comm_of, timeout=SHORT)
    if g.rank == 0:
        with pytest.raises(NCCLRuleError, match=r"ranks \[1\] did not reach collective #1"):
            g.all_reduce(numpy.ones(3, numpy.float32))


@pytest.mark.mpi(min_size=2)
def test_a_periodic_check_still_catches_an_earlier_divergence(comm_of):
    """With check_every=2 the first collectives are not compared, but the fingerprint carries them."""
    g = _pair(comm_of, timeout=10, check_every=2)
    x = numpy.ones(4, numpy.float32)
    g.all_reduce(x, "max" if g.rank == 0 else "min")  # differs, not checked yet (same sizes: no hang)
    with pytest.raises(NCCLRuleError, match="collective #2 differs"):
        g.all_reduce(x)
    g.close()


@pytest.mark.mpi(min_size=2)
def test_two_ranks_on_one_device_are_refused(comm_of):
    comm = comm_of(2)
    if comm is None:
        pytest.skip("this rank is outside the pair")
    with pytest.raises(ConfigError, match=r"ranks \[0, 1\] all claim device 0 on"):
        NCCLStandIn(comm, "pair", device=0)


@pytest.mark.mpi(min_size=2)
def test_nccl_dtypes_and_arrays_only(comm_of):
    g = _pair(comm_of)
    with pytest.raises(TypeError, match="NCCL cannot reduce uint16"):
        g._all_reduce(numpy.ones(3, numpy.uint16), "sum")  # bit patterns added as integers
    # through the Group interface a uint16 array is bf16 storage: reduced as bf16 values
    patterns = to_wire(numpy.full(3, 1.5, numpy.float32), "bf16")
    numpy.testing.assert_array_equal(from_wire(g.all_reduce(patterns), "bf16"), 3.0)
    with pytest.raises(TypeError, match="takes NumPy arrays"):
        g.all_reduce([1.0, 2.0])
    g.wire = "bf16"  # float32 travelling as bf16 patterns is reduced as bf16: allowed
    x = numpy.full(3, 1.5, numpy.float32)
    g.all_reduce(x)
    numpy.testing.assert_array_equal(x, 3.0)
    g.close()
