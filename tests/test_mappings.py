"""Megatron's conjugate operators (mpmp/nn/parallel.py), each with exact expected values, as Megatron's
tests/unit_tests/tensor_parallel/test_mappings.py does: rank r holds x_r = (r + 1) * base, so every sum,
gather and scatter has a value known in closed form. One process: every operator is the identity."""

import numpy
import pytest

from mpmp.comm.group import SelfGroup
from mpmp.nn import parallel as P

BASE = numpy.arange(24, dtype=numpy.float64).reshape(2, 4, 3)  # [batch, sequence, hidden]
OPERATORS = [
    (P.copy_to_tp, P.copy_to_tp_backward),
    (P.reduce_from_tp, P.reduce_from_tp_backward),
    (P.gather_from_sp, P.gather_from_sp_backward),
    (P.reduce_scatter_to_sp, P.reduce_scatter_to_sp_backward),
]


@pytest.mark.parametrize("forward,backward", OPERATORS)
def test_every_operator_is_the_identity_on_one_process(forward, backward):
    group = SelfGroup("tp")
    numpy.testing.assert_array_equal(forward(BASE.copy(), group), BASE)
    numpy.testing.assert_array_equal(backward(BASE.copy(), group), BASE)


@pytest.fixture
def tp_group(comm_of):
    comm = comm_of(2)
    if comm is None:
        pytest.skip("not a member")
    from mpmp.comm.mpi import MPIGroup

    return MPIGroup(comm, "tp")


def mine(group):
    return BASE * (group.rank + 1)


@pytest.mark.mpi(min_size=2)
def test_f_is_identity_forward_and_all_reduce_backward(tp_group):
    numpy.testing.assert_array_equal(P.copy_to_tp(mine(tp_group), tp_group), mine(tp_group))
    numpy.testing.assert_array_equal(P.copy_to_tp_backward(mine(tp_group), tp_group), BASE * 3)  # 1 + 2


@pytest.mark.mpi(min_size=2)
def test_g_is_all_reduce_forward_and_identity_backward(tp_group):
    numpy.testing.assert_array_equal(P.reduce_from_tp(mine(tp_group), tp_group), BASE * 3)
    numpy.testing.assert_array_equal(P.reduce_from_tp_backward(mine(tp_group), tp_group), mine(tp_group))


@pytest.mark.mpi(min_size=2)
def test_sp_gather_concatenates_the_sequence_and_its_backward_reduce_scatters(tp_group):
    r = tp_group.rank
    shard = mine(tp_group)[:, 2 * r : 2 * r + 2]  # this rank's half of the sequence
    want = numpy.concatenate([BASE[:, 0:2] * 1, BASE[:, 2:4] * 2], axis=1)
    numpy.testing.assert_array_equal(P.gather_from_sp(shard, tp_group), want)
    # backward: each rank holds a gradient of the whole sequence; it receives the sum of its half
    numpy.testing.assert_array_equal(
        P.gather_from_sp_backward(mine(tp_group), tp_group), 3 * BASE[:, 2 * r : 2 * r + 2]
    )


@pytest.mark.mpi(min_size=2)
def test_sp_reduce_scatter_sums_and_splits_the_sequence_and_its_backward_gathers(tp_group):
    r = tp_group.rank
    numpy.testing.assert_array_equal(P.reduce_scatter_to_sp(mine(tp_group), tp_group), 3 * BASE[:, 2 * r : 2 * r + 2])
    shard = mine(tp_group)[:, 2 * r : 2 * r + 2]
    want = numpy.concatenate([BASE[:, 0:2] * 1, BASE[:, 2:4] * 2], axis=1)
    numpy.testing.assert_array_equal(P.reduce_scatter_to_sp_backward(shard, tp_group), want)


# (forward, backward, input replicated over tp, output replicated over tp, input shape). An output
# consumed by each rank's own partial computation (f's, the SP gather's: a column-parallel linear
# follows) is a per-rank copy, not a replicated tensor: each rank's gradient of it differs.
ADJOINTS = [
    (P.copy_to_tp, P.copy_to_tp_backward, True, False, (2, 4, 3)),
    (P.reduce_from_tp, P.reduce_from_tp_backward, False, True, (2, 4, 3)),
    (P.gather_from_sp, P.gather_from_sp_backward, False, False, (2, 2, 3)),
    (P.reduce_scatter_to_sp, P.reduce_scatter_to_sp_backward, False, False, (2, 4, 3)),
]


def _inner(a, b, group, replicated):
    """<a, b> over the whole space: a replicated tensor counts once, per-rank parts add up."""
    local = numpy.array([float((a * b).sum()) if (group.rank == 0 or not replicated) else 0.0])
    return group.all_reduce(local, exact=True)[0]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("forward,backward,rep_in,rep_out,shape", ADJOINTS)
def test_each_backward_is_the_adjoint_of_its_forward(tp_group, forward, backward, rep_in, rep_out, shape):
    """<forward(x), y> = <x, backward(y)> over the tp group: the backward is the transpose of the
    forward, which is what makes each pair a correct autograd function."""
    rng_x = numpy.random.default_rng(0 if rep_in else 1 + tp_group.rank)  # replicated: the same on every rank
    x = rng_x.standard_normal(shape)
    fx = forward(x.copy(), tp_group)
    rng_y = numpy.random.default_rng(10 if rep_out else 11 + tp_group.rank)
    y = rng_y.standard_normal(fx.shape)
    lhs = _inner(fx, y, tp_group, rep_out)
    rhs = _inner(x, backward(y.copy(), tp_group), tp_group, rep_in)
    assert lhs == pytest.approx(rhs, rel=1e-12)
