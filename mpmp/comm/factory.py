"""Which transport carries a run's groups (`--comm`), and the groups built on it.

    mpi           MPIGroup: NumPy or CuPy arrays (device buffers with CUDA-aware MPI, else staged
                  through pinned host memory); ranks may share a GPU
    nccl          NCCLGroup: CuPy arrays on one GPU per rank
    nccl-standin  NCCLStandIn: NCCL's rules over MPI on CPUs (tests; not in --help)

The default is nccl when the backend is CuPy, CuPy has NCCL, and every rank has its own GPU (no node
runs more ranks than it has GPUs); mpi otherwise. The world group is MPI whatever the choice: it
carries the host-side values of start-up, the console and checkpoints. A training step's own values
(the loss, the gradient norm) travel on the mp and dp groups.
"""

from mpmp.errors import ConfigError

COMMS = ("mpi", "nccl")
TEST_ONLY = ("nccl-standin",)


def choose(requested: str | None, *, backend: str, ranks_on_node: int, devices: int, nccl_ok: bool):
    """(transport, why) for this rank, from what it sees on its node; ConfigError for a request that
    cannot work. requested None or "auto": the default of the module's docstring."""
    if requested == "mpi":
        return "mpi", "--comm mpi"
    if requested in TEST_ONLY:
        return requested, f"--comm {requested}: NCCL's rules over MPI, for tests"
    if requested not in (None, "auto", "nccl"):
        raise ConfigError(f"--comm must be one of {', '.join(COMMS)}, not {requested!r}")
    problem = _nccl_problem(backend, ranks_on_node, devices, nccl_ok)
    if requested == "nccl":
        if problem:
            raise ConfigError(f"--comm nccl: {problem}; use --comm mpi")
        return "nccl", "--comm nccl"
    if problem:
        return "mpi", f"default: {problem}"
    return "nccl", f"default: every rank has its own GPU ({ranks_on_node} ranks and {devices} GPUs on this node)"


def choose_here(requested: str | None, world_size: int) -> tuple[str, str]:
    """(transport, why) for this process, the same on every rank: choose() from what this node has,
    then agree() over the world (collective when world_size > 1)."""
    from mpmp import backend
    from mpmp._setup import local_ranks

    devices, nccl_ok = 0, False
    if backend.name() == "cupy":
        from mpmp.comm.nccl import nccl_available

        devices, nccl_ok = backend.device_count(), nccl_available()
    ranks = local_ranks() if world_size > 1 else 1
    kind, why = choose(requested, backend=backend.name(), ranks_on_node=ranks, devices=devices, nccl_ok=nccl_ok)
    if world_size == 1:
        return "none", "one process: nothing crosses a process boundary"
    from mpmp.comm.mpi import world_group

    return agree(world_group(), kind, why)


def _nccl_problem(backend, ranks_on_node, devices, nccl_ok) -> str | None:
    if backend != "cupy":
        return "NCCL moves GPU arrays and the backend is numpy"
    if not nccl_ok:
        return "this CuPy has no NCCL"
    if ranks_on_node > devices:
        return f"{ranks_on_node} ranks share {devices} GPU(s) on this node and NCCL needs one GPU per rank"
    return None


def agree(world, kind: str, why: str) -> tuple[str, str]:
    """The transport every rank uses: this rank's choice unless another rank's node ruled NCCL out
    (world: an MPI group of every rank). Collective."""
    for other_kind, other_why in world.all_gather_json([kind, why]):
        if other_kind == "mpi" and kind != "mpi":
            return "mpi", f"{other_why} (on another rank's node)"
    return kind, why


def group_class(kind: str):
    """The Group class of a transport."""
    if kind == "mpi":
        from mpmp.comm.mpi import MPIGroup

        return MPIGroup
    if kind == "nccl":
        from mpmp.comm.nccl import NCCLGroup

        return NCCLGroup
    if kind == "nccl-standin":
        from mpmp.comm.nccl_standin import NCCLStandIn

        return NCCLStandIn
    raise ConfigError(f"unknown transport {kind!r}")
