"""Elementwise steps the layers need on bf16 storage, where CuPy's operators would treat the uint16
patterns as integers (`a += b` on two bf16 arrays adds bit patterns: wrong, silently). On float32
and float16 arrays these give what CuPy's operators give; the layers can call them on every path.

STORAGE maps --dtype to the array dtype a tensor is held in.
"""

import numpy

from mpmp.nn.cuda import _loader as L

STORAGE = {"fp32": numpy.float32, "fp16": numpy.float16, "bf16": numpy.uint16}


def _run(name, n, *args, types):
    if n:
        L.kernel("elementwise.cu", name, *types)((L.blocks_for(n),), (L.THREADS,), args)


def _contiguous(a, what):
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be contiguous (it is written in place)")


def cast(x, dtype, out=None):
    """x converted to another storage dtype (float32, float16, uint16 = bf16), rounding to nearest
    even; a copy when the dtype is already x's."""
    import cupy

    x = cupy.ascontiguousarray(x)
    dtype = numpy.dtype(dtype)
    if out is None:
        out = cupy.empty(x.shape, dtype=dtype)
    _contiguous(out, "out")
    if dtype == x.dtype:
        out[...] = x
        return out
    _run("cast", x.size, out, x, L.i64(x.size), types=(L.ctype(x), L.ctype(out)))
    return out


def add_(a, b):
    """a += b in place (same shape and storage); returns a."""
    import cupy

    _contiguous(a, "a")
    b = cupy.ascontiguousarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"add_: {a.shape} {a.dtype} += {b.shape} {b.dtype}: shapes and storage must match")
    _run("add_inplace", a.size, a, b, L.i64(a.size), types=(L.ctype(a),))
    return a


def bias_add_(y, b):
    """y [..., C] += b [C] in place; returns y."""
    _contiguous(y, "y")
    L.kernel("linear.cu", "bias_add", L.ctype(y))(
        (L.blocks_for(y.size),), (L.THREADS,), (y, b, L.i64(y.size), L.i32(y.shape[-1]))
    )
    return y


def scale(x, alpha, out=None):
    """alpha * x (into out, which may be x)."""
    import cupy

    x = cupy.ascontiguousarray(x)
    out = cupy.empty_like(x) if out is None else out
    _contiguous(out, "out")
    _run("scale", x.size, out, x, L.f32(alpha), L.i64(x.size), types=(L.ctype(x),))
    return out
