"""A stand-in for CuPy on CPUs, strict where RawKernel and cuBLAS are forgiving, for the tests of the
Python side of mpmp/nn/cuda.

- Arrays are NumPy arrays posing as CuPy ones (their module says cupy, `.data.ptr` is an address).
- A kernel launch binds its arguments to the C++ parameters parsed from the source the loader hands
  to RawModule, and refuses what CuPy would pass silently and the GPU would misread: a scalar of the
  wrong width, an array of the wrong storage type, a non-contiguous array, more or fewer arguments,
  a block of more than 1024 threads. Then a NumPy emulation of the kernel (EMULATORS) runs on the
  bound parameters, by name, so swapped arguments of one type give wrong numbers.
- cublas.gemmEx / gemmStridedBatchedEx are column-major GEMMs on raw pointers, so gemm.py's
  row-major mapping is checked for real.
- Whole training steps run on it (`backend.use("cupy")` after `install`): device arrays stay device
  arrays through NumPy's operators (a reduction gives a 0-d array, not a host scalar, as on CuPy),
  and every way a device value reaches the host (get, float, int, bool, item, tolist) is counted in
  TRANSFERS with where it happened. Under `strict()`, an operation that mixes a device array with a
  host array raises, as CuPy does. Pinned host memory and streams are plain host objects.
"""

import contextlib
import ctypes
import re
import sys
import traceback
import types

import numpy

from mpmp.backend import from_wire, to_wire

# ---- arrays ---------------------------------------------------------------------------------------

TRANSFERS = {"d2h": 0, "where": [], "pinned_allocations": 0}
_strict = [False]


def _device_to_host():
    TRANSFERS["d2h"] += 1
    TRANSFERS["where"].append("".join(traceback.format_stack(limit=8)[:-2]))


@contextlib.contextmanager
def strict():
    """Refuse operations mixing device and host arrays (CuPy raises TypeError for them)."""
    _strict[0] = True
    try:
        yield
    finally:
        _strict[0] = False


def reset_transfers():
    TRANSFERS.update(d2h=0, where=[])


def _wrap(r):
    if isinstance(r, tuple):
        return tuple(_wrap(x) for x in r)
    if isinstance(r, numpy.ndarray):
        return r.view(DeviceArray)
    if isinstance(r, numpy.generic):  # a reduction to a scalar stays on the device (0-d)
        return numpy.asarray(r).view(DeviceArray)
    return r


def _host(x):
    return x.view(numpy.ndarray) if isinstance(x, DeviceArray) else x


