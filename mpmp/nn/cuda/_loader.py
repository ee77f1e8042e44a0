"""Compile this package's CUDA sources once per process and hand out their kernels.

Each `*.cu` file is one `cupy.RawModule`, compiled by NVRTC on first use with the name expressions
listed in KERNELS (templated kernels are instantiated for exactly these types) and cached by CuPy
on disk. Local headers (`#include "common.cuh"`) are pasted into the source first, so NVRTC needs
no include path of ours and CuPy's cache keys on the header's text too. tests/test_cuda_sources.py
compiles the same files and the same instantiations with nvcc.

Storage types: float32 arrays are `float`, float16 arrays `__half`, and uint16 arrays hold bf16 bit
patterns (`__nv_bfloat16`): CuPy has no bfloat16 dtype.
"""

import functools
import os
import re

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIONS = ("--std=c++17",)

# dtype.char -> the C++ storage type of a kernel instantiation
CTYPES = {
    numpy.dtype(numpy.float32).char: "float",
    numpy.dtype(numpy.float16).char: "__half",
    numpy.dtype(numpy.uint16).char: "__nv_bfloat16",
}
STORAGE = ("float", "__half", "__nv_bfloat16")


def _each(names, types=STORAGE):
    return [f"{name}<{t}>" for name in names for t in types]


# file -> every name expression the Python side launches
KERNELS = {
    "gelu.cu": _each(("gelu_forward", "gelu_backward", "bias_gelu_forward", "bias_gelu_backward")),
    "linear.cu": _each(("bias_add", "bias_grad_partial")) + ["column_sum_finish"],
    "layernorm.cu": _each(("layernorm_forward", "layernorm_backward_input", "layernorm_param_grad_partial")),
    "softmax.cu": _each(("causal_softmax_forward", "causal_softmax_backward")),
    "cross_entropy.cu": _each(("cross_entropy_row_max", "cross_entropy_exp_sum", "cross_entropy_backward")),
    "embedding.cu": _each(("embedding_backward",)),
    "elementwise.cu": _each(("add_inplace", "scale")) + [f"cast<{a}, {b}>" for a in STORAGE for b in STORAGE if a != b],
    "adamw.cu": ["adamw_update"],
    "grad_check.cu": ["unscale_and_check", "sum_squares_partial", "sum_squares_finish"],
}

_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)


def source(file: str) -> str:
    """The text NVRTC compiles: the file with its local headers pasted in (each once)."""
    seen = set()

    def expand(name):
        if name in seen:
            return ""
        seen.add(name)
        with open(os.path.join(HERE, name)) as f:
            text = f.read()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text.replace("#pragma once\n", ""))

    return expand(file)


def ctype(a) -> str:
    """The storage type of a kernel argument array, or TypeError naming what is accepted."""
    t = CTYPES.get(a.dtype.char)
    if t is None:
        raise TypeError(f"CUDA kernels take float32, float16 or uint16 (bf16 patterns) arrays, not {a.dtype}")
    return t


@functools.cache
def module(file: str):
    import cupy

    return cupy.RawModule(code=source(file), options=OPTIONS, name_expressions=KERNELS[file])


@functools.cache
def kernel(file: str, name: str, *types: str):
    """The compiled kernel `name<types...>` of `file` (compiled with the whole file on first use)."""
    expr = f"{name}<{', '.join(types)}>" if types else name
    if expr not in KERNELS[file]:
        raise KeyError(f"{expr} is not instantiated for {file}: add it to KERNELS")
    return module(file).get_function(expr)


# ---- launch configuration ----------------------------------------------------------------------
THREADS = 256
MAX_BLOCKS = 1 << 16  # grid-stride kernels cover larger n by looping


def blocks_for(n: int, threads: int = THREADS) -> int:
    """Blocks of a grid-stride elementwise kernel over n elements (at least 1)."""
    return max(1, min(MAX_BLOCKS, -(-n // threads)))


def rows_grid(rows: int, threads: int = THREADS) -> int:
    """Blocks for one warp per row."""
    return max(1, -(-rows // (threads // 32)))


# Scalars: CuPy passes NumPy scalars by value with their own size, so each must match the C type.
i32, i64, f32 = numpy.int32, numpy.int64, numpy.float32
NULL = numpy.uint64(0)  # a null pointer argument
