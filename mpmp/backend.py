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
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA's own errors: no driver, no device
        count, why = 0, f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
    else:
        why = ""
    if count == 0:
        from mpmp.errors import ConfigError

        raise ConfigError(f"--backend cupy: no CUDA device is visible{why}")
    cupy.cuda.Device(local_rank % count).use()
    _xp, _name = cupy, "cupy"
    return _xp


def device_count() -> int:
    """CUDA devices this process sees (0 on the numpy backend)."""
    return _xp.cuda.runtime.getDeviceCount() if _name == "cupy" else 0


def xp():
    """The array module selected for this process."""
    return _xp


def name() -> str:
    return _name


def array_module(*arrays):
    """numpy, or cupy if any argument is a CuPy array (without importing CuPy when it is not)."""
    for a in arrays:
        if type(a) is not numpy.ndarray and type(a).__module__.startswith("cupy"):
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


def to_host(a):
    """A host copy of a training step's device values: the one place a step waits for the GPU
    (runtime.Trainer reads the loss, the overflow flag and the norm here, together, once)."""
    return a.get() if is_device_array(a) else numpy.asarray(a)


def synchronize():
    if _name == "cupy":
        _xp.cuda.get_current_stream().synchronize()


def blas_threads() -> str:
    """What this process asked BLAS for (for the start-up banner)."""
    return os.environ.get("OPENBLAS_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "default"))


# ---------------------------------------------------------------------------------------------
# Low-precision formats, emulated: values live in float32 arrays but are rounded to the format's
# grid, as GPUs store bf16/fp16 activations and accumulate products in fp32. On the wire they travel
# as their 16-bit patterns, so communication really halves.
# ---------------------------------------------------------------------------------------------


def round_to(x, fmt: str):
    """Round a float32 array in place to bf16 (nearest even) or fp16 (overflow gives inf)."""
    if fmt == "bf16":
        mod = array_module(x)
        u = x.view(mod.uint32)
        u += mod.uint32(0x7FFF) + ((u >> 16) & 1)
        u &= mod.uint32(0xFFFF0000)
    elif fmt == "fp16":
        with numpy.errstate(over="ignore"):
            x[...] = x.astype("float16")
    return x


def to_wire(x, fmt: str):
    """The 16-bit patterns of a float32 array's values in bf16 or fp16 (uint16, same shape)."""
    mod = array_module(x)
    if fmt == "bf16":
        r = round_to(x.astype(mod.float32, copy=True), "bf16")
        return (r.view(mod.uint32) >> 16).astype(mod.uint16)
    with numpy.errstate(over="ignore"):
        return x.astype(mod.float16).view(mod.uint16)


def from_wire(u, fmt: str, out=None):
    """float32 values of 16-bit patterns (into out when given)."""
    mod = array_module(u)
    if fmt == "bf16":
        values = (u.astype(mod.uint32) << 16).view(mod.float32)
    else:
        values = u.view(mod.float16).astype(mod.float32)
    if out is None:
        return values
    out[...] = values.reshape(out.shape)
    return out
