# ruff: noqa: I001  (mpmp must be imported before NumPy)
"""Shared test fixtures.

MPI tests carry @pytest.mark.mpi(min_size=N) (pytest-mpi) and run under
`mpirun -n N python -m pytest --with-mpi -m mpi`. A failure on one rank must end the run, not leave
the other ranks waiting in a collective: the report hook below prints the failure and aborts the
world. pytest-timeout (thread method, set in pyproject.toml) ends a rank stuck inside MPI.
"""

import os
import sys

import mpmp  # noqa: F401  (sets the BLAS thread count before NumPy is imported)
import numpy
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mpi_size():
    from mpmp._setup import mpi_launched

    if not mpi_launched():
        return 1
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def pytest_runtest_logreport(report):
    if report.failed and _mpi_size() > 1:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
        sys.stderr.write(f"\nrank {rank}: FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)


@pytest.fixture
def comm_of():
    """comm_of(n): a communicator of world ranks 0..n-1 (None on the other ranks, which then skip the
    body). Every rank must call it, in the same order: it is a collective on COMM_WORLD."""
    from mpi4py import MPI

    made = []

    def make(n):
        world = MPI.COMM_WORLD
        if world.Get_size() < n:
            pytest.skip(f"needs {n} ranks")
        sub = world.Split(0 if world.Get_rank() < n else MPI.UNDEFINED, world.Get_rank())
        if sub != MPI.COMM_NULL:
            made.append(sub)
            return sub
        return None

    yield make
    for c in made:
        c.Free()


@pytest.fixture
def rng():
    return numpy.random.default_rng(0)
