"""The array module: NumPy on CPUs, CuPy on GPUs; the same code runs on both.

Kernels take the module from their inputs (`array_module(x)`), so they stay pure. Code that creates
arrays from nothing (parameters, buffers) asks `xp()`, which `use()` sets once at start-up.
"""

import os

import numpy

_xp = numpy
_name = "numpy"


def use(name: str, local_rank: int = 0):
    """Select 'numpy' or 'cupy' for this process; with CuPy, bind to GPU local_rank % device count."""
    global _xp, _name
    if name == "numpy":
        _xp, _name = numpy, "numpy"
        return _xp
    if name != "cupy":
        from mpmp.errors import ConfigError

        raise ConfigError(f"--backend must be numpy or cupy, not {name!r}")
    try:
        import cupy
    except ImportError as exc:
        from mpmp.errors import ConfigError

        raise ConfigError(f"--backend cupy needs CuPy (pip install 'mpmp[gpu]'): {exc}") from None
    count = cupy.cuda.runtime.getDeviceCount()
    if count == 0:
        from mpmp.errors import ConfigError

        raise ConfigError("--backend cupy: no CUDA device is visible")
    cupy.cuda.Device(local_rank % count).use()
    _xp, _name = cupy, "cupy"
    return _xp


def xp():
    """The array module selected for this process."""
    return _xp


def name() -> str:
    return _name


def array_module(*arrays):
    """numpy, or cupy if any argument is a CuPy array (without importing CuPy when it is not)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return numpy


def is_device_array(a) -> bool:
    return type(a).__module__.startswith("cupy")


def to_numpy(a):
    """A host copy of an array (no copy for a NumPy array)."""
    if is_device_array(a):
        return a.get()
    return numpy.asarray(a)


def synchronize():
    if _name == "cupy":
        _xp.cuda.get_current_stream().synchronize()


def local_rank() -> int:
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def blas_threads() -> str:
    """What this process asked BLAS for (for the start-up banner)."""
    return os.environ.get("OPENBLAS_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "default"))
