"""The array module: NumPy on CPUs, CuPy on GPUs; the same code runs on both.

Kernels take the module from their inputs (`array_module(x)`), so they stay pure. Code that creates
arrays from nothing (parameters, buffers) asks `xp()`, which `use()` sets once at start-up.
"""

import contextvars
import itertools
import os
import threading

import numpy

_xp = numpy
_name = "numpy"


def use(name: str, local_rank: int = 0):
    """Select 'numpy' or 'cupy' for this process; with CuPy, bind to GPU local_rank % device count."""
    global _xp, _name
    if name == "numpy":
        _xp, _name = numpy, "numpy"
        kernel_threads()  # MPMP_KERNEL_THREADS is checked now, at start-up, not at the first kernel
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
    (runtime.Trainer reads the loss, the overflow flag and the norm here, together, once). Its own
    name, so tests can find the step's one transfer by it."""
    return to_numpy(a)


def synchronize():
    if _name == "cupy":
        _xp.cuda.get_current_stream().synchronize()


def blas_threads() -> str:
    """What this process asked BLAS for (for the start-up banner)."""
    return os.environ.get("OPENBLAS_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "default"))


# ---------------------------------------------------------------------------------------------
# Threads for the NumPy kernels. NumPy runs one ufunc on one core, but releases the GIL inside its
# loops (and inside BLAS), so the row blocks of an elementwise or row-wise kernel can run on several
# Python threads at once. A rank uses MPMP_KERNEL_THREADS of them (default 1: measured slower with
# two on a 2-core machine, where BLAS already uses both; mpmp._setup.kernel_threads). While they run,
# OpenBLAS is held to one thread: its own workers would compete for the same cores, and its thread
# count is one number for the whole process (openblas_set_num_threads_local is not thread-local).
# ---------------------------------------------------------------------------------------------

_pool = {"threads": None, "executor": None, "blas": None}
_inside = threading.local()


def kernel_threads() -> int:
    """How many threads the NumPy kernels split their work over."""
    if _pool["threads"] is None:
        from mpmp._setup import kernel_threads as from_environment

        _pool["threads"] = from_environment()
    return _pool["threads"]


def set_kernel_threads(n: int) -> int:
    """Use n threads from now on (tests, benchmarks); returns the previous count."""
    old = kernel_threads()
    _pool["threads"] = max(1, int(n))
    return old


def for_blocks(fn, n: int, block: int) -> list:
    """[fn(lo, hi) for the blocks [lo, hi) of [0, n), each `block` long but the last], run over the
    kernel threads (this one among them) in any order; the results come back in block order.

    Each thread takes the next block when it finishes one, and this thread waits only for blocks
    another thread has taken: a helper the OS has not scheduled yet (a busy machine) holds nothing
    up, and finds no work when it starts."""
    spans = [(lo, min(lo + block, n)) for lo in range(0, n, max(1, block))]
    threads = 1 if _name == "cupy" else min(kernel_threads(), len(spans))  # a GPU has its own threads
    if threads <= 1 or getattr(_inside, "busy", False):
        return [fn(lo, hi) for lo, hi in spans]
    results, errors = [None] * len(spans), []
    order, finished, done = iter(range(len(spans))), itertools.count(1), threading.Event()

    def work():  # next() on an iterator or a counter is atomic under the GIL
        _inside.busy = True
        for i in order:
            try:
                results[i] = fn(*spans[i])
            except BaseException as exc:  # raised again by the calling thread
                errors.append(exc)
            if next(finished) == len(spans):
                done.set()
        _inside.busy = False

    with _blas_held_to_one():
        for _ in range(threads - 1):  # in a copy of this thread's context: NumPy's errstate lives there
            _executor().submit(contextvars.copy_context().run, work)
        work()
        done.wait()
    if errors:
        raise errors[0]
    return results


def on_helper_thread() -> bool:
    """Whether this runs on one of for_blocks' helper threads, not on the thread that called it (a
    caller's scratch buffer serves its own thread only)."""
    return threading.current_thread().name.startswith(_HELPER_PREFIX)


_HELPER_PREFIX = "mpmp-kernel"


def _executor():
    if _pool["executor"] is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool["executor"] = ThreadPoolExecutor(max(1, kernel_threads() - 1), thread_name_prefix=_HELPER_PREFIX)
    return _pool["executor"]


class _blas_held_to_one:
    """OpenBLAS's thread count set to 1 inside, restored after (nothing when BLAS is not OpenBLAS)."""

    def __enter__(self):
        self.calls = _openblas_threads_calls()
        self.saved = self.calls[0]() if self.calls else 1
        if self.saved > 1:
            self.calls[1](1)

    def __exit__(self, *exc):
        if self.saved > 1:
            self.calls[1](self.saved)


def _openblas_threads_calls():
    """(get, set) of the thread count of the OpenBLAS NumPy uses, found in this process's mapped
    libraries (scipy-openblas wheels prefix and suffix the names); None for another BLAS."""
    if _pool["blas"] is None:
        _pool["blas"] = ()
        try:
            import ctypes

            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "openblas" in line and ".so" in line}
            for path in sorted(paths):
                lib = ctypes.CDLL(path)
                for get, set_ in (
                    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                    ("openblas_get_num_threads", "openblas_set_num_threads"),
                ):
                    if hasattr(lib, get) and hasattr(lib, set_):
                        getattr(lib, get).restype = ctypes.c_int
                        getattr(lib, set_).argtypes = [ctypes.c_int]
                        _pool["blas"] = (getattr(lib, get), getattr(lib, set_))
                        return _pool["blas"]
        except OSError:
            pass
    return _pool["blas"]


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
