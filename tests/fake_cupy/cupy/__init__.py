"""`import cupy` answered by the strict fake of tests/cuda_fake.py, for whole programs run in a
subprocess on CPUs (tests/test_gpu_checks.py puts this folder first on PYTHONPATH and runs the
device checks through `python -m mpmp.train --backend cupy`). Never on the path otherwise."""

import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import cuda_fake  # noqa: E402

_cp, _cublas = cuda_fake.make_cupy()
_libs = types.ModuleType("cupy_backends.cuda.libs")
_libs.cublas = _cublas
sys.modules.update(
    {
        "cupy": _cp,
        "cupy.cuda": _cp.cuda,
        "cupy_backends": types.ModuleType("cupy_backends"),
        "cupy_backends.cuda": types.ModuleType("cupy_backends.cuda"),
        "cupy_backends.cuda.libs": _libs,
        "cupy_backends.cuda.libs.cublas": _cublas,
    }
)
