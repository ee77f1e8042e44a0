"""python -m mpmp.plan calibrate [--out FILE]: measure this machine and write a `cpu` profile.

Compute rates come from subprocesses with a fixed BLAS thread count (mpmp sets the count before NumPy
loads, so one process cannot measure both): one core (float32 GEMMs with inner dimensions 256 and 64, elementwise passes in and
out of cache, exp and tanh, np.add.at, the cost of one NumPy call) and every core (the GEMM's parallel
efficiency). MPI latency, bandwidth and overlap come from `mpirun -n 2 python -m mpmp.plan._pingpong`
(skipped with --no-mpi, or when mpirun is missing: then the link keys keep the shipped values).
The profile goes to <config dir>/mpmp/plan/cpu.json, where `--hardware cpu` finds it before the
shipped one, or to --out.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from mpmp.errors import ConfigError
from mpmp.plan import hardware


def median_seconds(fn, reps):
    """The median of reps timed calls of fn, after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def probe() -> dict:
    """Rates of this process (its BLAS threads as the environment set them)."""
    import numpy

    rng = numpy.random.default_rng(0)
    out = dict(zip(("gemm_flops", "gemm_k_half", "gemm_wide"), _gemm_rates(rng)))
    # within the L2 cache, and well beyond it (arrays of 4 MiB: what a layer's activations span)
    out["cache_bandwidth"] = _elementwise_bandwidth(rng, 1 << 15)
    out["memory_bandwidth"] = _elementwise_bandwidth(rng, 1 << 20)
    x = rng.random(1 << 18, dtype=numpy.float32)
    o = numpy.empty_like(x)
    t = median_seconds(lambda: numpy.exp(x, out=o), 21) + median_seconds(lambda: numpy.tanh(x, out=o), 21)
    out["transcendental_rate"] = 2 * x.size / t
    ids, rows = rng.integers(0, 256, 1 << 13), rng.random((1 << 13, 64), dtype=numpy.float32)
    table = numpy.zeros((256, 64), numpy.float32)
    out["scatter_rate"] = rows.size / median_seconds(lambda: numpy.add.at(table, ids, rows), 7)
    tiny = numpy.ones(4, numpy.float32)
    out["kernel_overhead_s"] = median_seconds(lambda: [tiny * tiny for _ in range(100)], 21) / 100
    return out


def _gemm_rates(rng) -> tuple[float, float, float]:
    """(rate, k_half) of rate·k/(k + k_half), from a small model's product (1024 x 256 x 1024: tokens,
    d_model, 4 d_model) and a batch of attention products (32 of 128 x 64 x 128: inner dimension 64);
    and the first product's own rate."""
    import numpy

    def flops_per_s(batch, m, k, n):
        a = rng.standard_normal((batch, m, k), dtype=numpy.float32)
        b = rng.standard_normal((batch, k, n), dtype=numpy.float32)
        return 2 * batch * m * k * n / median_seconds(lambda: a @ b, 15)

    wide, narrow = flops_per_s(1, 1024, 256, 1024), flops_per_s(32, 128, 64, 128)
    q = min(max(wide / narrow, 1.0), 3.9)  # rate(256) / rate(64) = 4 (64 + k_half) / (256 + k_half)
    k_half = 256 * (q - 1) / (4 - q)
    return wide * (256 + k_half) / 256, k_half, wide


def _elementwise_bandwidth(rng, size: int) -> float:
    """Bytes per second of x * y into a third array (two reads and a write of float32)."""
    import numpy

    x, y = rng.random(size, dtype=numpy.float32), rng.random(size, dtype=numpy.float32)
    o = numpy.empty_like(x)
    return 12 * size / median_seconds(lambda: numpy.multiply(x, y, out=o), 21)


def _run_probe(threads: int) -> dict:
    env = dict(os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    done = subprocess.run(
        [sys.executable, "-m", "mpmp.plan.calibrate", "--probe"], env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode:
        raise ConfigError(f"calibrate: the compute probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def run_pingpong() -> dict | None:
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        return None
    done = subprocess.run(
        [mpirun, "-n", "2", sys.executable, "-m", "mpmp.plan._pingpong"], capture_output=True, text=True, timeout=600
    )
    if done.returncode:
        raise ConfigError(f"calibrate: {mpirun} -n 2 ... _pingpong failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cache_bytes() -> int:
    """The L2 cache of core 0 (what one rank's elementwise passes stay inside), else 1 MiB."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index2/size").read().strip()
        return int(text[:-1]) * {"K": 1024, "M": 2**20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 2**20


def _memory_bytes() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def measure(link: dict | None = None) -> hardware.Hardware:
    """A cpu profile from this machine's compute probes and, when given, a pingpong result (run_pingpong)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    one = _run_probe(1)
    every = _run_probe(cores) if cores > 1 else one
    base = hardware.from_dict(json.loads((hardware.SHIPPED / "cpu.json").read_text()), "shipped cpu profile")
    intra = hardware.Link(link["latency_s"], link["bandwidth"]) if link else base.intra_node
    return hardware.Hardware(
        name="cpu",
        about=f"measured by python -m mpmp.plan calibrate on {os.uname().nodename}, "
        f"{time.strftime('%Y-%m-%d')}: {cores} cores" + ("" if link else "; MPI link not measured (shipped values)"),
        memory_bytes=_memory_bytes(),
        memory_usable=0.8,
        devices_per_node=4096,
        cores_per_node=cores,
        parallel_efficiency=min(1.0, every["gemm_wide"] / (cores * one["gemm_wide"])),
        peak_flops=one["gemm_flops"] * cores,
        gemm_flops=one["gemm_flops"],
        gemm_flops_fp32=one["gemm_flops"],
        gemm_k_half=one["gemm_k_half"],
        memory_bandwidth=one["memory_bandwidth"],
        cache_bytes=_cache_bytes(),
        cache_bandwidth=one["cache_bandwidth"],
        transcendental_rate=one["transcendental_rate"],
        scatter_rate=one["scatter_rate"],
        kernel_overhead_s=one["kernel_overhead_s"],
        kernels="numpy",
        storage="emulated",
        overlap=link["overlap"] if link else base.overlap,
        intra_node=intra,
        inter_node=intra,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpmp.plan calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="where to write the profile (default: <config dir>/mpmp/plan/cpu.json)")
    p.add_argument("--no-mpi", action="store_true", help="measure compute only; keep the shipped MPI link values")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    hw = measure(None if args.no_mpi else run_pingpong())
    path = hardware.save(hw, args.out or hardware.user_dir() / "cpu.json")
    print(json.dumps(hw.to_dict(), indent=1))
    print(f"profile written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