class DeviceArray(numpy.ndarray):
    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if _strict[0] and any(type(x) is numpy.ndarray and x.ndim for x in inputs):
            raise TypeError(f"{ufunc.__name__}: a device array with a host array (CuPy refuses)")
        if out is not None:
            kwargs["out"] = tuple(_host(o) for o in out)
        result = getattr(ufunc, method)(*(_host(x) for x in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __getitem__(self, index):
        return _wrap(super().__getitem__(index))

    def __setitem__(self, index, value):  # a device value copied on the device, not via a host float
        super().__setitem__(index, _host(value))

    # ---- the ways a value reaches the host, each counted --------------------------------------
    def get(self, stream=None, order="C", out=None):
        _device_to_host()
        if out is None:
            return numpy.array(self.view(numpy.ndarray), order=order)
        out[...] = self.view(numpy.ndarray)
        return out

    def set(self, arr, stream=None):
        self.view(numpy.ndarray)[...] = arr

    def __float__(self):
        _device_to_host()
        return float(self.view(numpy.ndarray))

    def __int__(self):
        _device_to_host()
        return int(self.view(numpy.ndarray))

    def __bool__(self):
        _device_to_host()
        return bool(self.view(numpy.ndarray))

    def item(self, *args):
        _device_to_host()
        return self.view(numpy.ndarray).item(*args)

    def tolist(self):
        _device_to_host()
        return self.view(numpy.ndarray).tolist()


DeviceArray.__module__ = "cupy"


def dev(a):
    return numpy.ascontiguousarray(a).view(DeviceArray)


STORAGE_DTYPE = {
    "float": "float32",
    "__half": "float16",
    "__nv_bfloat16": "uint16",
    "double": "float64",
    "int": "int32",
    "long long": "int64",
    "bool": "bool",
}
SCALAR_TYPE = {"int": numpy.int32, "long long": numpy.int64, "float": numpy.float32}


def as_float(a, ctype):
    """The float64 values of an array in a storage type."""
    if ctype == "__nv_bfloat16":
        return from_wire(numpy.asarray(a).view(numpy.uint16), "bf16").astype(numpy.float64)
    return numpy.asarray(a).astype(numpy.float64)


def store(dst, values, ctype):
    """Write float values into dst, rounded as the kernels round (nearest even)."""
    values = numpy.asarray(values, dtype=numpy.float64).reshape(dst.shape)
    if ctype == "__nv_bfloat16":
        dst.view(numpy.uint16)[...] = to_wire(values.astype(numpy.float32), "bf16")
    else:
        with numpy.errstate(over="ignore"):
            dst[...] = values.astype(dst.dtype)


# ---- kernels --------------------------------------------------------------------------------------

_KERNEL = re.compile(r"(?:template\s*<([^>]*)>\s*)?__global__\s+void\s+(\w+)\s*\(([^)]*)\)")


def parse_kernels(source):
    """{name: (template parameter names, [(C type, parameter name, is pointer)])}."""
    out = {}
    for tparams, name, params in _KERNEL.findall(source):
        tnames = [t.split()[-1] for t in tparams.split(",")] if tparams else []
        plist = []
        for p in params.split(","):
            p = " ".join(p.split())
            pointer = "*" in p
            words = p.replace("*", " ").replace("const ", "").split()
            plist.append((" ".join(words[:-1]), words[-1], pointer))
        out[name] = (tnames, plist)
    return out


class Launch:
    """One recorded launch: the kernel, its template arguments, grid, block and bound parameters."""

    def __init__(self, name, targs, grid, block, params):
        self.name, self.targs, self.grid, self.block, self.params = name, targs, grid, block, params


class FakeKernel:
    def __init__(self, expr, signature, log):
        self.expr, self.log = expr, log
        name, _, targs = expr.partition("<")
        self.name = name
        targs = [t.strip() for t in targs.rstrip(">").split(",")] if targs else []
        tnames, self.params = signature
        self.subst = dict(zip(tnames, targs))
        self.targs = targs

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        assert len(args) == len(self.params), f"{self.expr}: {len(args)} arguments for {len(self.params)} parameters"
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        assert all(g >= 1 for g in grid) and numpy.prod(block) <= 1024, f"{self.expr}: grid {grid}, block {block}"
        bound = {}
        for (ctype, pname, pointer), arg in zip(self.params, args):
            ctype = self.subst.get(ctype, ctype)
            where = f"{self.expr}: parameter {pname} ({ctype}{'*' if pointer else ''})"
            if pointer:
                if isinstance(arg, numpy.uint64) and arg == 0:
                    bound[pname] = None
                    continue
                assert isinstance(arg, DeviceArray), f"{where} got {type(arg).__name__}"
                assert arg.dtype == numpy.dtype(STORAGE_DTYPE[ctype]), f"{where} got a {arg.dtype} array"
                assert arg.flags.c_contiguous, f"{where} got a non-contiguous array"
                bound[pname] = arg.reshape(-1).view(numpy.ndarray)  # the emulator's memory is the device's
            else:
                assert type(arg) is SCALAR_TYPE[ctype], f"{where} got {type(arg).__name__}"
                bound[pname] = arg.item()
        launch = Launch(self.name, self.targs, grid, block, bound)
        self.log.append(launch)
        EMULATORS[self.name](launch, **bound)


class FakeRawModule:
    log = []

    def __init__(self, code, options=(), name_expressions=()):
        self.signatures = parse_kernels(code)
        self.names = tuple(name_expressions)

    def get_function(self, expr):
        assert expr in self.names, f"{expr} was not among the name expressions"
        return FakeKernel(expr, self.signatures[expr.partition("<")[0]], FakeRawModule.log)


# ---- cuBLAS, column-major on raw pointers -----------------------------------------------------------

_CUDA_R = {0: ("float32", "float"), 2: ("float16", "__half"), 14: ("uint16", "__nv_bfloat16")}


def _colmajor(ptr, code, rows, cols, ld, offset=0):
    """A writable float64 copy and the raw view of a column-major rows x cols matrix at ptr."""
    assert ld >= max(1, rows), f"leading dimension {ld} < rows {rows}"
    dtype, ctype = _CUDA_R[code]
    itemsize = numpy.dtype(dtype).itemsize
    raw = numpy.frombuffer((ctypes.c_char * (ld * cols * itemsize)).from_address(ptr + offset * itemsize), dtype)
    view = raw.reshape(cols, ld).T[:rows, :]
    with numpy.errstate(invalid="ignore"):  # an output read before beta = 0 discards it may hold NaN patterns
        return as_float(view, ctype), view, ctype


def _host_float(ptr):
    return ctypes.c_float.from_address(ptr).value


def gemm_strided_batched_ex(
    handle,
    transa,
    transb,
    m,
    n,
    k,
    alpha,
    A,
    atype,
    lda,
    stride_a,
    B,
    btype,
    ldb,
    stride_b,
    beta,
    C,
    ctype_code,
    ldc,
    stride_c,
    batch,
    compute,
    algo,
):
    assert compute == 68 and atype == btype and ctype_code in (atype, 0)
    for i in range(batch):
        a, _, _ = _colmajor(A, atype, *((m, k) if transa == 0 else (k, m)), lda, i * stride_a)
        b, _, _ = _colmajor(B, btype, *((k, n) if transb == 0 else (n, k)), ldb, i * stride_b)
        c, raw_c, cty = _colmajor(C, ctype_code, m, n, ldc, i * stride_c)
        a = a if transa == 0 else a.T
        b = b if transb == 0 else b.T
        result = _host_float(alpha) * (a @ b) + (_host_float(beta) * c if _host_float(beta) else 0)
        store(raw_c, result, cty)


def gemm_ex(
    handle, transa, transb, m, n, k, alpha, A, atype, lda, B, btype, ldb, beta, C, ctype_code, ldc, compute, algo
):
    gemm_strided_batched_ex(
        handle,
        transa,
        transb,
        m,
        n,
        k,
        alpha,
        A,
        atype,
        lda,
        0,
        B,
        btype,
        ldb,
        0,
        beta,
        C,
        ctype_code,
        ldc,
        0,
        1,
        compute,
        algo,
    )


# ---- the module ----------------------------------------------------------------------------------------


# CuPy functions the trainer's device path calls: NumPy's, with device arrays in and out
_FUNCTIONS = (
    "zeros_like",
    "ones",
    "full",
    "where",
    "stack",
    "concatenate",
    "sqrt",
    "log",
    "exp",
    "tanh",
    "isfinite",
    "minimum",
    "maximum",
    "multiply",
    "add",
    "subtract",
    "divide",
    "split",
    "moveaxis",
    "triu",
)


def _function(fn):
    def device_fn(*args, **kwargs):
        if "out" in kwargs:  # cupy.exp(x, out=x) and the like: the device array is the host's memory
            kwargs["out"] = _host(kwargs["out"])
        return _wrap(fn(*(_host(a) for a in args), **kwargs))

    return device_fn


class _Stream:
    ptr = 0

    def __init__(self, non_blocking=False):
        pass

    def synchronize(self):
        pass

    def wait_event(self, event):
        pass


class _Event:
    def __init__(self, disable_timing=False):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


def _pinned(nbytes):
    TRANSFERS["pinned_allocations"] += 1
    return bytearray(nbytes)


def make_cupy():
    cp = types.ModuleType("cupy")
    cp.ndarray = DeviceArray
    for name in ("float16", "float32", "float64", "int32", "int64", "uint8", "uint16", "bool_", "inf", "nan"):
        setattr(cp, name, getattr(numpy, name))
    for name in _FUNCTIONS:
        setattr(cp, name, _function(getattr(numpy, name)))
    cp.empty = lambda shape, dtype=numpy.float64: numpy.empty(shape, dtype).view(DeviceArray)
    cp.zeros = lambda shape, dtype=numpy.float64: numpy.zeros(shape, dtype).view(DeviceArray)
    cp.empty_like = lambda a, dtype=None: numpy.empty_like(numpy.asarray(a), dtype=dtype).view(DeviceArray)
    cp.asarray = lambda a, dtype=None: dev(numpy.array(_host(a), dtype=dtype))  # a copy, as to a device
    cp.ascontiguousarray = lambda a, dtype=None: dev(numpy.ascontiguousarray(_host(a), dtype=dtype))
    cp.arange = lambda *a, **k: dev(numpy.arange(*a, **k))
    cp.asnumpy = lambda a: a.get() if isinstance(a, DeviceArray) else numpy.array(a)
    cp.__version__ = "fake"
    cp.RawModule = FakeRawModule
    cuda = types.ModuleType("cupy.cuda")
    cuda.device = types.SimpleNamespace(get_cublas_handle=lambda: 1)
    cuda.runtime = types.SimpleNamespace(
        getDeviceProperties=lambda i: {"name": b"fake CPU device"}, getDeviceCount=lambda: 1
    )
    cuda.Device = lambda i=0: types.SimpleNamespace(use=lambda: None, id=i)
    cuda.Stream, cuda.Event = _Stream, _Event
    current = _Stream()
    cuda.get_current_stream = lambda: current
    cuda.alloc_pinned_memory = _pinned
    cp.cuda = cuda
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.gemmEx, cublas.gemmStridedBatchedEx = gemm_ex, gemm_strided_batched_ex
    return cp, cublas


def install(monkeypatch):
    """Put the fake CuPy in sys.modules for one test; the loader's caches are cleared around it."""
    from mpmp.nn.cuda import _loader, optim

    cp, cublas = make_cupy()
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = cublas
    for name, mod in (
        ("cupy", cp),
        ("cupy.cuda", cp.cuda),
        ("cupy_backends", types.ModuleType("cupy_backends")),
        ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
        ("cupy_backends.cuda.libs", libs),
        ("cupy_backends.cuda.libs.cublas", cublas),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    _loader.module.cache_clear()
    _loader.kernel.cache_clear()
    optim._runs_on_device.clear()
    FakeRawModule.log = []
    return cp


# ---- NumPy emulations of the kernels, by parameter name ------------------------------------------------
C, A = numpy.sqrt(2 / numpy.pi), 0.044715


def _t(k, i=0):
    return k.targs[i]


def _f(k, a, n=None, i=0):
    a = a if n is None else a[:n]
    return as_float(a, _t(k, i))


def _gelu_grad(x, t):
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * C * (1 + 3 * A * x * x)


def _rounded(k, values):
    out = numpy.empty(numpy.shape(values), dtype=STORAGE_DTYPE[_t(k)])
    store(out, values, _t(k))
    return as_float(out, _t(k))


def gelu_forward(k, y, t_out, x, n):
    xf = _f(k, x, n)
    t = _rounded(k, numpy.tanh(C * (xf + A * xf**3)))
    store(t_out[:n], t, _t(k))
    store(y[:n], 0.5 * xf * (1 + numpy.tanh(C * (xf + A * xf**3))), _t(k))


def gelu_backward(k, dx, dy, x, t, n):
    store(dx[:n], _f(k, dy, n) * _gelu_grad(_f(k, x, n), _f(k, t, n)), _t(k))


def bias_gelu_forward(k, y, h, b, n, cols):
    x = _rounded(k, _f(k, h, n) + numpy.tile(_f(k, b, cols), n // cols))
    store(h[:n], x, _t(k))
    store(y[:n], 0.5 * x * (1 + numpy.tanh(C * (x + A * x**3))), _t(k))


def bias_gelu_backward(k, dh, dy, x, n):
    xf = _f(k, x, n)
    store(dh[:n], _f(k, dy, n) * _gelu_grad(xf, numpy.tanh(C * (xf + A * xf**3))), _t(k))


def bias_add(k, y, b, n, cols):
    store(y[:n], _f(k, y, n) + numpy.tile(_f(k, b, cols), n // cols), _t(k))


def _parts(k, rows):
    parts = k.grid[1]
    per = -(-rows // parts)
    return [(p, p * per, min(rows, p * per + per)) for p in range(parts)]


def bias_grad_partial(k, partial, dy, rows, cols):
    assert k.grid[0] * 32 >= cols and k.block[0] == 32
    m = _f(k, dy, rows * cols).reshape(rows, cols)
    for p, r0, r1 in _parts(k, rows):
        partial[p * cols : (p + 1) * cols] = m[r0:r1].sum(axis=0)


def column_sum_finish(k, out, partial, parts, cols):
    assert k.grid[0] * k.block[0] >= cols
    out[:cols] += partial[: parts * cols].reshape(parts, cols).sum(axis=0, dtype=numpy.float64).astype(numpy.float32)


def layernorm_forward(k, y, xhat, rstd_out, x, w, b, rows, d, eps):
    assert k.grid[0] * (k.block[0] // 32) >= rows
    xf = _f(k, x, rows * d).reshape(rows, d)
    mean = xf.mean(axis=1, keepdims=True)
    rstd = 1 / numpy.sqrt(((xf - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    xh = (xf - mean) * rstd
    store(xhat[: rows * d], xh, _t(k))
    store(y[: rows * d], xh * _f(k, w, d) + _f(k, b, d), _t(k))
    rstd_out[:rows] = rstd[:, 0]


def layernorm_backward_input(k, dx, dy, xhat, rstd, w, rows, d):
    g = _f(k, dy, rows * d).reshape(rows, d) * _f(k, w, d)
    xh = _f(k, xhat, rows * d).reshape(rows, d)
    r = rstd[:rows, None].astype(numpy.float64)
    store(dx[: rows * d], r * (g - g.mean(axis=1, keepdims=True) - xh * (g * xh).mean(axis=1, keepdims=True)), _t(k))


def layernorm_param_grad_partial(k, partial, dy, xhat, rows, d):
    g = _f(k, dy, rows * d).reshape(rows, d)
    xh = _f(k, xhat, rows * d).reshape(rows, d)
    parts = k.grid[1]
    for p, r0, r1 in _parts(k, rows):
        partial[p * d : (p + 1) * d] = (g[r0:r1] * xh[r0:r1]).sum(axis=0)
        partial[(parts + p) * d : (parts + p + 1) * d] = g[r0:r1].sum(axis=0)


def _causal(rows, t):
    return (numpy.arange(t)[None, :] <= (numpy.arange(rows) % t)[:, None]).astype(numpy.float64)


def causal_softmax_forward(k, p, scores, rows, t):
    assert k.grid[0] * (k.block[0] // 32) >= rows
    s = scores[: rows * t].astype(numpy.float64).reshape(rows, t)
    mask = _causal(rows, t)
    e = numpy.exp(numpy.where(mask > 0, s, -numpy.inf) - numpy.where(mask > 0, s, -numpy.inf).max(1, keepdims=True))
    store(p[: rows * t], e / e.sum(axis=1, keepdims=True), _t(k))


def causal_softmax_backward(k, ds, p, dp, rows, t):
    pf = _f(k, p, rows * t).reshape(rows, t)
    d = dp[: rows * t].astype(numpy.float64).reshape(rows, t)
    store(ds[: rows * t], _causal(rows, t) * pf * (d - (pf * d).sum(axis=1, keepdims=True)), _t(k))


def cross_entropy_row_max(k, row_max, logits, v_local, vocab_valid):
    n = k.grid[0]
    row_max[:n] = _f(k, logits, n * v_local).reshape(n, v_local)[:, :vocab_valid].max(axis=1)


def cross_entropy_exp_sum(k, logits, both, safe_t, own, row_max, targets, vocab_start, n, v_local, vocab_valid):
    assert k.grid[0] == n
    lg = _f(k, logits, n * v_local).reshape(n, v_local)
    m = row_max[:n, None].astype(numpy.float64)
    local = targets[:n] - vocab_start
    owned = (local >= 0) & (local < v_local)
    safe = numpy.where(owned, local, 0)
    z = numpy.where(owned, lg[numpy.arange(n), safe] - m[:, 0], 0)
    e = numpy.where(numpy.arange(v_local)[None, :] < vocab_valid, numpy.exp(lg - m), 0)
    store(logits[: n * v_local], e, _t(k))
    both[:n] = z
    both[n : 2 * n] = _f(k, logits, n * v_local).reshape(n, v_local).sum(axis=1)
    safe_t[:n], own[:n] = safe, owned


def cross_entropy_backward(k, dlogits, sum_exp, safe_t, own, scale, v_local):
    n = k.grid[0]
    e = _f(k, dlogits, n * v_local).reshape(n, v_local)
    onehot = numpy.zeros_like(e)
    onehot[numpy.arange(n)[own[:n]], safe_t[:n][own[:n]]] = 1
    store(dlogits[: n * v_local], scale * (e / sum_exp[:n, None] - onehot), _t(k))


def embedding_backward(k, dweight, dout, ids, n, d):
    assert k.grid[0] * (k.block[0] // 32) >= n
    numpy.add.at(dweight.reshape(-1, d), ids[:n], _f(k, dout, n * d).reshape(n, d).astype(numpy.float32))


def cast(k, out, x, n):
    store(out[:n], _f(k, x, n), _t(k, 1))


def add_inplace(k, a, b, n):
    store(a[:n], _f(k, a, n) + _f(k, b, n), _t(k))


def scale(k, out, x, alpha, n):
    store(out[:n], alpha * _f(k, x, n), _t(k))


def adamw_update(
    k,
    param,
    grad,
    m,
    v,
    n,
    decay_runs,
    n_runs,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step_size,
    bias2_sqrt,
    grad_scale,
    scale_ptr,
    skip,
):
    if skip is not None and skip[0]:
        return
    g = grad[:n].astype(numpy.float64) * grad_scale * (1 if scale_ptr is None else scale_ptr[0])
    decay = numpy.zeros(n, bool)
    for lo, hi in decay_runs[: 2 * n_runs].reshape(-1, 2):
        decay[lo:hi] = True
    p = numpy.where(decay, param[:n] * (1 - lr * weight_decay), param[:n])
    m[:n] = m[:n] + (1 - beta1) * (g - m[:n])
    v[:n] = beta2 * v[:n] + (1 - beta2) * g * g
    param[:n] = p - step_size * (m[:n] / (numpy.sqrt(v[:n]) / bias2_sqrt + eps))


def unscale_and_check(k, grad, found_inf, n, inv_scale, inv_scale_ptr):
    if not numpy.isfinite(grad[:n]).all():
        found_inf[0] = 1
    with numpy.errstate(invalid="ignore", over="ignore"):
        grad[:n] *= inv_scale * (1 if inv_scale_ptr is None else inv_scale_ptr[0])


def sum_squares_partial(k, partial, grad, runs, n_runs):
    g = grad.astype(numpy.float64)
    partial[: k.grid[0]] = 0
    partial[0] = sum((g[lo:hi] ** 2).sum() for lo, hi in runs[: 2 * n_runs].reshape(-1, 2))


def sum_squares_finish(k, out, partial, parts):
    out[0] = partial[:parts].sum()


EMULATORS = {name: fn for name, fn in globals().items() if callable(fn) and not name.startswith("_")}
