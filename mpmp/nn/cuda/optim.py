"""The optimizer's passes over the flat fp32 buffers on CUDA, each one fused kernel:

- adamw_update: mpmp/optim/adamw.py's adamw_update (torch.optim.AdamW) with the same arguments, plus
  `skip`, a device flag that vetoes the step, and a grad_scale that may be a device scalar;
- unscale_and_check: grad *= inv_scale and a device flag for inf/NaN (fp16 loss scaling);
- local_sq_norm: mpmp/optim/clip.py's local_sq_norm, returned as a device scalar.

Nothing here waits for the GPU: flags and norms stay on the device until the trainer reads them
with the step's loss.
"""

import math

import numpy

from mpmp.backend import is_device_array
from mpmp.config import AdamWConfig
from mpmp.nn.cuda import _loader as L

_runs_on_device = {}  # tuple of runs -> device int64 [lo0, hi0, lo1, hi1, ...], copied once


def _device_runs(runs):
    import cupy

    key = tuple((int(lo), int(hi)) for lo, hi in runs)
    if key not in _runs_on_device:
        flat = numpy.asarray(key, dtype=numpy.int64).reshape(-1)
        if numpy.any(numpy.diff(flat) < 0):
            raise ValueError("runs must be sorted and disjoint [lo, hi) pairs")
        _runs_on_device[key] = cupy.asarray(flat if flat.size else numpy.zeros(2, numpy.int64))
    return _runs_on_device[key], len(key)


def _scalar_args(value):
    """(host float, device pointer or NULL) for a scale given as a Python number or a device array."""
    if is_device_array(value):
        if value.dtype != numpy.float32 or value.size != 1:
            raise TypeError(f"a device scale must be a one-element float32 array, not {value.dtype} of {value.size}")
        return L.f32(1.0), value
    return L.f32(value), L.NULL


def _check_flat(*arrays):
    for a in arrays:
        if a.dtype != numpy.float32 or a.ndim != 1 or not a.flags.c_contiguous:
            raise TypeError(f"AdamW works on contiguous 1-D float32 buffers, not {a.dtype} {a.shape}")


def adamw_update(
    param, grad, m, v, *, step: int, lr: float, hp: AdamWConfig, decay_runs=(), scratch=None, grad_scale=1.0, skip=None
):
    """One AdamW step in place on flat fp32 arrays (step counts from 1), torch's order of operations:
    decay, m <- m + (1-b1)(g - m), v <- b2 v + (1-b2) g^2, p <- p - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),
    with g = grad * grad_scale. grad_scale: a number or a one-element float32 device array (e.g. a clip
    coefficient computed on the device). skip: None or an int32 device flag; non-zero leaves param, m
    and v untouched (an overflowed fp16 step). scratch is not needed here (accepted for the mirror)."""
    _check_flat(param, grad, m, v)
    runs, n_runs = _device_runs(decay_runs)
    bias1 = 1 - hp.beta1**step
    bias2_sqrt = math.sqrt(1 - hp.beta2**step)
    host_scale, scale_ptr = _scalar_args(grad_scale)
    n = param.size
    L.kernel("adamw.cu", "adamw_update")(
        (L.blocks_for(n),),
        (L.THREADS,),
        (
            param,
            grad,
            m,
            v,
            L.i64(n),
            runs,
            L.i32(n_runs),
            L.f32(lr),
            L.f32(hp.beta1),
            L.f32(hp.beta2),
            L.f32(hp.eps),
            L.f32(hp.weight_decay),
            L.f32(lr / bias1),
            L.f32(bias2_sqrt),
            host_scale,
            scale_ptr,
            L.NULL if skip is None else skip,
        ),
    )


def unscale_and_check(grad, inv_scale, found_inf=None):
    """grad *= inv_scale in place; returns found_inf, an int32 [1] device flag set to 1 if any element
    of grad was inf or NaN (it is only ever raised: pass the same flag to check several buffers, and
    zero it at the start of a step). inv_scale: a number or a one-element float32 device array."""
    import cupy

    _check_flat(grad)
    if found_inf is None:
        found_inf = cupy.zeros(1, dtype=cupy.int32)
    host, ptr = _scalar_args(inv_scale)
    n = grad.size
    L.kernel("grad_check.cu", "unscale_and_check")(
        (L.blocks_for(n),), (L.THREADS,), (grad, found_inf, L.i64(n), host, ptr)
    )
    return found_inf


def local_sq_norm(grad, runs, scratch=None):
    """Sum of squares of grad over the [lo, hi) runs that count, in float64, as a 0-d device array
    (clip.local_sq_norm returns a float, which would wait for the GPU). Deterministic."""
    import cupy

    _check_flat(grad)
    dev_runs, n_runs = _device_runs(runs)
    total = sum(hi - lo for lo, hi in runs)
    parts = max(1, min(1024, -(-total // (L.THREADS * 16))))
    partial = cupy.empty(parts, dtype=cupy.float64) if scratch is None else scratch[:parts]
    out = cupy.empty((), dtype=cupy.float64)
    L.kernel("grad_check.cu", "sum_squares_partial")((parts,), (L.THREADS,), (partial, grad, dev_runs, L.i32(n_runs)))
    L.kernel("grad_check.cu", "sum_squares_finish")((1,), (L.THREADS,), (out, partial, L.i32(parts)))
    return out
