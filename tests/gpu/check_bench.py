"""Device check (e): GPT-2 124M-shaped training throughput on one GPU, in fp16 and bf16.

Runs `python -m mpmp.bench train --backend cupy --config 50304,768,12,12,1024,B --dtype FMT` and keeps
its output (tokens/s and MFU are the benchmark's to print), and measures here, in the same run, a
bf16 cuBLAS GEMM (mpmp.nn.cuda.gemm.matmul, 8192^3) against the card's datasheet peak, so the
benchmark's MFU can be read against both. The benchmark's --backend/--dtype arrive with the trainer's
GPU path; until then its failure is reported, not hidden.
Usage: python tests/gpu/check_bench.py --out DIR [--batch B]
"""

import argparse
import json
import os
import subprocess
import sys
import time

# dense bf16 tensor-core peak, TFLOP/s (datasheets, no sparsity), by a substring of the device name
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1}


def card_peak(name: str):
    for key, value in PEAK_BF16_TFLOPS.items():  # the longer names come first where they overlap
        if key in name:
            return value * 1e12
    return None


def gemm_flops(n=8192, reps=10) -> float:
    import cupy

    from mpmp.backend import to_wire
    from mpmp.nn.cuda.gemm import matmul

    a = cupy.asarray(to_wire(cupy.random.standard_normal((n, n), dtype=cupy.float32).get(), "bf16"))
    b = a.copy()
    out = cupy.empty((n, n), dtype=cupy.uint16)
    for _ in range(3):
        matmul(a, b, out=out)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        matmul(a, b, out=out)
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (cupy.cuda.get_elapsed_time(start, end) / 1e3)


def bench(fmt, batch, out, timeout):
    cmd = [
        sys.executable,
        "-m",
        "mpmp.bench",
        "train",
        "--backend",
        "cupy",
        "--dtype",
        fmt,
        "--config",
        f"50304,768,12,12,1024,{batch}",
        "--json",
        os.path.join(out, f"bench_{fmt}.json"),
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        text, rc = f"timed out after {timeout} s", 124
    print(f"$ {' '.join(cmd[1:])}  (exit {rc}, {time.perf_counter() - t0:.0f} s)\n{text.strip()}", flush=True)
    return {"format": fmt, "exit": rc, "output": text[-4000:]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--timeout", type=float, default=90)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    peak = card_peak(name)
    measured = gemm_flops()
    share = f", {measured / peak:.0%} of the datasheet's {peak / 1e12:.0f}" if peak else " (card not in the peak table)"
    print(f"{name}: bf16 GEMM 8192^3 through mpmp.nn.cuda.gemm: {measured / 1e12:.0f} TFLOP/s{share}", flush=True)
    runs = [bench(fmt, args.batch, args.out, args.timeout) for fmt in ("bf16", "fp16")]
    summary = {"device": name, "peak_bf16_flops": peak, "gemm_bf16_flops": measured, "runs": runs}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
