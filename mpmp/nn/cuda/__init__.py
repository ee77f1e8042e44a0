"""CUDA kernels for the CuPy backend: functional.py mirrors mpmp/nn/functional.py one for one,
gemm.py runs the matrix products on cuBLAS, optim.py the optimizer's fused passes, elementwise.py
what CuPy's operators cannot do on bf16 storage. Importing this package needs no CuPy and no GPU;
the kernels compile (NVRTC, cached by CuPy) on first use.
"""
