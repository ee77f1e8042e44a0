"""Matrix products on cuBLAS for every storage type: fp32, fp16 and bf16 (uint16 patterns) inputs,
fp32 accumulation (tensor cores for 16-bit inputs), output in the inputs' storage type or fp32.

Row-major arrays seen by column-major cuBLAS: a row-major [r, c] matrix is the column-major [c, r]
matrix with leading dimension c, its transpose. So C = op(A) op(B) is computed as the column-major
C^T = op(B)^T op(A)^T: cuBLAS gets B first, then A, with m = N, n = M, and each operand's leading
dimension is its row-major row length. A transposed view (F-contiguous, e.g. `w.T`) is the
C-contiguous transpose with the flag flipped, so no copy is made.
"""

import math

import numpy

from mpmp.nn.cuda._loader import ctype

_CUDA_R = {"float": 0, "__half": 2, "__nv_bfloat16": 14}  # cudaDataType: CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
_COMPUTE_32F = 68  # CUBLAS_COMPUTE_32F: fp32 accumulation, no TF32 down-conversion
_GEMM_DEFAULT = -1  # CUBLAS_GEMM_DEFAULT: cuBLAS picks the algorithm (tensor cores for 16-bit)
_OP = (0, 1)  # CUBLAS_OP_N, CUBLAS_OP_T
_ZERO, _ONE = numpy.zeros(1, numpy.float32), numpy.ones(1, numpy.float32)  # beta (a host pointer)


def _cublas():
    import cupy
    from cupy_backends.cuda.libs import cublas

    return cupy, cublas


def _row_major(a, trans):
    """(C-contiguous matrix memory, transpose flag) for a 2-D or batched operand."""
    if a.flags.c_contiguous:
        return a, trans
    t = a.swapaxes(-1, -2)
    if t.flags.c_contiguous:
        return t, not trans
    return a.copy(), trans  # some other stride pattern: one copy


def _shapes(a, b, trans_a, trans_b):
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
    kb, n = (b.shape[-1], b.shape[-2]) if trans_b else (b.shape[-2], b.shape[-1])
    if k != kb:
        raise ValueError(f"matmul: inner dimensions differ: op(a) is [{m}, {k}], op(b) is [{kb}, {n}]")
    return m, n, k


def _output(out, lead, m, n, dtype, accumulate):
    import cupy

    if out is None:
        if accumulate:
            raise ValueError("matmul: accumulate=True needs out")
        return cupy.empty(lead + (m, n), dtype=dtype)
    if out.shape != lead + (m, n) or not out.flags.c_contiguous:
        raise ValueError(f"matmul: out must be a C-contiguous {lead + (m, n)} array, not {out.shape}")
    return out


def _check_types(a, b, out_dtype):
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: both operands must have one storage type, not {a.dtype} and {b.dtype}")
    ctype(a)
    if numpy.dtype(out_dtype) not in (a.dtype, numpy.dtype(numpy.float32)):
        raise TypeError(f"matmul: {a.dtype} inputs give {a.dtype} or float32 outputs, not {numpy.dtype(out_dtype)}")


def _empty_product(c, k, accumulate):
    """True (and c made right) when there is nothing for cuBLAS to do; its leading dimensions must be >= 1."""
    if c.size == 0:
        return True
    if k == 0:
        if not accumulate:
            c.fill(0)
        return True
    return False


def _transposed_out(out):
    """An F-contiguous out (e.g. `w.grad.T`) is written as the C-contiguous transpose."""
    return out is not None and not out.flags.c_contiguous and out.swapaxes(-1, -2).flags.c_contiguous


def matmul(a, b, out=None, trans_a=False, trans_b=False, *, accumulate=False, out_dtype=None, alpha=1.0):
    """out = alpha op(a) @ op(b) (out += ... with accumulate=True) for 2-D a, b; op transposes when
    asked. out_dtype: the output's storage when out is None (default the inputs'; float32 keeps the
    fp32 sums of 16-bit inputs, e.g. for weight gradients)."""
    if _transposed_out(out):  # C^T = op(b)^T op(a)^T
        matmul(b, a, out.T, not trans_b, not trans_a, accumulate=accumulate, alpha=alpha)
        return out
    _check_types(a, b, out.dtype if out is not None else out_dtype or a.dtype)
    cupy, cublas = _cublas()
    m, n, k = _shapes(a, b, trans_a, trans_b)
    c = _output(out, (), m, n, out_dtype or a.dtype, accumulate)
    if _empty_product(c, k, accumulate):
        return c
    a, trans_a = _row_major(a, trans_a)
    b, trans_b = _row_major(b, trans_b)
    scale = numpy.full(1, alpha, numpy.float32)  # host pointers, read during the call
    cublas.gemmEx(
        cupy.cuda.device.get_cublas_handle(),
        _OP[trans_b],
        _OP[trans_a],
        n,
        m,
        k,
        scale.ctypes.data,
        b.data.ptr,
        _CUDA_R[ctype(b)],
        b.shape[-1],
        a.data.ptr,
        _CUDA_R[ctype(a)],
        a.shape[-1],
        (_ONE if accumulate else _ZERO).ctypes.data,
        c.data.ptr,
        _CUDA_R[ctype(c)],
        n,
        _COMPUTE_32F,
        _GEMM_DEFAULT,
    )
    return c


def batched_matmul(a, b, out=None, trans_a=False, trans_b=False, *, accumulate=False, out_dtype=None, alpha=1.0):
    """matmul over the leading dimensions of a, b [..., r, c] (equal leading shapes), one strided
    batched cuBLAS call: the attention products over [B, H, T, *]."""
    _check_types(a, b, out.dtype if out is not None else out_dtype or a.dtype)
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"batched_matmul: leading dimensions differ: {a.shape} and {b.shape}")
    cupy, cublas = _cublas()
    lead = a.shape[:-2]
    m, n, k = _shapes(a, b, trans_a, trans_b)
    c = _output(out, lead, m, n, out_dtype or a.dtype, accumulate)
    if _empty_product(c, k, accumulate):
        return c
    a, trans_a = _row_major(a, trans_a)
    b, trans_b = _row_major(b, trans_b)
    scale = numpy.full(1, alpha, numpy.float32)
    cublas.gemmStridedBatchedEx(
        cupy.cuda.device.get_cublas_handle(),
        _OP[trans_b],
        _OP[trans_a],
        n,
        m,
        k,
        scale.ctypes.data,
        b.data.ptr,
        _CUDA_R[ctype(b)],
        b.shape[-1],
        b.shape[-1] * b.shape[-2],
        a.data.ptr,
        _CUDA_R[ctype(a)],
        a.shape[-1],
        a.shape[-1] * a.shape[-2],
        (_ONE if accumulate else _ZERO).ctypes.data,
        c.data.ptr,
        _CUDA_R[ctype(c)],
        n,
        m * n,
        math.prod(lead),
        _COMPUTE_32F,
        _GEMM_DEFAULT,
    )
    return c
