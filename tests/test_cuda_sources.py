"""The CUDA side compiles and cannot drift from the NumPy side, checked without a GPU.

- Every `*.cu` of mpmp/nn/cuda compiles with nvcc for sm_80 and sm_90 with warnings as errors,
  together with every template instantiation the Python side launches (a generated translation
  unit takes each kernel's address, so templates are really compiled, not only parsed). The text
  compiled is the loader's: headers pasted in, as NVRTC gets it. Skipped without nvcc.
- The same text through NVRTC itself, with CuPy's options and name expressions, when libnvrtc can
  be found (MPMP_NVRTC=/path/to/libnvrtc.so, or the usual places): NVRTC has no standard headers,
  so what nvcc accepts may still fail there. Skipped when it cannot be found.
- Every public kernel of mpmp/nn/functional.py exists in mpmp/nn/cuda/functional.py with the same
  signature, and the optimizer's passes match mpmp/optim's.
"""

import ctypes
import glob
import inspect
import os
import shutil
import subprocess

import pytest

from mpmp.nn import functional as F
from mpmp.nn.cuda import _loader as L
from mpmp.nn.cuda import elementwise as EW
from mpmp.nn.cuda import functional as CF
from mpmp.nn.cuda import optim as CO
from mpmp.optim import adamw, clip

ARCHS = ("80", "90")
SOURCES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(L.HERE, "*.cu")))
NVCC = shutil.which("nvcc")
# CUDA-only functions waiting for their NumPy reference twins (checked as soon as a twin exists)
PENDING_TWINS = set()


def translation_unit(file: str) -> str:
    """The loader's source of `file` and a table of the addresses of its instantiated kernels."""
    table = ",\n".join(f"    reinterpret_cast<const void*>(&{expr})" for expr in L.KERNELS[file])
    name = "mpmp_instantiations_" + file.replace(".", "_")
    return (
        f"{L.source(file)}\n// every instantiation the Python side launches\nconst void* {name}[] = {{\n{table}\n}};\n"
    )


def test_every_source_is_in_the_loader_table():
    assert SOURCES, f"no CUDA sources found in {L.HERE}"
    assert sorted(L.KERNELS) == SOURCES


def test_local_headers_are_pasted_once():
    text = L.source("gelu.cu")
    assert '#include "' not in text
    assert text.count("namespace mpmp {") == 1


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("file", SOURCES)
def test_source_compiles_with_nvcc_without_warnings(file, tmp_path):
    path = tmp_path / file
    path.write_text(translation_unit(file))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-std=c++17", *gencode, "-c", "-o", os.devnull, str(path)]
    cmd += ["--Werror", "all-warnings", "-Xptxas", "-Werror", "-Xcompiler", "-Wall,-Wextra,-Werror"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


def test_nvcc_check_fails_on_a_warning(tmp_path):
    """The flags above turn a warning into a failure (an unused variable here)."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    path = tmp_path / "warn.cu"
    path.write_text("__global__ void k(float* x) { int unused = 0; x[0] = 1.0f; }\n")
    cmd = [NVCC, "-std=c++17", "-arch=sm_80", "-c", "-o", os.devnull, str(path), "--Werror", "all-warnings"]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode != 0


# ---- NVRTC -------------------------------------------------------------------------------------


def _find_nvrtc():
    candidates = [os.environ.get("MPMP_NVRTC", "")]
    for root in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"):
        candidates += sorted(glob.glob(os.path.join(root, "libnvrtc.so*")))
    try:
        import nvidia

        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.exists(path) and "builtins" not in path and ".alt." not in path:
            try:
                # NVRTC dlopens its builtins by name: load them from the same folder first
                for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
                    if ".alt." not in builtins:
                        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def _cuda_include():
    roots = [os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    if NVCC is not None:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    for root in roots:
        include = os.path.join(root, "include")
        if root and os.path.exists(os.path.join(include, "cuda_bf16.h")):
            return include
    return None


def nvrtc_compile(lib, source: str, options, names):
    """(result code, log, {name expression: lowered name}) from NVRTC, as CuPy's RawModule calls it."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kern.cu", 0, None, None) == 0
    try:
        for name in names:
            assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        result = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lowered = {}
        if result == 0:
            for name in names:
                out = ctypes.c_char_p()
                assert lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)) == 0, name
                lowered[name] = out.value.decode()
        return result, log.value.decode(errors="replace"), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("file", SOURCES)
def test_source_compiles_with_nvrtc_as_cupy_does(file):
    lib, include = _find_nvrtc(), _cuda_include()
    if lib is None or include is None:
        pytest.skip("libnvrtc or the CUDA headers not found (set MPMP_NVRTC to libnvrtc.so)")
    for arch in ARCHS:
        # CuPy 14's RawModule options: ours, then -ftz=true, the arch, and the CUDA include directory
        options = [*L.OPTIONS, "-ftz=true", f"-arch=compute_{arch}", f"-I{include}"]
        result, log, lowered = nvrtc_compile(lib, L.source(file), options, L.KERNELS[file])
        assert result == 0, f"NVRTC failed on {file} for compute_{arch}:\n{log}"
        assert "warning" not in log.lower(), log
        assert sorted(lowered) == sorted(L.KERNELS[file])


# ---- the mirror --------------------------------------------------------------------------------


# where the CUDA mirror's functions are defined: itself, the NumPy code it re-exports, elementwise.py
CUDA_HOMES = {CF.__name__, F.__name__, EW.__name__}


def _public(module, homes):
    return {
        name: fn
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if not name.startswith("_") and fn.__module__ in homes
    }


def _shape(fn, drop=()):
    """A signature as comparable data: (name, kind, default) per parameter; callables by name."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in drop:
            continue
        default = p.default
        if callable(default):
            default = default.__name__
        out.append((p.name, p.kind, default))
    return out


def test_every_numpy_kernel_has_a_cuda_twin_with_the_same_signature():
    numpy_side = _public(F, {F.__name__})
    cuda_side = _public(CF, CUDA_HOMES)
    missing = sorted(set(numpy_side) - set(cuda_side))
    assert not missing, f"mpmp/nn/cuda/functional.py lacks {missing}"
    for name, fn in numpy_side.items():
        assert _shape(cuda_side[name]) == _shape(fn), (
            f"{name}: {inspect.signature(cuda_side[name])} != {inspect.signature(fn)}"
        )


def test_cuda_only_kernels_are_the_declared_fused_pairs():
    numpy_side = _public(F, {F.__name__})
    cuda_side = _public(CF, CUDA_HOMES)
    extra = set(cuda_side) - set(numpy_side)
    assert extra <= PENDING_TWINS, f"CUDA-only functions {sorted(extra - PENDING_TWINS)}: add a NumPy twin"
    for name in PENDING_TWINS & set(numpy_side):  # a twin has landed: it must match
        assert _shape(cuda_side[name]) == _shape(numpy_side[name]), name


def test_optimizer_passes_mirror_mpmp_optim():
    assert _shape(CO.adamw_update, drop={"skip"}) == _shape(adamw.adamw_update)
    assert inspect.signature(CO.adamw_update).parameters["skip"].kind == inspect.Parameter.KEYWORD_ONLY
    assert _shape(CO.local_sq_norm) == _shape(clip.local_sq_norm)


def test_signature_check_notices_a_difference():
    def a(x, w, b=None):
        pass

    def b(x, w, bias=None):
        pass

    assert _shape(a) != _shape(b)
