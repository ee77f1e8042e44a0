"""The kernel module of this process: mpmp.nn.functional on NumPy, mpmp.nn.cuda.functional on CuPy.

Both hold the same functions with the same arguments and caches. Layers take the module once, when
they are built (after mpmp.backend.use), rather than choosing on every call.
"""

from mpmp import backend


def kernels():
    """mpmp.nn.cuda.functional when this process runs on CuPy, else mpmp.nn.functional."""
    if backend.name() == "cupy":
        from mpmp.nn.cuda import functional
    else:
        from mpmp.nn import functional
    return functional
