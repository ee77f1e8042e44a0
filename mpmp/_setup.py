"""Process set-up done before NumPy is imported: BLAS threads per rank, and the allocator.

BLAS threads:
N ranks on one node with C cores each starting C BLAS threads oversubscribe the cores N-fold and
slow every GEMM down. The launcher tells each process how many ranks share its node; we give each
rank max(1, C // N) threads unless the user already chose (OMP_NUM_THREADS and friends win).
"""

import os

# What the common launchers (mpirun/mpiexec of MPICH and Open MPI, srun with PMI) put in each rank's
# environment: the one list of them in mpmp.
# Set for every rank of a launched job: mpi4py must then be initialised to learn the world.
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")
# This rank's index in the job, known before MPI is initialised (SLURM_PROCID last: under mpirun inside
# an allocation every rank inherits the batch script's 0).
_WORLD_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
# This rank's index among the ranks on its node (which GPU it takes).
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")
# The number of ranks on this node.
_LOCAL_SIZE_VARS = (
    "OMPI_COMM_WORLD_LOCAL_SIZE",  # Open MPI
    "MPI_LOCALNRANKS",  # MPICH (hydra)
    "MPICH_LOCALNRANKS",
    "PMI_LOCAL_SIZE",
    "SLURM_STEP_TASKS_PER_NODE",  # srun: this step's tasks on each node
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


def mpi_launched(environ=os.environ) -> bool:
    """Whether this process was started by an MPI launcher (as opposed to plain `python`)."""
    return any(v in environ for v in LAUNCHER_VARS)


def launcher_rank(environ=os.environ) -> int:
    """This process's rank as the launcher numbered it (0 when not launched by MPI), before MPI starts."""
    if not mpi_launched(environ):
        return 0
    for var in _WORLD_RANK_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 0


def local_rank(environ=os.environ) -> int:
    for var in _LOCAL_RANK_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(environ=os.environ) -> int:
    return max(1, available_cores() // local_ranks(environ))


def blas_thread_count(environ=os.environ) -> int:
    """This process's BLAS threads: the first thread variable set (as configure() sets them), else
    its share of the node's cores."""
    for var in _THREAD_VARS:
        value = environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return threads_per_rank(environ)


def kernel_threads(environ=os.environ) -> int:
    """Threads for the row blocks of the NumPy kernels (backend.for_blocks): MPMP_KERNEL_THREADS,
    default 1. Opt-in: on the 2-core development machine two threads made the step slower, not
    faster (README, Benchmarks), while the BLAS products already use both cores."""
    value = environ.get("MPMP_KERNEL_THREADS", "1")
    if not value.isdigit() or int(value) < 1:
        from mpmp.errors import ConfigError

        raise ConfigError(f"MPMP_KERNEL_THREADS must be a whole number of at least 1, not {value!r}")
    return int(value)


def configure(environ=os.environ) -> int | None:
    """Set the BLAS thread variables for this rank unless the user set one. Returns the count set."""
    if any(var in environ for var in _THREAD_VARS) or environ.get("MPMP_BLAS_THREADS") == "auto-off":
        return None
    n = threads_per_rank(environ)
    for var in _THREAD_VARS:
        environ[var] = str(n)
    return n


def configure_allocator() -> bool:
    """Keep freed large blocks for reuse instead of returning them to the kernel (glibc only).

    A training step allocates and frees many megabyte-sized temporaries. By default glibc serves each
    from fresh mmap'd pages, and the page faults and zeroing cost more than the arithmetic on them (a
    third of a step, measured with python -m mpmp.bench train). Raising the mmap and trim thresholds
    makes freed memory reusable. MPMP_MALLOC=default keeps glibc's behaviour.
    """
    if os.environ.get("MPMP_MALLOC") == "default":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        return libc.mallopt(m_trim_threshold, 1 << 30) == 1 and ok
    except (OSError, AttributeError):
        return False
