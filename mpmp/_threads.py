"""BLAS threads per rank, decided before NumPy is imported.

N ranks on one node with C cores each starting C BLAS threads oversubscribe the cores N-fold and
slow every GEMM down. The launcher tells each process how many ranks share its node; we give each
rank max(1, C // N) threads unless the user already chose (OMP_NUM_THREADS and friends win).
"""

import os

# Variables the common launchers set to the number of ranks on this node.
_LOCAL_SIZE_VARS = (
    "OMPI_COMM_WORLD_LOCAL_SIZE",  # Open MPI
    "MPI_LOCALNRANKS",  # MPICH (hydra)
    "MPICH_LOCALNRANKS",
    "PMI_LOCAL_SIZE",
    "SLURM_NTASKS_PER_NODE",
    "PALS_LOCAL_SIZE",
)
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def local_ranks(environ=os.environ) -> int:
    """How many ranks of this job share this node (1 when not launched by MPI)."""
    for var in _LOCAL_SIZE_VARS:
        value = environ.get(var, "")
        head = value.split("(")[0].split(",")[0]  # SLURM writes e.g. "4(x2)"
        if head.isdigit() and int(head) > 0:
            return int(head)
    return 1


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(environ=os.environ) -> int:
    return max(1, available_cores() // local_ranks(environ))


def configure(environ=os.environ) -> int | None:
    """Set the BLAS thread variables for this rank unless the user set one. Returns the count set."""
    if any(var in environ for var in _THREAD_VARS) or environ.get("MPMP_BLAS_THREADS") == "auto-off":
        return None
    n = threads_per_rank(environ)
    for var in _THREAD_VARS:
        environ[var] = str(n)
    return n
